// Package daemon is the one way to start a credbroker: it turns a
// validated *config.Config into a running broker (lease store, one
// PostgreSQL engine per target with its root credentials, audit log,
// broker, gRPC server with its security) and shuts it down in order.
// brokerd, `brokerd dev`, the bench and the test harness all start
// through Start; none wires the parts by hand. It plays the part etcd's
// server/embed (StartEtcd) plays for etcd.
//
//	d, err := daemon.Start(ctx, cfg, daemon.Options{Logger: log})
//	if err != nil { ... }
//	defer d.Close()
//	err = d.Serve(ctx) // until ctx is done, then a graceful stop
//
// Check runs the same start-up checks without opening the store or a
// socket, for `brokerd check` beside a running brokerd.
package daemon
