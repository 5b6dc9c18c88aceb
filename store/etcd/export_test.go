package etcd

import "sync"

// SetScanPage sets how many keys a scan's range read returns, until the
// test ends (the caller restores it with the returned func).
func SetScanPage(n int64) (restore func()) {
	old := scanPage
	scanPage = n
	return func() { scanPage = old }
}

// SetPageHook runs hook after each range read of a scan but the last.
func SetPageHook(hook func()) (restore func()) {
	old := testHookPage
	testHookPage = hook
	return func() { testHookPage = old }
}

// SetUpdateReadHook runs hook in UpdateLeases after it read the records,
// before it commits.
func SetUpdateReadHook(hook func()) (restore func()) {
	old := testHookUpdateRead
	testHookUpdateRead = hook
	return func() { testHookUpdateRead = old }
}

// SetWatchStartHook runs hook with the revision each change-feed watch
// starts from, before the watch is opened.
func SetWatchStartHook(hook func(rev int64)) (restore func()) {
	old := testHookWatchStart
	testHookWatchStart = hook
	return func() { testHookWatchStart = old }
}

// SessionLease is the id of the etcd lease the store's stream marks live
// on, 0 when none is granted.
func SessionLease(s *Store) int64 {
	s.marks.mu.Lock()
	defer s.marks.mu.Unlock()
	return int64(s.marks.lease)
}

// Crash stops the store as a killed process would: the client goes, and
// with it the keep-alives of its session, which is not revoked.
func Crash(s *Store) {
	s.doneCancel()
	_ = s.cli.Close()
}

// Reads is how many read requests the store has sent to etcd.
func Reads(s *Store) int64 { return s.reads.Load() }

// Writes is how many write Txns the store has sent to etcd.
func Writes(s *Store) int64 { return s.writes.Load() }

// HoldGroupCommit makes the group committer's next Txn wait: entered is
// closed once it waits, and release lets it (and every later one) go.
func HoldGroupCommit() (entered <-chan struct{}, release func()) {
	in, out := make(chan struct{}), make(chan struct{})
	var first sync.Once
	hook := func() {
		first.Do(func() { close(in) })
		<-out
	}
	testHookGroupCommit.Store(&hook)
	var once sync.Once
	return in, func() {
		once.Do(func() {
			testHookGroupCommit.Store(nil)
			close(out)
		})
	}
}

// PendingGroup is how many writes wait for the group committer.
func PendingGroup(s *Store) int {
	s.group.mu.Lock()
	defer s.group.mu.Unlock()
	return len(s.group.pending)
}
