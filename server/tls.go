package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"
)

// TLSFiles names the PEM files of the server's TLS configuration.
type TLSFiles struct {
	CertFile string
	KeyFile  string
	// ClientCAFile, when set, verifies client certificates against these
	// CAs. Without it the server presents its certificate only (callers
	// authenticate with bearer tokens).
	ClientCAFile string
	// ClientCertOptional lets a caller connect without a client
	// certificate even though ClientCAFile is set (it then needs a bearer
	// token). A certificate that is presented is still verified.
	ClientCertOptional bool
}

// CertReloader serves TLS from files that may be replaced at any time:
// before each handshake it compares the files' identity (inode, size,
// modification time) with what it loaded and, if any changed, loads them
// again. Rotation (cert-manager, a renewed Let's Encrypt certificate, a
// new client CA) then needs no restart, and connections already open keep
// the certificate they were made with.
//
// A set of files that does not load (a key that does not match the
// certificate because only one of the two has been written yet) is
// logged once and the previous certificate kept; the next handshake after
// the files change again tries anew.
type CertReloader struct {
	files    TLSFiles
	log      *slog.Logger
	onReload func(err error)

	mu       sync.Mutex
	cert     *tls.Certificate
	pool     *x509.CertPool
	loaded   [3]fileStamp // stamps of what cert and pool were loaded from
	rejected [3]fileStamp // stamps of the last set that failed to load
}

// fileStamp identifies one version of a file.
type fileStamp struct {
	ino   uint64
	size  int64
	mtime time.Time
}

// NewCertReloader loads the files once, failing if they do not form a
// valid configuration. onReload, if set, is called after each reload
// attempt that saw changed files, with its error (nil on success): the
// audit trail records certificate rotations.
func NewCertReloader(files TLSFiles, log *slog.Logger, onReload func(error)) (*CertReloader, error) {
	if files.CertFile == "" || files.KeyFile == "" {
		return nil, errors.New("tls: cert_file and key_file are both required")
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &CertReloader{files: files, log: log, onReload: onReload}
	stamps, err := r.stamps()
	if err != nil {
		return nil, err
	}
	if err := r.load(stamps); err != nil {
		return nil, err
	}
	return r, nil
}

func (r *CertReloader) paths() [3]string {
	return [3]string{r.files.CertFile, r.files.KeyFile, r.files.ClientCAFile}
}

func (r *CertReloader) stamps() ([3]fileStamp, error) {
	var out [3]fileStamp
	for i, p := range r.paths() {
		if p == "" {
			continue
		}
		fi, err := os.Stat(p)
		if err != nil {
			return out, fmt.Errorf("tls: %w", err)
		}
		out[i] = fileStamp{size: fi.Size(), mtime: fi.ModTime()}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			out[i].ino = st.Ino
		}
	}
	return out, nil
}

// load reads the files; the caller holds mu or owns r exclusively.
func (r *CertReloader) load(stamps [3]fileStamp) error {
	cert, err := tls.LoadX509KeyPair(r.files.CertFile, r.files.KeyFile)
	if err != nil {
		// The error names the files and what is wrong with them, never
		// the key's bytes.
		return fmt.Errorf("tls: cert_file/key_file: %w", err)
	}
	var pool *x509.CertPool
	if r.files.ClientCAFile != "" {
		pem, err := os.ReadFile(r.files.ClientCAFile)
		if err != nil {
			return fmt.Errorf("tls: client_ca_file: %w", err)
		}
		pool = x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("tls: client_ca_file %s holds no PEM certificate", r.files.ClientCAFile)
		}
	}
	r.cert, r.pool, r.loaded = &cert, pool, stamps
	return nil
}

// current returns the certificate and client CAs to use now, reloading
// them first if the files changed.
func (r *CertReloader) current() (*tls.Certificate, *x509.CertPool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	stamps, err := r.stamps()
	switch {
	case err != nil:
		// A file missing for a moment (being replaced): keep serving.
		return r.cert, r.pool
	case stamps == r.loaded || stamps == r.rejected:
		return r.cert, r.pool
	}
	err = r.load(stamps)
	if err != nil {
		r.rejected = stamps
		r.log.Error("TLS files changed but do not load; still serving the previous certificate", "err", err)
	} else {
		r.log.Info("TLS files reloaded", "cert_file", r.files.CertFile)
	}
	if r.onReload != nil {
		r.onReload(err)
	}
	return r.cert, r.pool
}

// Certificate returns the certificate served now (for tests and logs).
func (r *CertReloader) Certificate() *tls.Certificate {
	cert, _ := r.current()
	return cert
}

// ServerConfig returns a tls.Config for the gRPC listener: TLS 1.2 at
// least, and each handshake served from the current files.
func (r *CertReloader) ServerConfig() *tls.Config {
	clientAuth := tls.NoClientCert
	if r.files.ClientCAFile != "" {
		clientAuth = tls.RequireAndVerifyClientCert
		if r.files.ClientCertOptional {
			clientAuth = tls.VerifyClientCertIfGiven
		}
	}
	base := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cert, pool := r.current()
		return &tls.Config{
			MinVersion:   tls.VersionTLS12,
			NextProtos:   []string{"h2"},
			Certificates: []tls.Certificate{*cert},
			ClientCAs:    pool,
			ClientAuth:   clientAuth,
		}, nil
	}
	return base
}
