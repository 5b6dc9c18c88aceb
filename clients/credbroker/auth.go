package credbroker

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
)

// TLSFiles builds a client TLS configuration from PEM files: caFile
// verifies the broker's certificate; certFile and keyFile, both or
// neither, are the client certificate for mutual TLS. serverName overrides
// the name verified in the broker's certificate ("" is the dialled host).
func TLSFiles(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	if caFile == "" {
		return nil, errors.New("credbroker: TLS needs the CA file that signed the broker's certificate")
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("credbroker: TLS CA: %w", err)
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName, RootCAs: x509.NewCertPool()}
	if !cfg.RootCAs.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("credbroker: TLS CA %s: no PEM certificate in it", caFile)
	}
	switch {
	case certFile != "" && keyFile != "":
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("credbroker: client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	case certFile != "" || keyFile != "":
		return nil, errors.New("credbroker: a client certificate needs both its certificate and its key file")
	}
	return cfg, nil
}

// WithBearerTokenFile sends the token in file (surrounding white space
// trimmed) as "authorization: Bearer ..." on every call. The file is read
// for each call, so a token updated on disk (a mounted Kubernetes secret)
// is picked up without a restart. Over plaintext, which Dial allows to
// loopback and unix sockets only, the token is sent too.
func WithBearerTokenFile(path string) Option {
	return func(o *options) { o.tokenFile = path }
}

// maxTokenBytes bounds what a token file may hold.
const maxTokenBytes = 4096

type bearerFile struct {
	path   string
	secure bool
}

func (b bearerFile) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	f, err := os.Open(b.path)
	if err != nil {
		return nil, fmt.Errorf("credbroker: token file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxTokenBytes+1))
	if err != nil {
		return nil, fmt.Errorf("credbroker: token file: %w", err)
	}
	if len(data) > maxTokenBytes {
		return nil, fmt.Errorf("credbroker: token file %s: more than %d bytes", b.path, maxTokenBytes)
	}
	tok := strings.TrimSpace(string(data))
	if tok == "" {
		return nil, fmt.Errorf("credbroker: token file %s is empty", b.path)
	}
	return map[string]string{"authorization": "Bearer " + tok}, nil
}

func (b bearerFile) RequireTransportSecurity() bool { return b.secure }

// checkPlaintext refuses plaintext gRPC to anything but loopback and unix
// sockets: the broker answers with passwords.
func checkPlaintext(addr string) error {
	if strings.HasPrefix(addr, "unix:") {
		return nil
	}
	host, _, err := net.SplitHostPort(strings.TrimPrefix(addr, "passthrough:///"))
	if err != nil {
		return fmt.Errorf("credbroker: address %q: want host:port or unix:/path", addr)
	}
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("credbroker: plaintext gRPC to %s refused: the broker answers with passwords; use WithTLS, or loopback or a unix socket", addr)
}
