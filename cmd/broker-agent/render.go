package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/template"
	"time"

	"github.com/credbroker/credbroker/clients/credbroker"
)

// templateData is what a template (and the json format) sees.
type templateData struct {
	Username      string    `json:"username"`
	Password      string    `json:"password"`
	Host          string    `json:"host"`
	Port          int       `json:"port"`
	Database      string    `json:"database"`
	DSN           string    `json:"dsn"`
	LeaseID       string    `json:"lease_id"`
	Role          string    `json:"role"`
	ExpireTime    time.Time `json:"expire_time"`
	MaxExpireTime time.Time `json:"max_expire_time"`
}

func dataOf(l credbroker.Lease, c credbroker.Credential) templateData {
	return templateData{
		Username: c.Username, Password: c.Password, Host: c.Host, Port: c.Port, Database: c.Database,
		DSN: c.DSN, LeaseID: l.ID, Role: l.Role, ExpireTime: l.ExpireTime, MaxExpireTime: l.MaxExpireTime,
	}
}

// renderer writes the credential file.
type renderer struct {
	path   string
	format string
	tmpl   *template.Template
}

func newRenderer(c *config) (*renderer, error) {
	r := &renderer{path: c.outPath, format: c.format}
	if c.format == "template" {
		t, err := template.New(filepath.Base(c.template)).Option("missingkey=error").ParseFiles(c.template)
		if err != nil {
			return nil, fmt.Errorf("template: %w", err)
		}
		r.tmpl = t
	}
	return r, nil
}

func (r *renderer) content(d templateData) ([]byte, error) {
	switch r.format {
	case "json":
		b, err := json.MarshalIndent(d, "", "  ")
		return append(b, '\n'), err
	case "env":
		var b bytes.Buffer
		for _, kv := range envOf(d) {
			k, v, _ := strings.Cut(kv, "=")
			b.WriteString(k + "=" + shellQuote(v) + "\n")
		}
		return b.Bytes(), nil
	case "dsn":
		return []byte(d.DSN + "\n"), nil
	case "template":
		var b bytes.Buffer
		if err := r.tmpl.Execute(&b, d); err != nil {
			// Template errors can quote data: keep only the template's
			// own position and reason, which name fields, not values.
			return nil, fmt.Errorf("executing template %s failed", r.tmpl.Name())
		}
		return b.Bytes(), nil
	}
	return nil, fmt.Errorf("unknown format %q", r.format)
}

// render writes the file atomically: a temporary file in the same
// directory, mode 0600, synced, then renamed over the old one, so a
// reader sees the old credential or the new one, never half of either.
func (r *renderer) render(d templateData) error {
	if r.path == "" {
		return nil
	}
	b, err := r.content(d)
	if err != nil {
		return err
	}
	dir := filepath.Dir(r.path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(r.path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("render: %w", err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after a successful rename there is nothing to remove
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("render: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("render: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("render: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("render: %w", err)
	}
	if err := os.Rename(tmp, r.path); err != nil {
		return fmt.Errorf("render: %w", err)
	}
	return nil
}

// envOf is the credential as environment variables: libpq's PG* names,
// which psql and most drivers read, and DATABASE_URL.
func envOf(d templateData) []string {
	return []string{
		"PGHOST=" + d.Host,
		"PGPORT=" + strconv.Itoa(d.Port),
		"PGDATABASE=" + d.Database,
		"PGUSER=" + d.Username,
		"PGPASSWORD=" + d.Password,
		"DATABASE_URL=" + d.DSN,
		"CREDBROKER_LEASE_ID=" + d.LeaseID,
	}
}

// shellQuote single-quotes v unless it is made of characters that need no
// quoting in sh and in systemd's EnvironmentFile.
func shellQuote(v string) string {
	safe := v != ""
	for _, r := range v {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("_-.,:/@+%", r)) {
			safe = false
			break
		}
	}
	if safe {
		return v
	}
	return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}
