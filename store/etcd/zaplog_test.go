package etcd

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"go.uber.org/zap"
)

// The etcd client's warnings reach the broker's slog handler with their
// fields; its info-level chatter does not.
func TestZapCore(t *testing.T) {
	var buf bytes.Buffer
	log := zap.New(newZapCore(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})))
	log.Info("balancer picked a new endpoint")
	log.With(zap.String("endpoint", "10.0.0.1:2379")).Warn("retrying", zap.Int("attempt", 3))
	got := buf.String()
	if strings.Contains(got, "balancer") {
		t.Errorf("info-level client log passed: %q", got)
	}
	for _, want := range []string{"level=WARN", "msg=retrying", "component=etcd-client", "endpoint=10.0.0.1:2379", "attempt=3"} {
		if !strings.Contains(got, want) {
			t.Errorf("log %q lacks %q", got, want)
		}
	}
}
