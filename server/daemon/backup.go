package daemon

import (
	"context"
	"io"

	"github.com/credbroker/credbroker/store"
	"github.com/credbroker/credbroker/store/etcd"
)

// Snapshot formats, as BackupStoreResponse.format names them.
const (
	// FormatBBolt is a bbolt file: restore it by putting it at store.path
	// with brokerd stopped.
	FormatBBolt = "bbolt"
	// FormatEtcdExport is an export of the group's etcd prefix, which
	// etcd.Restore loads into an empty prefix.
	FormatEtcdExport = "etcd-export"
)

// BackupStore writes a consistent snapshot of the lease store to w
// (broker.LeaseStore.Snapshot), for AdminService.BackupStore.
func (d *Daemon) BackupStore(ctx context.Context, w io.Writer) (string, int64, error) {
	// This instance's issued leases go into the snapshot as ACTIVE, not as
	// ISSUING (broker/promote.go).
	d.broker.FlushPromotions()
	n, err := d.store.Snapshot(ctx, w)
	if err != nil {
		return "", n, err
	}
	d.log.Info("store backed up", "format", storeFormat(d.store), "bytes", n)
	return storeFormat(d.store), n, nil
}

func storeFormat(s any) string {
	switch s.(type) {
	case *store.Store:
		return FormatBBolt
	case *etcd.Store:
		return FormatEtcdExport
	}
	return "unknown"
}
