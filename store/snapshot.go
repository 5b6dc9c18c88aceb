package store

import (
	"context"
	"io"

	bolt "go.etcd.io/bbolt"
)

// Snapshot writes a copy of the whole bbolt file, as of one read
// transaction, to w: a file brokerd opens at store.path (a restore is a
// copy of it there, with brokerd stopped). Writes go on meanwhile; the
// copy holds none made after the transaction began.
//
// The read transaction stays open while w is written, and bbolt cannot
// remap a growing file while one is open, so a slow w can delay the
// commits that need to grow the file: write to a local file, not to a
// network peer (the backup RPC spools to a temporary file first).
func (s *Store) Snapshot(ctx context.Context, w io.Writer) (int64, error) {
	var n int64
	err := s.view(ctx, func(tx *bolt.Tx) error {
		var err error
		n, err = tx.WriteTo(&ctxWriter{ctx: ctx, w: w})
		return err
	})
	return n, err
}

// ctxWriter stops a long copy once ctx is done.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c *ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}
