package etcd

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
