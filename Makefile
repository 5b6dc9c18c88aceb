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

.PHONY: dev test test-race lint generate tools postgres build bench clean

## dev: a throwaway PostgreSQL cluster, demo proxy roles, the broker on 127.0.0.1:7450.
dev: postgres
	$(GO) run ./cmd/brokerd dev

## test: the whole test suite against real PostgreSQL clusters it starts itself.
test: postgres
	$(GO) vet ./...
	$(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...

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

build:
	$(GO) build -o bin/ ./cmd/...

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

clean:
	rm -rf bin .bin
