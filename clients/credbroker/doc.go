// Package credbroker is the Go client of credbroker: Dial, the unary
// CredentialService and AdminService calls (errors keep their gRPC codes,
// so status.Code(err) works), and the Keeper, which holds a credential
// alive over one KeepAlive stream shared by every Keeper of a Client,
// reconnects when the broker restarts, and replaces it with a fresh
// credential before the max TTL (make-before-break).
//
// The password of a Credential is never logged by this package, and
// Credential's String and LogValue methods hide it.
package credbroker
