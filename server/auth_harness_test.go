package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
	"github.com/credbroker/credbroker/broker/postgres"
	"github.com/credbroker/credbroker/internal/pgtest"
	"github.com/credbroker/credbroker/internal/testpki"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
	"github.com/credbroker/credbroker/store"
)

// parseCertPEM decodes one PEM certificate.
func parseCertPEM(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	block, _ := pem.Decode(certPEM)
	if block == nil {
		t.Fatal("no PEM block")
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return cert
}

// writeFile replaces path atomically (write and rename), as cert-manager
// and most deployment tools do.
func writeFile(t *testing.T, path string, data []byte) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// secureOptions configure a secureHarness.
type secureOptions struct {
	tls          bool // serve TLS with the harness's server certificate
	clientCA     bool // require (or, with tokens, verify) client certificates
	tokens       []TokenEntry
	admins       []string
	allowed      map[string][]string
	quotas       Quotas
	auditKey     []byte
	maxRecvBytes int
	// auditRequired sets Config.AuditRequired; auditDevice, when set, is
	// where the audit path points (a symlink), e.g. /dev/full.
	auditRequired bool
	auditDevice   string
	clock         broker.Clock                              // nil: the real clock
	wrapStore     func(broker.LeaseStore) broker.LeaseStore // nil: the bbolt store as is
}

// secureHarness is a broker on its own PostgreSQL target and bbolt file,
// served over real TCP on loopback with the production authenticator,
// authorizer, quotas and audit log.
type secureHarness struct {
	target    *pgtest.Target
	broker    *broker.Broker
	ca        *testpki.CA
	dir       string
	certFile  string
	keyFile   string
	caFile    string
	certs     *CertReloader
	addr      string
	auditPath string
	audit     *audit.Log
	logs      *syncBuffer
}

func newSecureHarness(t *testing.T, o secureOptions) *secureHarness {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	h := &secureHarness{logs: &syncBuffer{}, dir: t.TempDir()}
	logger := slog.New(slog.NewTextHandler(h.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))

	h.target = pgtest.Server(t).NewTarget(t, pgtest.TargetOptions{})
	engCfg := h.target.EngineConfig()
	engCfg.Logger = logger
	eng, err := postgres.New(ctx, engCfg)
	if err != nil {
		t.Fatalf("postgres.New: %v", err)
	}
	t.Cleanup(eng.Close)
	st, err := store.Open(filepath.Join(h.dir, "leases.db"), store.Options{})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { _ = st.Close() })
	var leases broker.LeaseStore = st
	if o.wrapStore != nil {
		leases = o.wrapStore(st)
	}

	h.auditPath = filepath.Join(h.dir, "audit.log")
	if o.auditDevice != "" {
		if err := os.Symlink(o.auditDevice, h.auditPath); err != nil {
			t.Fatal(err)
		}
	}
	h.audit, err = audit.Open(h.auditPath, audit.Options{HMACKey: o.auditKey, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.audit.Close() })

	readOnly := h.target.ProxyRoles["read_only"]
	updater := h.target.ProxyRoles["updater"]
	b, err := broker.New(broker.Config{
		Store:     leases,
		Clock:     o.clock,
		Databases: map[string]broker.Database{"main": eng},
		Roles: []broker.Role{
			{Name: roleReadOnly, Target: "main", ProxyRole: readOnly, DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour},
			{Name: "updater", Target: "main", ProxyRole: updater, DefaultTTL: 10 * time.Minute, MaxTTL: time.Hour},
		},
		Logger:  logger,
		Auditor: h.audit,
	})
	if err != nil {
		t.Fatalf("broker.New: %v", err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatalf("broker.Start: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	h.broker = b

	authn, err := NewPolicyAuthenticator(o.tokens, o.admins)
	if err != nil {
		t.Fatal(err)
	}
	authz, err := NewPolicyAuthorizer(o.allowed)
	if err != nil {
		t.Fatal(err)
	}
	var opts []grpc.ServerOption
	h.ca = testpki.NewCA(t, "credbroker test CA")
	if o.tls {
		h.certFile, h.keyFile = filepath.Join(h.dir, "server.crt"), filepath.Join(h.dir, "server.key")
		certPEM, keyPEM := h.ca.Issue(t, testpki.Leaf{CN: "brokerd", Server: true})
		writeFile(t, h.certFile, certPEM)
		writeFile(t, h.keyFile, keyPEM)
		files := TLSFiles{CertFile: h.certFile, KeyFile: h.keyFile, ClientCertOptional: len(o.tokens) > 0}
		if o.clientCA {
			h.caFile = filepath.Join(h.dir, "client-ca.crt")
			writeFile(t, h.caFile, h.ca.PEM)
			files.ClientCAFile = h.caFile
		}
		h.certs, err = NewCertReloader(files, logger, func(err error) {
			rec := audit.Record{Event: audit.EventTLSReload, Outcome: audit.OutcomeOK}
			if err != nil {
				rec.Outcome, rec.Message = audit.OutcomeError, err.Error()
			}
			h.audit.Record(rec)
		})
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, grpc.Creds(credentials.NewTLS(h.certs.ServerConfig())))
	}
	gs := NewGRPCServer(Config{
		Broker:         b,
		Authenticator:  authn,
		Authorizer:     authz,
		Quotas:         o.quotas,
		Auditor:        h.audit,
		AuditRequired:  o.auditRequired,
		Logger:         logger,
		Endpoints:      map[string]broker.Endpoint{"main": eng.Endpoint()},
		SSLMode:        "disable",
		MaxRecvMsgSize: o.maxRecvBytes,
	}, opts...)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = lis.Addr().String()
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(gs.Stop)
	return h
}

// clientCreds describes how a test client connects.
type clientCreds struct {
	cert  *testpki.Leaf // a client certificate from the harness's CA
	ca    *testpki.CA   // sign the client certificate with this CA instead
	token string
}

// dial connects to the harness as described; plaintext when the harness
// serves no TLS.
func (h *secureHarness) dial(t *testing.T, c clientCreds) *grpc.ClientConn {
	t.Helper()
	var opts []grpc.DialOption
	if h.certs != nil {
		cfg := &tls.Config{RootCAs: x509.NewCertPool(), ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
		cfg.RootCAs.AddCert(h.ca.Cert)
		if c.cert != nil {
			ca := h.ca
			if c.ca != nil {
				ca = c.ca
			}
			certPEM, keyPEM := ca.Issue(t, *c.cert)
			pair, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				t.Fatal(err)
			}
			cfg.Certificates = []tls.Certificate{pair}
		}
		opts = append(opts, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	if c.token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(testBearer(c.token)))
	}
	conn, err := grpc.NewClient("passthrough:///"+h.addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func (h *secureHarness) clients(t *testing.T, c clientCreds) (pb.CredentialServiceClient, pb.AdminServiceClient) {
	conn := h.dial(t, c)
	return pb.NewCredentialServiceClient(conn), pb.NewAdminServiceClient(conn)
}

// auditRecords reads the audit log so far, failing the test if its chain
// does not verify.
func (h *secureHarness) auditRecords(t *testing.T, key []byte) []audit.Record {
	t.Helper()
	data, err := os.ReadFile(h.auditPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := audit.Verify(bytesReader(data), key); err != nil {
		t.Fatalf("audit log does not verify: %v", err)
	}
	return parseRecords(t, data)
}

type testBearer string

func (b testBearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

// RequireTransportSecurity is false so tests can send tokens to the
// plaintext harness too (the server is what is under test).
func (testBearer) RequireTransportSecurity() bool { return false }
