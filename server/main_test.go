package server

import (
	"os"
	"testing"

	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestMain lets pgtest start the throwaway PostgreSQL server the handler
// tests share (each test gets its own target in it) when the first of
// them asks for it, and stops it afterwards. Tests that never ask (the
// request fuzz, unit tests) run without one.
func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
