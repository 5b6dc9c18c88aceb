package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"
)

// File is the configuration file as written: strings for durations (Go
// duration syntax, "15m"), pointers where an explicit zero must be told
// apart from "not set". Validate turns it into a Config.
type File struct {
	// Listen is the gRPC address: host:port, or unix:/path.
	Listen string `yaml:"listen"`
	// Instance names this brokerd in its broker group.
	Instance string `yaml:"instance"`
	// Store is the lease store.
	Store StoreFile `yaml:"store"`
	// Targets are the PostgreSQL servers on which users are made.
	Targets []TargetFile `yaml:"targets"`
	// Roles are the broker roles clients ask for.
	Roles []RoleFile `yaml:"roles"`
	// Expiry tunes the expiry manager and the revoker.
	Expiry ExpiryFile `yaml:"expiry"`
	// ReconcileInterval is how often intents and unknown marker-role
	// members are settled.
	ReconcileInterval string `yaml:"reconcile_interval"`
	// DisconnectGrace is how long a revoke_on_disconnect lease may go
	// without a KeepAlive stream naming it.
	DisconnectGrace string `yaml:"disconnect_grace"`
	// ShutdownTimeout bounds the graceful stop of the gRPC server.
	ShutdownTimeout string `yaml:"shutdown_timeout"`
	// Log configures brokerd's own log.
	Log LogFile `yaml:"log"`
	// DSNSSLMode is the sslmode written into the DSNs handed to clients.
	DSNSSLMode string `yaml:"dsn_sslmode"`
	// TLS serves gRPC over TLS (and, with client_ca_file, mutual TLS).
	TLS *TLSFile `yaml:"tls"`
	// Tokens are the bearer tokens accepted, as SHA-256 hashes.
	Tokens []TokenFile `yaml:"tokens"`
	// Admins are the identities allowed to call AdminService.
	Admins []string `yaml:"admins"`
	// Quotas bound active leases and the issue rate per identity.
	Quotas QuotasFile `yaml:"quotas"`
	// Audit configures the tamper-evident audit log.
	Audit AuditFile `yaml:"audit"`
	// Metrics serves Prometheus metrics and health probes over HTTP.
	Metrics MetricsFile `yaml:"metrics"`
	// Activity is the sampling of the targets' sessions (activity.go).
	Activity ActivityFile `yaml:"activity"`
	// VaultAPI serves the Vault-compatible HTTP API.
	VaultAPI VaultAPIFile `yaml:"vault_api"`

	// dir is the directory of the file, against which relative paths are
	// resolved (so a unit file's working directory does not matter).
	dir string
	// shapeErrs are the unknown keys, repeated keys and values of the
	// wrong kind that Parse found; Validate reports them with the rest.
	shapeErrs []shapeError
}

// shapeError is a problem with the file's structure at a key path.
type shapeError struct {
	path string // "" for the top level
	err  error
}

// StoreFile is the store section.
type StoreFile struct {
	Path               string    `yaml:"path"`
	Etcd               *EtcdFile `yaml:"etcd"`
	OpenTimeout        string    `yaml:"open_timeout"`
	TombstoneRetention string    `yaml:"tombstone_retention"`
}

// EtcdFile is store.etcd.
type EtcdFile struct {
	Endpoints    []string     `yaml:"endpoints"`
	Prefix       string       `yaml:"prefix"`
	SessionTTL   string       `yaml:"session_ttl"`
	DialTimeout  string       `yaml:"dial_timeout"`
	TLS          *EtcdTLSFile `yaml:"tls"`
	Username     string       `yaml:"username"`
	PasswordFile string       `yaml:"password_file"`
}

// EtcdTLSFile is store.etcd.tls.
type EtcdTLSFile struct {
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// TargetFile is one entry of targets.
type TargetFile struct {
	Name         string `yaml:"name"`
	URL          string `yaml:"url"`
	PasswordFile string `yaml:"password_file"`
	PasswordEnv  string `yaml:"password_env"`
	// Vault is the third source of the admin password (see vault.go).
	Vault          *VaultFile `yaml:"vault"`
	MarkerRole     string     `yaml:"marker_role"`
	MaxConns       *int       `yaml:"max_conns"`
	ConnectTimeout string     `yaml:"connect_timeout"`
	// ScramIterations is the iteration count of issued users' password
	// verifiers (postgres.DefaultScramIterations when absent).
	ScramIterations *int `yaml:"scram_iterations"`
}

// RoleFile is one entry of roles.
type RoleFile struct {
	Name       string `yaml:"name"`
	Target     string `yaml:"target"`
	ProxyRole  string `yaml:"proxy_role"`
	DefaultTTL string `yaml:"default_ttl"`
	MaxTTL     string `yaml:"max_ttl"`
	// Allowed are the identities (or path.Match globs) that may issue
	// this role.
	Allowed []string `yaml:"allowed"`
	// MaxActiveLeases caps the role's active leases.
	MaxActiveLeases *int `yaml:"max_active_leases"`
	// RevokeUnusedAfter revokes a lease whose user has had no session for
	// that long (activity.go); absent: never.
	RevokeUnusedAfter string `yaml:"revoke_unused_after"`
}

// TLSFile is the tls section.
type TLSFile struct {
	CertFile     string `yaml:"cert_file"`
	KeyFile      string `yaml:"key_file"`
	ClientCAFile string `yaml:"client_ca_file"`
}

// TokenFile is one entry of tokens: never the token itself, its hash.
type TokenFile struct {
	Identity string `yaml:"identity"`
	SHA256   string `yaml:"sha256"`
}

// QuotasFile is the quotas section.
type QuotasFile struct {
	MaxActivePerIdentity *int `yaml:"max_active_per_identity"`
	// IssueRatePerIdentity is "N/s", "N/m" or "N/h".
	IssueRatePerIdentity string `yaml:"issue_rate_per_identity"`
	IssueBurst           *int   `yaml:"issue_burst"`
}

// AuditFile is the audit section.
type AuditFile struct {
	Path        string `yaml:"path"`
	HMACKeyFile string `yaml:"hmac_key_file"`
	Required    bool   `yaml:"required"`
}

// ExpiryFile is the expiry section.
type ExpiryFile struct {
	RevokeConcurrency   *int     `yaml:"revoke_concurrency"`
	RevokeRate          *float64 `yaml:"revoke_rate"`
	RevokeRetries       *int     `yaml:"revoke_retries"`
	ValidUntilGrace     string   `yaml:"valid_until_grace"`
	RetryBaseDelay      string   `yaml:"retry_base_delay"`
	RetryMaxDelay       string   `yaml:"retry_max_delay"`
	FailedRetryInterval string   `yaml:"failed_retry_interval"`
}

// LogFile is the log section.
type LogFile struct {
	Level  string `yaml:"level"`
	Format string `yaml:"format"`
}

// maxFileSize bounds what Load reads: a configuration file is small, and a
// path pointing at something huge (or endless, like /dev/zero) must fail
// rather than eat memory.
const maxFileSize = 1 << 20

// Load reads and parses the configuration file at path. Relative paths in
// it (store.path, targets[].password_file) are taken relative to the
// file's directory. Call Validate on the result.
func Load(path string) (*File, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("config: read %s: %w", path, err)
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("config: %s is larger than %d bytes", path, maxFileSize)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	// Parse errors are returned as they are: each already names its key
	// path (or line), and the caller knows which file it asked for.
	file, err := Parse(data)
	if err != nil {
		return nil, err
	}
	file.dir = filepath.Dir(abs)
	return file, nil
}

// Parse parses a configuration document. Relative paths in it are taken
// relative to the working directory. It fails only on what stops it from
// reading the document at all (YAML syntax, an empty file, a second
// document). Unknown keys, keys given twice and values of the wrong shape,
// each with its key path and line, are reported by Validate together with
// every other problem of the file, so one unknown key does not hide the
// rest.
func Parse(data []byte) (*File, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return nil, errors.New("the file is empty")
	}
	root := doc.Content[0]
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return nil, errors.New("the file is empty")
	}
	// yaml.v3's own messages for unknown fields and type mismatches name a
	// line but not the key, so walk the tree first to name the key path.
	var shapeErrs []shapeError
	checkShape(root, reflect.TypeFor[File](), "", &shapeErrs)

	// The walk above found every unknown key and value of the wrong kind;
	// decoding skips those (yaml.v3 reports them as a TypeError after
	// decoding everything else), so the rest of the file is still
	// validated. Without shape errors, KnownFields(true) is a second line
	// of defence.
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(len(shapeErrs) == 0)
	var f File
	if err := dec.Decode(&f); err != nil {
		var te *yaml.TypeError
		if len(shapeErrs) == 0 || !errors.As(err, &te) {
			return nil, err
		}
	}
	f.shapeErrs = shapeErrs
	// A second document would be silently ignored by Decode; an operator
	// who wrote one meant something by it.
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, errors.New("the file holds more than one YAML document")
	}
	return &f, nil
}

// checkShape compares node against the Go type t and appends an error for
// every unknown key, repeated key and value of the wrong kind, naming its
// key path.
func checkShape(node *yaml.Node, t reflect.Type, path string, errs *[]shapeError) {
	if node.Kind == yaml.AliasNode {
		node = node.Alias
	}
	// A null value (a key with nothing after it) leaves the field unset.
	if node.Kind == yaml.ScalarNode && node.Tag == "!!null" {
		return
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	at := func(format string, args ...any) {
		*errs = append(*errs, shapeError{path, fmt.Errorf("%s: %s (line %d)", displayPath(path), fmt.Sprintf(format, args...), node.Line)})
	}
	switch t.Kind() {
	case reflect.Struct:
		if node.Kind != yaml.MappingNode {
			at("must be a mapping of keys, not %s", describe(node))
			return
		}
		fields := yamlFields(t)
		seen := map[string]int{}
		for i := 0; i+1 < len(node.Content); i += 2 {
			k, v := node.Content[i], node.Content[i+1]
			key := k.Value
			if key == "<<" { // a merge key: the decoder resolves it
				continue
			}
			sub := joinPath(path, key)
			if line, dup := seen[key]; dup {
				*errs = append(*errs, shapeError{sub, fmt.Errorf("%s: given twice (lines %d and %d)", sub, line, k.Line)})
				continue
			}
			seen[key] = k.Line
			ft, ok := fields[key]
			if !ok {
				*errs = append(*errs, shapeError{sub, fmt.Errorf("%s: unknown key (line %d)%s", sub, k.Line, suggest(key, fields))})
				continue
			}
			checkShape(v, ft, sub, errs)
		}
	case reflect.Slice:
		if node.Kind != yaml.SequenceNode {
			at("must be a list, not %s", describe(node))
			return
		}
		for i, el := range node.Content {
			checkShape(el, t.Elem(), fmt.Sprintf("%s[%d]", path, i), errs)
		}
	default:
		if node.Kind != yaml.ScalarNode {
			at("must be a single value, not %s", describe(node))
			return
		}
		// Decode the scalar alone to find type mismatches ("max_conns: ten")
		// with the key path attached.
		if err := node.Decode(reflect.New(t).Interface()); err != nil {
			at("%q is not %s", node.Value, kindName(t))
		}
	}
}

// yamlFields maps the yaml keys of struct t to their field types.
func yamlFields(t reflect.Type) map[string]reflect.Type {
	m := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		m[name] = f.Type
	}
	return m
}

// suggest names a known key close to a misspelt one.
func suggest(key string, fields map[string]reflect.Type) string {
	best, bestDist := "", 3 // farther than two edits is no longer a typo
	for k := range fields {
		if d := editDistance(key, k); d < bestDist || d == bestDist && best != "" && k < best {
			best, bestDist = k, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf("; did you mean %q?", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return fmt.Sprintf("the value %q", n.Value)
	}
}

func kindName(t reflect.Type) string {
	switch t.Kind() {
	case reflect.Int, reflect.Int64, reflect.Int32:
		return "an integer"
	case reflect.Float64, reflect.Float32:
		return "a number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a string"
	}
	return "a " + t.Kind().String()
}

func joinPath(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func displayPath(path string) string {
	if path == "" {
		return "(top level)"
	}
	return path
}
