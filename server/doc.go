// Package server owns credbroker's gRPC layer: the CredentialService and
// AdminService handlers, authentication (who is calling), authorization
// (what that caller may do), validation of requests at the edge, the
// conversion between protobuf messages and broker types, and the single
// mapping from domain errors to gRPC status codes.
//
// It holds no state of its own beyond the KeepAlive streams it serves:
// leases live in the broker and its store. The dependency points inward:
// server imports broker, never the other way round.
//
// Every request goes through, outermost first: a logging interceptor
// (method, identity, lease id, role, code, duration; never a request or
// response message, because IssueCredentialResponse holds a password), an
// audit interceptor (one chained record per call, see package audit), a
// recovery interceptor (a panic in a handler answers codes.Internal and
// never kills the broker), and the authentication interceptor, which puts
// the caller's Identity in the context and enforces that only admins reach
// AdminService.
package server
