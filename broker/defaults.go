package broker

import "time"

// Defaults of Config, which New fills in for zero values. brokerd's
// configuration (server/config) and its documentation refer to these.
const (
	DefaultValidUntilGrace     = time.Minute
	DefaultTombstoneRetention  = 24 * time.Hour
	DefaultReconcileInterval   = 5 * time.Minute
	DefaultRevokeConcurrency   = 4
	DefaultRevokeRate          = 1000.0
	DefaultRenewBatches        = 1
	DefaultRenewLinger         = 2 * time.Millisecond
	DefaultIssuePool           = 64
	DefaultRevokeRetries       = 5
	DefaultRetryBaseDelay      = time.Second
	DefaultRetryMaxDelay       = time.Minute
	DefaultFailedRetryInterval = 10 * time.Minute
	DefaultDisconnectGrace     = 30 * time.Second
	DefaultActivityInterval    = 30 * time.Second
)
