package main

import (
	"context"
	"net"
	"testing"

	"github.com/credbroker/credbroker/server/config"
	"github.com/credbroker/credbroker/server/daemon"
)

// serveConfigFile validates a parsed configuration, starts it as brokerd
// does (package daemon) and serves it on lis, or on a fresh loopback port
// when lis is nil, until cleanup. It returns the address served.
func serveConfigFile(t *testing.T, f *config.File, err error, lis net.Listener) string {
	t.Helper()
	addr, _ := serveDaemon(t, f, err, lis)
	return addr
}

// serveDaemon is serveConfigFile that also returns the running daemon.
func serveDaemon(t *testing.T, f *config.File, err error, lis net.Listener) (string, *daemon.Daemon) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	if lis == nil {
		if lis, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	addr := lis.Addr().String()
	if lis.Addr().Network() == "unix" {
		addr = "unix:" + addr
	}
	d, err := daemon.Start(context.Background(), cfg, daemon.Options{Listener: lis, SkipPrivilegeCheck: true})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- d.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-served
		d.Close()
	})
	<-d.Ready()
	return addr, d
}
