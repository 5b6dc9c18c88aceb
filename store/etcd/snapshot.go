package etcd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// exportFormat names the export Snapshot writes and Restore reads: JSON
// lines, a header and then one line per key under the prefix, the key
// relative to the prefix, so an export restores under any prefix.
const exportFormat = "credbroker-etcd-export"

type exportHeader struct {
	Format  string `json:"format"`
	Version int    `json:"version"`
	// Newest is the newest mod revision among the keys exported: every
	// change up to it is in the export.
	Newest int64 `json:"newest_mod_revision"`
}

type exportKV struct {
	Key   string `json:"k"`
	Value []byte `json:"v"`
}

// snapshotPage is how many keys one range read of a snapshot returns.
const snapshotPage = 1000

// Snapshot writes every key under the prefix, read at one revision (the
// first page's; a compaction meanwhile starts it again), to w as an
// export that Restore loads into an empty prefix. It gathers the export
// before writing it, so w never sees a restarted scan.
func (s *Store) Snapshot(ctx context.Context, w io.Writer) (int64, error) {
	release, err := s.enter(ctx)
	if err != nil {
		return 0, err
	}
	defer release()
	var buf bytes.Buffer
	var rev int64
	err = s.consistent(ctx, "Snapshot", func() { buf.Reset(); rev = 0 }, func() error {
		var kvs bytes.Buffer
		enc := json.NewEncoder(&kvs)
		from, end := s.keys.prefix, clientv3.GetPrefixRangeEnd(s.keys.prefix)
		err := s.scanAt(ctx, from, end, constPage(snapshotPage), func(kv *mvccpb.KeyValue) (bool, error) {
			rev = max(rev, kv.ModRevision)
			return true, enc.Encode(exportKV{Key: string(kv.Key[len(s.keys.prefix):]), Value: kv.Value})
		})
		if err != nil {
			return err
		}
		if err := json.NewEncoder(&buf).Encode(exportHeader{Format: exportFormat, Version: 1, Newest: rev}); err != nil {
			return err
		}
		_, err = buf.Write(kvs.Bytes())
		return err
	})
	if err != nil {
		return 0, err
	}
	return buf.WriteTo(w)
}

// Restore loads an export that Snapshot wrote into the empty prefix of
// opts (the keys are relative, so any prefix), in transactions of at most
// maxTxnOps keys and maxTxnBytes, each guarded by "the group key does not
// exist yet" until the last, which writes it: a restore that fails
// half-way leaves a prefix no broker will take for a group's (run it
// again after deleting the prefix). A prefix that holds any key is
// refused. It returns the number of keys restored. Restore with every
// brokerd of the group stopped.
func Restore(ctx context.Context, opts Options, r io.Reader) (int, error) {
	s, err := Open(ctx, opts)
	if err != nil {
		return 0, err
	}
	defer s.Close()
	resp, err := s.get(ctx, s.keys.prefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		return 0, errRead("Restore", err)
	}
	if resp.Count > 0 {
		return 0, fmt.Errorf("etcd restore: prefix %q holds %d keys; restore into an empty prefix", s.keys.prefix, resp.Count)
	}
	dec := json.NewDecoder(bufio.NewReader(r))
	var h exportHeader
	if err := dec.Decode(&h); err != nil || h.Format != exportFormat {
		return 0, fmt.Errorf("etcd restore: not a %s file", exportFormat)
	}
	if h.Version != 1 {
		return 0, fmt.Errorf("etcd restore: export version %d; this brokerd reads version 1", h.Version)
	}
	groupKey := s.keys.group()
	var (
		ops   []clientv3.Op
		group *clientv3.Op
		size  int
		n     int
	)
	flush := func(last bool) error {
		if last && group != nil {
			ops = append(ops, *group)
		}
		if len(ops) == 0 {
			return nil
		}
		cmp := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(groupKey), "=", 0)}
		resp, err := s.commit(ctx, "Restore", cmp, ops, nil)
		if err != nil {
			return err
		}
		if !resp.Succeeded {
			return fmt.Errorf("etcd restore: a broker group took prefix %q meanwhile", s.keys.prefix)
		}
		ops, size = ops[:0], 0
		return nil
	}
	for {
		var kv exportKV
		if err := dec.Decode(&kv); err == io.EOF {
			break
		} else if err != nil {
			return n, fmt.Errorf("etcd restore: line %d: %w", n+2, err)
		}
		op := clientv3.OpPut(s.keys.prefix+kv.Key, string(kv.Value))
		n++
		if s.keys.prefix+kv.Key == groupKey {
			group = &op
			continue
		}
		if len(ops)+1 > maxTxnOps-1 || size+len(kv.Key)+len(kv.Value) > maxTxnBytes/2 {
			if err := flush(false); err != nil {
				return n, err
			}
		}
		ops = append(ops, op)
		size += len(s.keys.prefix) + len(kv.Key) + len(kv.Value)
	}
	return n, flush(true)
}
