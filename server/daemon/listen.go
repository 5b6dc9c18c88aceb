package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/credbroker/credbroker/server/config"
)

// Listen binds the gRPC address addr as brokerd does. A unix socket left
// behind by a killed brokerd is removed, but only if nothing answers on
// it; the new socket is made 0600, since whoever can connect is trusted as
// admin. tls says whether the server will serve TLS, which lets it bind
// beyond loopback (see config.ParseListenTLS).
func Listen(addr string, tls bool) (net.Listener, error) {
	network, address, err := config.ParseListenTLS(addr, tls)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(address); err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
	}
	lis, err := net.Listen(network, address)
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return nil, fmt.Errorf("listen %s: address already in use (is another brokerd running?)", addr)
		}
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	if network == "unix" {
		if err := os.Chmod(address, 0o600); err != nil {
			lis.Close()
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
	}
	return lis, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket", path)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return errors.New("address already in use (is another brokerd running?)")
	}
	return os.Remove(path)
}
