package config

import (
	"fmt"
	"net"
	"strconv"
	"strings"
)

// ParseListen splits a listen address into a network and an address for
// net.Listen: "unix:/path" (or "unix:///path", gRPC's spelling) is a unix
// socket, anything else host:port over TCP.
//
// Without TLS, a TCP address must be on loopback: the API
// hands out database passwords, and plaintext gRPC on a routable address
// would hand them to anyone on the path. Host names other than
// "localhost" are refused rather than resolved, since what a name resolves
// to can change after the check.
func ParseListen(addr string) (network, address string, err error) {
	return ParseListenTLS(addr, false)
}

// ParseListenTLS is ParseListen for a server that may serve TLS: with tls
// true, any TCP address is allowed, since callers are then authenticated
// and the credentials they receive are encrypted on the wire.
func ParseListenTLS(addr string, tls bool) (network, address string, err error) {
	if rest, ok := strings.CutPrefix(addr, "unix:"); ok {
		// gRPC spells absolute socket paths unix:///path; accept both.
		rest = strings.TrimPrefix(rest, "//")
		if rest == "" {
			return "", "", fmt.Errorf("listen %s: a unix socket needs a path (unix:/run/credbroker/credbroker.sock)", addr)
		}
		return "unix", rest, nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", "", fmt.Errorf("listen %s: want host:port or unix:/path", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return "", "", fmt.Errorf("listen %s: %q is not a port", addr, port)
	}
	if !tls && !isLoopback(host) {
		return "", "", fmt.Errorf("listen %s: plaintext gRPC is only allowed on loopback or a unix socket; configure tls (cert_file, key_file) or listen on 127.0.0.1", addr)
	}
	return "tcp", addr, nil
}

func isLoopback(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
