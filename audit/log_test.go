package audit

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

func verifyFile(t *testing.T, path string) (VerifyResult, []Record) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	res, err := Verify(bytes.NewReader(data), nil)
	if err != nil {
		t.Fatalf("%s does not verify: %v", path, err)
	}
	var recs []Record
	for _, line := range bytes.Split(bytes.TrimSuffix(data, []byte("\n")), []byte("\n")) {
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatal(err)
		}
		recs = append(recs, r)
	}
	return res, recs
}

func openLog(t *testing.T, path string) *Log {
	t.Helper()
	l, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l
}

// The file is written in append mode: when something truncates it under
// brokerd (logrotate's copytruncate), the next record starts the file
// again instead of landing at the old offset behind a run of zero bytes.
func TestWritesAppendAfterTruncation(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := openLog(t, path)
	for range 3 {
		if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Truncate(path, 0); err != nil {
		t.Fatal(err)
	}
	if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) == 0 || data[0] != '{' || bytes.Count(data, []byte("\n")) != 1 {
		t.Fatalf("after truncation the file holds %q, want the one new record", data)
	}
}

// Reopen (SIGHUP) after the file was moved away starts a new file whose
// chain verifies on its own and names where the old one ended.
func TestReopenAfterRotation(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	l := openLog(t, path)
	for range 2 {
		if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Rename(path, path+".1"); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatalf("Reopen: %v", err)
	}
	if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err != nil {
		t.Fatal(err)
	}
	old, oldRecs := verifyFile(t, path+".1")
	cur, recs := verifyFile(t, path)
	if len(oldRecs) != 2 || len(recs) != 2 {
		t.Fatalf("old file has %d records, new %d; want 2 and 2", len(oldRecs), len(recs))
	}
	if recs[0].Event != EventReopened || recs[0].Seq != 3 || cur.LastSeq != 4 {
		t.Errorf("new file starts with %s seq %d and ends at seq %d; want reopened 3 .. 4", recs[0].Event, recs[0].Seq, cur.LastSeq)
	}
	if want := "ended at seq 2 with head " + old.Head; !strings.Contains(recs[0].Message, want) {
		t.Errorf("reopened record %q does not say %q", recs[0].Message, want)
	}

	// Reopening a file that was not moved continues its chain.
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	if _, recs := verifyFile(t, path); len(recs) != 3 || recs[2].Event != EventReopened {
		t.Fatalf("after a second Reopen the file holds %d records", len(recs))
	}
}

// A log whose writes fail says so (Err, Healthy, its watchers) and
// recovers once it can write again, with a record of what was lost.
func TestWriteFailureAndRecovery(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "audit.log")
	// Writes to /dev/full fail with ENOSPC, as on a full disk.
	if err := os.Symlink("/dev/full", path); err != nil {
		t.Fatal(err)
	}
	l := openLog(t, path)
	var mu sync.Mutex
	var seen []error
	l.Watch(func(err error) {
		mu.Lock()
		defer mu.Unlock()
		seen = append(seen, err)
	})
	for range 2 {
		if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err == nil {
			t.Fatal("write to a full device succeeded")
		}
	}
	if l.Err() == nil || l.Healthy() == nil {
		t.Fatalf("after failed writes: Err %v, Healthy %v", l.Err(), l.Healthy())
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatalf("Reopen: %v", err)
	}
	if err := l.Healthy(); err != nil {
		t.Fatalf("Healthy after Reopen: %v", err)
	}
	mu.Lock()
	if len(seen) != 2 || seen[0] == nil || seen[1] != nil {
		t.Errorf("watcher saw %v, want one error then nil", seen)
	}
	mu.Unlock()
	_, recs := verifyFile(t, path)
	if len(recs) != 2 || recs[0].Event != EventResumed || recs[1].Event != EventReopened {
		t.Fatalf("records after recovery: %+v", recs)
	}
	if !strings.Contains(recs[0].Message, "2 records could not be written") {
		t.Errorf("resumed record %q does not count the 2 lost records", recs[0].Message)
	}
}

// A log whose writes fail tries again on its own, every RetryInterval, and
// turns healthy without a record to write or a Reopen (space was freed).
func TestRetryRecoversWithoutAWrite(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{RetryInterval: time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	states := make(chan error, 4)
	l.Watch(func(err error) { states <- err })

	// Stand in for a full disk: the same file, opened read-only, refuses
	// writes; putting the writable descriptor back is the space freed.
	bad, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer bad.Close()
	l.mu.Lock()
	good := l.f
	l.f = bad
	l.mu.Unlock()
	if err := l.Write(Record{Event: EventStart, Outcome: OutcomeOK}); err == nil {
		t.Fatal("write to a read-only descriptor succeeded")
	}
	if err := <-states; err == nil {
		t.Fatal("watcher told nil, want the write error")
	}
	l.mu.Lock()
	l.f = good
	l.mu.Unlock()
	select {
	case err := <-states:
		if err != nil {
			t.Fatalf("watcher told %v, want nil (recovered)", err)
		}
	case <-time.After(10 * time.Second): // a bound on a hang, not a sleep
		t.Fatal("the log did not recover on its own")
	}
	_, recs := verifyFile(t, path)
	if len(recs) != 1 || recs[0].Event != EventResumed || !strings.Contains(recs[0].Message, "1 records could not be written") {
		t.Fatalf("records after recovery: %+v", recs)
	}
}
