package rootcred

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/credbroker/credbroker/server/config"
)

// maxPasswordFileSize: a password file holds one line; anything bigger is
// the wrong file.
const maxPasswordFileSize = 4096

// readPasswordFile reads a password file that has already passed
// ReadSecretFile's checks (a source re-reading it for changes).
func readPasswordFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	if len(b) > maxPasswordFileSize {
		return "", fmt.Errorf("%s is larger than %d bytes", path, maxPasswordFileSize)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" || strings.ContainsAny(pw, "\r\n") {
		return "", fmt.Errorf("%s must hold the password alone, on one line", path)
	}
	return pw, nil
}

// ReadSecretFile reads a file holding one secret on one line (an admin
// password, a Vault token, the audit HMAC key). A file others can write is
// refused; one others can read is returned with a warning. Errors and
// warnings name the path, never the content.
func ReadSecretFile(path string) (secret Secret, warning string, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", "", err
	}
	if !fi.Mode().IsRegular() {
		return "", "", fmt.Errorf("%s is not a regular file", path)
	}
	perm := fi.Mode().Perm()
	if perm&0o022 != 0 {
		// Whoever can write the file can point the broker at a server of
		// their choosing's password, or lock it out: refuse.
		return "", "", fmt.Errorf("%s is group- or world-writable (mode %04o); run chmod 600 %s", path, perm, path)
	}
	if perm&0o004 != 0 {
		warning = fmt.Sprintf("%s is world-readable (mode %04o); run chmod 600 %s", path, perm, path)
	}
	fh, err := os.Open(path)
	if err != nil {
		return "", "", err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxPasswordFileSize+1))
	if err != nil {
		return "", "", fmt.Errorf("read %s: %w", path, err)
	}
	if len(data) > maxPasswordFileSize {
		return "", "", fmt.Errorf("%s is larger than %d bytes; it should hold one line, the password", path, maxPasswordFileSize)
	}
	// Editors and `echo` add a final newline; it is not part of the secret.
	pw := strings.TrimRight(string(data), "\r\n")
	switch {
	case pw == "":
		return "", "", fmt.Errorf("%s is empty", path)
	case strings.ContainsAny(pw, "\r\n"):
		return "", "", fmt.Errorf("%s holds more than one line; it should hold the password alone", path)
	}
	return Secret(pw), warning, nil
}

// ReadSecretEnv reads a secret from an environment variable.
func ReadSecretEnv(name string) (Secret, error) {
	pw, ok := os.LookupEnv(name)
	switch {
	case !ok:
		return "", fmt.Errorf("environment variable %s is not set", name)
	case pw == "":
		return "", fmt.Errorf("environment variable %s is empty", name)
	}
	return Secret(pw), nil
}

// readCredential reads a secret from a file or, when file is "", from the
// environment variable env.
func readCredential(file, env string) (Secret, error) {
	if file != "" {
		s, _, err := ReadSecretFile(file)
		return s, err
	}
	return ReadSecretEnv(env)
}

// Check reads every secret the configuration names (the targets' admin
// passwords or Vault credentials, the audit HMAC key) without connecting
// anywhere, so that `brokerd check` and start-up report a missing or
// loosely-permitted file before anything else. Errors and warnings start
// with the key path they are about; no message holds a secret.
func Check(cfg *config.Config) (warnings []string, err error) {
	var errs []error
	at := func(path string, err error) { errs = append(errs, fmt.Errorf("%s: %w", path, err)) }
	file := func(path, name string) Secret {
		s, warning, err := ReadSecretFile(name)
		if err != nil {
			at(path, err)
		}
		if warning != "" {
			warnings = append(warnings, path+": "+warning)
		}
		return s
	}
	env := func(path, name string) {
		if _, err := ReadSecretEnv(name); err != nil {
			at(path, err)
		}
	}
	for i, t := range cfg.Targets {
		p := fmt.Sprintf("targets[%d]", i)
		switch {
		case t.PasswordFile != "":
			file(p+".password_file", t.PasswordFile)
		case t.PasswordEnv != "":
			env(p+".password_env", t.PasswordEnv)
		case t.Vault != nil:
			for _, c := range []struct{ name, file, env string }{
				{"token", t.Vault.TokenFile, t.Vault.TokenEnv},
				{"secret_id", t.Vault.SecretIDFile, t.Vault.SecretIDEnv},
			} {
				switch {
				case c.file != "":
					file(p+".vault."+c.name+"_file", c.file)
				case c.env != "":
					env(p+".vault."+c.name+"_env", c.env)
				}
			}
		}
	}
	if e := cfg.Store.Etcd; e != nil && e.PasswordFile != "" {
		file("store.etcd.password_file", e.PasswordFile)
	}
	if a := cfg.Security.Audit; a.HMACKeyFile != "" {
		if key := file("audit.hmac_key_file", a.HMACKeyFile); key != "" {
			if err := checkHMACKey(key); err != nil {
				at("audit.hmac_key_file", err)
			}
		}
	}
	return warnings, errors.Join(errs...)
}

// AuditKey reads the audit log's HMAC key; nil without audit.hmac_key_file.
func AuditKey(a config.Audit) ([]byte, error) {
	if a.HMACKeyFile == "" {
		return nil, nil
	}
	key, _, err := ReadSecretFile(a.HMACKeyFile)
	if err != nil {
		return nil, fmt.Errorf("audit.hmac_key_file: %w", err)
	}
	if err := checkHMACKey(key); err != nil {
		return nil, fmt.Errorf("audit.hmac_key_file: %w", err)
	}
	return []byte(key.Reveal()), nil
}

func checkHMACKey(key Secret) error {
	if n := len(key.Reveal()); n < config.MinHMACKeyBytes {
		return fmt.Errorf("the key is %d bytes; use at least %d random bytes (head -c 32 /dev/urandom | base64)", n, config.MinHMACKeyBytes)
	}
	return nil
}
