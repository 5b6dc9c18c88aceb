package main

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"

	"github.com/credbroker/credbroker/server/config"
)

// startRuntime validates a parsed configuration, builds its runtime as
// brokerd does, and starts the broker; everything is closed at cleanup.
func startRuntime(t *testing.T, f *config.File, err error) (*config.Config, *config.Runtime) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := f.Validate()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rt, err := config.Build(ctx, cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	if err := rt.Broker.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return cfg, rt
}

// serveLoopback serves gs on a fresh loopback port until cleanup and
// returns its address.
func serveLoopback(t *testing.T, gs *grpc.Server) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return lis.Addr().String()
}
