package server

import (
	"context"
	"fmt"
	"testing"

	"github.com/credbroker/credbroker/broker"
	pb "github.com/credbroker/credbroker/proto/credbroker/v1"
)

func resp(id string, ev pb.KeepAliveEvent, msg string) *pb.KeepAliveResponse {
	return &pb.KeepAliveResponse{Lease: &pb.Lease{Id: id}, Event: ev, Message: msg}
}

const (
	evRenewed  = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_RENEWED
	evMaxTTL   = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_MAX_TTL_REACHED
	evRevoked  = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_REVOKED
	evNotFound = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_NOT_FOUND
	evNone     = pb.KeepAliveEvent_KEEP_ALIVE_EVENT_UNSPECIFIED
)

func messages(rs []*pb.KeepAliveResponse) []string {
	out := make([]string, len(rs))
	for i, r := range rs {
		out[i] = r.GetLease().GetId() + ":" + r.GetMessage()
	}
	return out
}

func TestOutbox(t *testing.T) {
	tests := []struct {
		name string
		run  func(o *outbox)
		want []string
	}{
		{"newest state wins", func(o *outbox) {
			o.put("a", resp("a", evRenewed, "1"), 1, false)
			o.put("a", resp("a", evRenewed, "2"), 2, true)
		}, []string{"a:2"}},
		{"an older event never replaces a newer answer", func(o *outbox) {
			o.put("a", resp("a", evRenewed, "new"), 5, false)
			o.put("a", resp("a", evRenewed, "old"), 4, true)
		}, []string{"a:new"}},
		{"an event of the same revision keeps the answer", func(o *outbox) {
			o.put("a", resp("a", evMaxTTL, "answer"), 5, false)
			o.put("a", resp("a", evRenewed, "event"), 5, true)
		}, []string{"a:answer"}},
		{"every request gets an answer", func(o *outbox) {
			o.put("a", resp("a", evRenewed, "event"), 5, true)
			o.put("a", resp("a", evRenewed, "answer"), 5, false)
		}, []string{"a:answer"}},
		{"gone outranks a later error answer", func(o *outbox) {
			o.put("a", resp("a", evRevoked, "revoked"), 7, true)
			o.put("a", resp("a", evNone, "bad increment"), 0, false)
			o.put("a", resp("a", evRenewed, "stale"), 6, false)
		}, []string{"a:revoked"}},
		{"slots keep first-come order", func(o *outbox) {
			o.put("b", resp("b", evRenewed, "1"), 1, false)
			o.put("a", resp("a", evNotFound, "1"), 0, false)
			o.put("b", resp("b", evRenewed, "2"), 2, false)
		}, []string{"b:2", "a:1"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o := newOutbox()
			tc.run(o)
			got := messages(o.drain())
			if len(got) != len(tc.want) {
				t.Fatalf("drained %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("drained %v, want %v", got, tc.want)
				}
			}
			if rest := o.drain(); len(rest) != 0 {
				t.Errorf("second drain = %v", messages(rest))
			}
		})
	}
}

func TestOutboxDropsEventsAlreadySent(t *testing.T) {
	o := newOutbox()
	o.track("a")
	o.put("a", resp("a", evRenewed, "answer"), 3, false)
	o.drain()
	// The broker publishes the renewal it just answered: not sent twice.
	o.put("a", resp("a", evRenewed, "event"), 3, true)
	if got := o.drain(); len(got) != 0 {
		t.Errorf("duplicate event sent: %v", messages(got))
	}
	o.put("a", resp("a", evRenewed, "newer"), 4, true)
	if got := messages(o.drain()); len(got) != 1 || got[0] != "a:newer" {
		t.Errorf("newer event: %v", got)
	}
	// The broker's event of a renewal went out before the renewal's answer
	// was queued: the answer would repeat it and is dropped, once.
	o.put("a", resp("a", evMaxTTL, "event"), 5, true)
	o.drain()
	o.put("a", resp("a", evMaxTTL, "answer"), 5, false)
	if got := o.drain(); len(got) != 0 {
		t.Errorf("answer repeating the event sent: %v", messages(got))
	}
	o.put("a", resp("a", evMaxTTL, "next request"), 5, false)
	if got := messages(o.drain()); len(got) != 1 || got[0] != "a:next request" {
		t.Errorf("a second request at the max TTL got %v, want an answer", got)
	}
	// Nothing older than what was sent goes out, whatever its source.
	o.put("a", resp("a", evRenewed, "stale answer"), 4, false)
	if got := o.drain(); len(got) != 0 {
		t.Errorf("stale answer sent: %v", messages(got))
	}

}

// A lease released after its terminal event (retired) still absorbs the
// answer to a request made before the end, which comes after the event:
// the client gets REVOKED once. A later request is answered, and only the
// last retiredMax released leases keep their state.
func TestOutboxRetiredLeaseGetsOneTerminalState(t *testing.T) {
	o := newOutbox()
	o.track("a")
	o.put("a", resp("a", evRenewed, "event of the renewal"), 5, true)
	o.drain()
	o.put("a", resp("a", evRevoked, "event"), 7, true)
	o.retire("a") // the forwarder releases the lease at its terminal event
	if got := messages(o.drain()); len(got) != 1 || got[0] != "a:event" {
		t.Fatalf("drained %v, want the REVOKED event", got)
	}
	// The renewal's own answer: it found the lease revoked.
	o.put("a", resp("a", evRevoked, "late answer"), 7, false)
	if got := o.drain(); len(got) != 0 {
		t.Errorf("a second REVOKED sent: %v", messages(got))
	}
	o.put("a", resp("a", evRevoked, "next request"), 7, false)
	if got := messages(o.drain()); len(got) != 1 || got[0] != "a:next request" {
		t.Errorf("a request after the end got %v, want an answer", got)
	}

	// Named again, then more leases retired than retiredMax: a is
	// tracked throughout; the oldest retired is forgotten.
	o.track("a")
	for i := range retiredMax + 1 {
		id := fmt.Sprintf("r%03d", i)
		o.track(id)
		o.retire(id)
	}
	if _, ok := o.sent["a"]; !ok {
		t.Error("a lease named again was forgotten with the retired ones")
	}
	if _, ok := o.sent["r000"]; ok {
		t.Error("the oldest retired lease is still remembered")
	}
	if n := len(o.sent); n != retiredMax+1 {
		t.Errorf("%d leases remembered, want %d (a and the last %d retired)", n, retiredMax+1, retiredMax)
	}
}

func TestOutboxWaitForRoom(t *testing.T) {
	o := newOutbox()
	if err := o.waitForRoom(context.Background(), 2); err != nil {
		t.Fatal(err)
	}
	o.put("a", resp("a", evRenewed, ""), 0, false)
	o.put("b", resp("b", evRenewed, ""), 0, false)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := o.waitForRoom(ctx, 2); err == nil {
		t.Fatal("waitForRoom returned with a full outbox")
	}
	done := make(chan error, 1)
	go func() { done <- o.waitForRoom(context.Background(), 2) }()
	o.drain()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestOwnerAuthorizer(t *testing.T) {
	var a OwnerAuthorizer
	own := broker.Lease{ID: "x", Client: "svc-a"}
	tests := []struct {
		name               string
		id                 Identity
		admin, issue, mine bool
	}{
		{"admin", Identity{Name: "ops", Admin: true}, true, true, true},
		{"owner", Identity{Name: "svc-a"}, false, true, true},
		{"other", Identity{Name: "svc-b"}, false, true, false},
		{"anonymous", Identity{}, false, false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := a.AuthorizeAdmin(tc.id) == nil; got != tc.admin {
				t.Errorf("AuthorizeAdmin = %v, want %v", got, tc.admin)
			}
			if got := a.AuthorizeIssue(tc.id, "read_only") == nil; got != tc.issue {
				t.Errorf("AuthorizeIssue = %v, want %v", got, tc.issue)
			}
			if got := a.AuthorizeLease(tc.id, own) == nil; got != tc.mine {
				t.Errorf("AuthorizeLease = %v, want %v", got, tc.mine)
			}
		})
	}
	// Anonymous must not own a lease issued to nobody.
	if a.AuthorizeLease(Identity{}, broker.Lease{ID: "y"}) == nil {
		t.Error("anonymous identity may touch a lease with an empty client")
	}
}
