package main

import (
	"bufio"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/credbroker/credbroker/store/etcd/etcdcluster"
)

// etcdCounts are the members' request counters, summed over the members
// that answered: what a phase asked of etcd, read from each member's
// /metrics.
type etcdCounts struct {
	txn, rng float64 // gRPC Txn and Range requests handled
	puts     float64 // keys put (every member applies each one)
	members  int
}

var metricsClient = &http.Client{Timeout: 2 * time.Second}

func scrapeMembers(members []*etcdcluster.Member) etcdCounts {
	var c etcdCounts
	for _, m := range members {
		resp, err := metricsClient.Get(m.ClientURL + "/metrics")
		if err != nil {
			continue
		}
		c.members++
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			i := strings.LastIndexByte(line, ' ')
			if i < 0 || strings.HasPrefix(line, "#") {
				continue
			}
			name := line[:i]
			var dst *float64
			switch {
			case name == "etcd_mvcc_put_total":
				dst = &c.puts
			case strings.HasPrefix(name, "grpc_server_handled_total{") && strings.Contains(name, `grpc_method="Txn"`):
				dst = &c.txn
			case strings.HasPrefix(name, "grpc_server_handled_total{") && strings.Contains(name, `grpc_method="Range"`):
				dst = &c.rng
			default:
				continue
			}
			if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
				*dst += v
			}
		}
		_ = resp.Body.Close()
	}
	return c
}

func (c etcdCounts) minus(o etcdCounts) etcdCounts {
	return etcdCounts{txn: c.txn - o.txn, rng: c.rng - o.rng, puts: c.puts - o.puts, members: min(c.members, o.members)}
}

// perOp formats the requests of n operations: Txn and Range requests per
// operation, and keys each member put per operation.
func (c etcdCounts) perOp(n int) string {
	if n == 0 || c.members == 0 {
		return "-"
	}
	f := float64(n)
	return fmt.Sprintf("%.2f Txn, %.2f Range, %.2f keys", c.txn/f, c.rng/f, c.puts/float64(c.members)/f)
}
