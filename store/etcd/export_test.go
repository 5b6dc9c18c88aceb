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
