//go:build tools

// Package tools pins promtool's module: `make promtool` builds
// github.com/prometheus/prometheus/cmd/promtool from this module's go.mod.
package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
