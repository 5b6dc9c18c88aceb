package rootcred

import (
	"context"
	"errors"
	"fmt"

	"github.com/credbroker/credbroker/server"
	"github.com/credbroker/credbroker/server/config"
)

// ErrSourceNotLive: a Vault source is set up (logged in, its token kept
// alive) when brokerd starts, so moving a target to or from Vault needs a
// restart.
var ErrSourceNotLive = errors.New("a Vault password source cannot be switched to or from while brokerd runs; restart brokerd")

// CheckSource reads the admin password at the source t names (a reload
// changed password_file or password_env) and tells whether PostgreSQL
// accepts it, changing nothing: SetSource then switches to it. A source
// with a rotation pending is refused: settle it first (brokerctl rotate).
func (rc *Credentials) CheckSource(ctx context.Context, t config.Target) error {
	_, _, err := rc.checkSource(ctx, t)
	return err
}

func (rc *Credentials) checkSource(ctx context.Context, t config.Target) (*rootCredential, rootSource, error) {
	c, ok := rc.get(t.Name)
	if !ok {
		return nil, nil, fmt.Errorf("%w: %q is not connected yet; its password source is read when it is", server.ErrUnknownTarget, t.Name)
	}
	c.mu.Lock()
	_, wasVault := c.src.(*vaultSource)
	c.mu.Unlock()
	if t.Vault != nil || wasVault {
		return nil, nil, ErrSourceNotLive
	}
	src, err := newSource(ctx, t, rc.log.With("target", t.Name))
	if err != nil {
		return nil, nil, fmt.Errorf("admin password (%s): %w", t.PasswordSource, err)
	}
	st, err := src.read(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("admin password (%s): %w", src.describe(), err)
	}
	if st.pending != "" {
		return nil, nil, fmt.Errorf("admin password (%s): a rotation is pending there; restart brokerd to settle it first", src.describe())
	}
	if err := c.engine.TryPassword(ctx, st.current); err != nil {
		return nil, nil, fmt.Errorf("admin password (%s): PostgreSQL does not accept it: %w", src.describe(), err)
	}
	return c, src, nil
}

// SetSource switches target t to the password source t names, once
// PostgreSQL accepts its password (see CheckSource); new connections use
// that password, and rotations and refreshes use that source.
func (rc *Credentials) SetSource(ctx context.Context, t config.Target) error {
	c, src, err := rc.checkSource(ctx, t)
	if err != nil {
		return err
	}
	st, err := src.read(ctx)
	if err != nil {
		return fmt.Errorf("admin password (%s): %w", src.describe(), err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.src = src
	if st.current != c.inUse {
		c.engine.SetPassword(st.current)
		c.inUse = st.current
	}
	rc.log.Info("admin password source changed", "target", t.Name, "source", src.describe())
	return nil
}
