package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/credbroker/credbroker/server"
)

// Environment variables for the flags that say how brokerctl proves who
// it is. The token comes from a file or the environment only: a token on
// the command line would be readable by every user through ps.
const (
	tlsCAEnv     = "CREDBROKER_TLS_CA"
	tlsCertEnv   = "CREDBROKER_TLS_CERT"
	tlsKeyEnv    = "CREDBROKER_TLS_KEY"
	tokenEnv     = "CREDBROKER_TOKEN"
	tokenFileEnv = "CREDBROKER_TOKEN_FILE"
)

// maxTokenBytes bounds what token hash and --token-file read.
const maxTokenBytes = 4096

// authFlags are the transport security flags.
type authFlags struct {
	tlsCA, tlsCert, tlsKey string
	tlsServerName          string
	tokenFile              string
}

func (a *authFlags) register(c *cobra.Command) {
	pf := c.PersistentFlags()
	pf.StringVar(&a.tlsCA, "tls-ca", os.Getenv(tlsCAEnv), "CA certificate (PEM) to verify brokerd's TLS certificate; enables TLS (env "+tlsCAEnv+")")
	pf.StringVar(&a.tlsCert, "tls-cert", os.Getenv(tlsCertEnv), "client certificate (PEM) for mutual TLS (env "+tlsCertEnv+")")
	pf.StringVar(&a.tlsKey, "tls-key", os.Getenv(tlsKeyEnv), "client private key (PEM) for mutual TLS (env "+tlsKeyEnv+")")
	pf.StringVar(&a.tlsServerName, "tls-server-name", "", "name to verify in brokerd's certificate (default: the host of --addr)")
	pf.StringVar(&a.tokenFile, "token-file", os.Getenv(tokenFileEnv), "file holding a bearer token (env "+tokenFileEnv+", or the token itself in "+tokenEnv+")")
}

func (a *authFlags) tls() bool { return a.tlsCA != "" || a.tlsCert != "" || a.tlsKey != "" }

// dialOptions returns the transport credentials and, with a token, the
// per-call credentials.
func (a *authFlags) dialOptions() ([]grpc.DialOption, error) {
	var opts []grpc.DialOption
	if a.tls() {
		cfg, err := a.tlsConfig()
		if err != nil {
			return nil, err
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	token, err := a.token()
	if err != nil {
		return nil, err
	}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer{token: token, secure: a.tls()}))
	}
	return opts, nil
}

func (a *authFlags) tlsConfig() (*tls.Config, error) {
	if a.tlsCA == "" {
		return nil, usageErrorf("--tls-cert and --tls-key need --tls-ca (the CA that signed brokerd's certificate)")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: a.tlsServerName}
	pem, err := os.ReadFile(a.tlsCA)
	if err != nil {
		return nil, fmt.Errorf("--tls-ca: %w", err)
	}
	cfg.RootCAs = x509.NewCertPool()
	if !cfg.RootCAs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("--tls-ca %s: no PEM certificate in it", a.tlsCA)
	}
	switch {
	case a.tlsCert != "" && a.tlsKey != "":
		cert, err := tls.LoadX509KeyPair(a.tlsCert, a.tlsKey)
		if err != nil {
			return nil, fmt.Errorf("--tls-cert/--tls-key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case a.tlsCert != "" || a.tlsKey != "":
		return nil, usageErrorf("--tls-cert and --tls-key go together")
	}
	return cfg, nil
}

// token returns the bearer token from --token-file or the environment.
func (a *authFlags) token() (string, error) {
	if a.tokenFile == "" {
		return strings.TrimSpace(os.Getenv(tokenEnv)), nil
	}
	f, err := os.Open(a.tokenFile)
	if err != nil {
		return "", fmt.Errorf("--token-file: %w", err)
	}
	defer f.Close()
	tok, err := readToken(f)
	if err != nil {
		return "", fmt.Errorf("--token-file %s: %w", a.tokenFile, err)
	}
	return tok, nil
}

// readToken reads one token: surrounding white space (the newline an
// editor adds) is not part of it.
func readToken(r io.Reader) (string, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxTokenBytes+1))
	if err != nil {
		return "", err
	}
	if len(data) > maxTokenBytes {
		return "", fmt.Errorf("more than %d bytes; a token is one line", maxTokenBytes)
	}
	tok := strings.TrimSpace(string(data))
	switch {
	case tok == "":
		return "", errors.New("empty")
	case strings.ContainsAny(tok, " \t\r\n"):
		return "", errors.New("holds white space inside; a token is one word")
	}
	return tok, nil
}

// bearer sends "authorization: Bearer TOKEN" with every call.
type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

// RequireTransportSecurity is false only for plaintext, which brokerctl
// allows to loopback and unix sockets alone (see grpcTarget).
func (b bearer) RequireTransportSecurity() bool { return b.secure }

func tokenCmd(stdout io.Writer) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Make bearer tokens and the hashes brokerd's configuration holds",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "hash < TOKEN-FILE",
		Short: "Print the SHA-256 of the token read from stdin, for tokens[].sha256",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			tok, err := readToken(cmd.InOrStdin())
			if err != nil {
				return fmt.Errorf("token on stdin: %w", err)
			}
			_, err = fmt.Fprintln(stdout, server.TokenHash(tok))
			return err
		},
	}, &cobra.Command{
		Use:   "new",
		Short: "Print a new random token and its SHA-256 (give the token to the caller, the hash to brokerd)",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			var b [32]byte
			_, _ = rand.Read(b[:])
			tok := base64.RawURLEncoding.EncodeToString(b[:])
			_, err := fmt.Fprintf(stdout, "token:  %s\nsha256: %s\n", tok, server.TokenHash(tok))
			return err
		},
	})
	return cmd
}
