package rootcred

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// rootState is what a root-credential source holds: the password the
// broker uses, and a rotation's new password while its outcome is not yet
// known to the source (the intent).
type rootState struct {
	current string
	pending string
	version int            // Vault KV version, for check-and-set
	data    map[string]any // the whole Vault secret, so other fields survive writes
}

// rootSource is where a target's admin password lives. A rotation is
// stage (record the new password as pending), ALTER ROLE, commit (pending
// becomes current); abort drops the pending one. Whatever instant a crash
// hits, the source holds a password the server accepts: the current one
// before the ALTER ROLE commits, the pending one after.
type rootSource interface {
	describe() string
	read(ctx context.Context) (rootState, error)
	stage(ctx context.Context, st rootState, next string) (rootState, error)
	commit(ctx context.Context, st rootState) error
	abort(ctx context.Context, st rootState) error
	refreshInterval() time.Duration
}

var errNotWritable = fmt.Errorf("%w: it comes from an environment variable, which credbroker cannot write back; "+
	"use password_file or vault", server.ErrRotationNotSupported)

// envSource is password_env: read once, never rotated.
type envSource struct {
	name     string
	password string
}

func (s *envSource) describe() string { return "env " + s.name }
func (s *envSource) read(context.Context) (rootState, error) {
	return rootState{current: s.password}, nil
}
func (s *envSource) stage(context.Context, rootState, string) (rootState, error) {
	return rootState{}, errNotWritable
}
func (s *envSource) commit(context.Context, rootState) error { return errNotWritable }
func (s *envSource) abort(context.Context, rootState) error  { return nil }
func (s *envSource) refreshInterval() time.Duration          { return 0 }

// fileSource is password_file. The intent is the file "<path>_pending",
// beside it; commit renames it over the password file, which is atomic.
type fileSource struct {
	path string
}

func (s *fileSource) describe() string { return "file " + s.path }
func (s *fileSource) pendingPath() string {
	return s.path + config.PendingSuffix
}

func (s *fileSource) read(context.Context) (rootState, error) {
	cur, err := readPasswordFile(s.path)
	if err != nil {
		return rootState{}, err
	}
	st := rootState{current: cur}
	switch p, err := readPasswordFile(s.pendingPath()); {
	case err == nil:
		st.pending = p
	case !errors.Is(err, fs.ErrNotExist):
		return rootState{}, fmt.Errorf("rotation intent: %w", err)
	}
	return st, nil
}

func (s *fileSource) stage(_ context.Context, st rootState, next string) (rootState, error) {
	if err := writeFileSync(s.pendingPath(), next+"\n"); err != nil {
		return rootState{}, fmt.Errorf("writing the rotation intent: %w", err)
	}
	st.pending = next
	return st, nil
}

func (s *fileSource) commit(context.Context, rootState) error {
	if err := os.Rename(s.pendingPath(), s.path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(s.path))
}

func (s *fileSource) abort(context.Context, rootState) error {
	if err := os.Remove(s.pendingPath()); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return syncDir(filepath.Dir(s.path))
}

func (s *fileSource) refreshInterval() time.Duration { return config.DefaultRefreshInterval }

// writeFileSync writes a 0600 file durably: a temporary file, fsync,
// rename, fsync of the directory. The file is owned by brokerd's user.
func writeFileSync(path, content string) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename, a no-op
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return syncDir(dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
