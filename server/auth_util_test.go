package server

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"os"
	"testing"

	"google.golang.org/grpc/metadata"

	"github.com/credbroker/credbroker/audit"
	"github.com/credbroker/credbroker/broker"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

func parseRecords(t *testing.T, data []byte) []audit.Record {
	t.Helper()
	var out []audit.Record
	for _, line := range bytes.Split(bytes.TrimSpace(data), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var r audit.Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("audit line %q: %v", line, err)
		}
		out = append(out, r)
	}
	return out
}

// findRecord returns the first record matching pred.
func findRecord(recs []audit.Record, pred func(audit.Record) bool) (audit.Record, bool) {
	for _, r := range recs {
		if pred(r) {
			return r, true
		}
	}
	return audit.Record{}, false
}

func readFileString(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func brokerFilterClient(client string) broker.LeaseFilter {
	return broker.LeaseFilter{Client: client}
}

func metadataContext(ctx context.Context, kv ...string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, kv...)
}
