package memstore

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/credbroker/credbroker/broker"
)

// image is a snapshot of the store: JSON, for tests only.
type image struct {
	Leases     map[string]broker.Lease
	Intents    map[string]broker.Intent
	LastIssued map[string]time.Time
	GroupID    string
}

// Snapshot writes the store's contents to w as JSON, read under one lock.
func (s *Store) Snapshot(ctx context.Context, w io.Writer) (int64, error) {
	if err := s.lock(ctx); err != nil {
		return 0, err
	}
	data, err := json.Marshal(image{Leases: s.leases, Intents: s.intents, LastIssued: s.lastIssued, GroupID: s.groupID})
	s.mu.Unlock()
	if err != nil {
		return 0, fmt.Errorf("memstore snapshot: %w", err)
	}
	n, err := w.Write(data)
	return int64(n), err
}

// Restore returns a new store holding what Snapshot wrote to r.
func Restore(r io.Reader) (*Store, error) {
	var img image
	if err := json.NewDecoder(r).Decode(&img); err != nil {
		return nil, fmt.Errorf("memstore restore: %w", err)
	}
	s := New()
	for id, l := range img.Leases {
		s.leases[id] = l
	}
	for id, in := range img.Intents {
		s.intents[id] = in
	}
	for role, t := range img.LastIssued {
		s.lastIssued[role] = t
	}
	s.groupID = img.GroupID
	return s, nil
}
