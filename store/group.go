package store

import (
	"context"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// GroupID returns the broker group's id, kept in the meta bucket; the
// first call on a new file creates it. The read and the creation are one
// write transaction, so two first calls agree (bbolt has one writer).
func (s *Store) GroupID(ctx context.Context) (string, error) {
	var id string
	err := s.view(ctx, func(tx *bolt.Tx) error {
		id = string(tx.Bucket(bucketMeta).Get(metaKeyGroupID))
		return nil
	})
	if err != nil || id != "" {
		return id, err
	}
	fresh := broker.NewGroupID()
	err = s.write(ctx, func(tx *bolt.Tx) error {
		meta := tx.Bucket(bucketMeta)
		if v := meta.Get(metaKeyGroupID); len(v) > 0 {
			id = string(v) // created meanwhile: the first one stays
			return nil
		}
		id = fresh
		return meta.Put(metaKeyGroupID, []byte(fresh))
	})
	if err != nil {
		return "", fmt.Errorf("store group id: %w", err)
	}
	return id, nil
}
