package server

import (
	"os"
	"testing"

	"github.com/credbroker/credbroker/internal/pgtest"
)

// TestMain starts the throwaway PostgreSQL server the handler tests share
// (each test gets its own target in it) and stops it afterwards.
func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }
