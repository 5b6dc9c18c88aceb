package store

import (
	"context"

	bolt "go.etcd.io/bbolt"

	"github.com/credbroker/credbroker/broker"
)

// PutIntent records that a user is about to be created, replacing any intent
// of the same id. It must be durable before CREATE ROLE runs, which is why
// it is a write of its own rather than part of CreateLease.
func (s *Store) PutIntent(ctx context.Context, in broker.Intent) error {
	val, err := encodeIntent(&in)
	if err != nil {
		return err
	}
	key := leaseKey(in.LeaseID)
	return s.write(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Put(key, val)
	})
}

// DeleteIntent removes an intent; a missing intent is not an error.
func (s *Store) DeleteIntent(ctx context.Context, leaseID string) error {
	key := leaseKey(leaseID)
	return s.write(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).Delete(key)
	})
}

// ListIntents returns every intent in lease id order. Intents are few (one
// per issue in flight, plus those a crash left), so there is no paging.
func (s *Store) ListIntents(ctx context.Context) ([]broker.Intent, error) {
	var out []broker.Intent
	err := s.view(ctx, func(tx *bolt.Tx) error {
		return tx.Bucket(bucketIntents).ForEach(func(k, v []byte) error {
			in, err := decodeIntent(string(k), v)
			if err != nil {
				return err
			}
			out = append(out, in)
			return nil
		})
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}
