package etcd

import "time"

// DefaultSessionTTL is the leadership session's TTL (store.etcd.session_ttl):
// how long a group goes without a leader after its leader dies, and so
// roughly how long a failover takes.
const DefaultSessionTTL = 10 * time.Second

// MinSessionTTL is the shortest session TTL accepted: etcd rounds a lease
// TTL up to whole seconds and to its own minimum (1.5 election timeouts,
// 1.5 s with its defaults), so a shorter one would not mean what it says.
const MinSessionTTL = 2 * time.Second
