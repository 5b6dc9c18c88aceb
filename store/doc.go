// Package store owns lease persistence: the bbolt file that holds leases,
// intents and the indexes over them, and the on-disk format of all three.
//
// It implements broker.LeaseStore and nothing outside this package knows the
// store is bbolt, so a distributed backend (etcd) can replace it later. The
// whole on-disk layout (buckets, key codecs, schema version) is in schema.go;
// the record encodings are in record.go.
//
// Crash safety rests on two rules kept by every write: a lease and its index
// entry change in the same transaction, and a lease replaces its intent in
// the same transaction. The expiry index holds exactly the live leases, so the
// expiry manager can rebuild its heap at start-up from the index alone; the
// tombstone index holds exactly the terminal ones, so retention can purge the
// oldest first without reading every record.
package store
