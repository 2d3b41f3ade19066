# krun-core: every binary is static (pure Go, CGO_ENABLED=0).
GO ?= go
export CGO_ENABLED := 0

# grpcnotrace leaves out gRPC's golang.org/x/net/trace (and with it
# html/template): nothing here enables gRPC tracing, and every binary that
# links gRPC starts a little faster without it (docs/BENCHMARKS.md, start-up).
GOTAGS ?= grpcnotrace
BUILD := build -trimpath -tags '$(GOTAGS)'

PLUGINS := $(notdir $(wildcard plugins/*))
BINS := bin/krun-core bin/krun-oci bin/krun-sandbox-exec bin/krun-init $(addprefix bin/krun-plugin-,$(PLUGINS)) bin/krun-bench

.PHONY: all test unit race conformance bench fuzz deps kernel vet fmt clean FORCE

all: $(BINS)

# krun-core --version names the commit it was built from.
VERSION ?= $(shell git describe --always --dirty 2>/dev/null)

bin/krun-core: FORCE
	$(GO) $(BUILD) -ldflags "-X main.buildVersion=$(VERSION)" -o $@ ./cmd/krun-core

# The benchmark driver (the Go test guest), apart from the production binary.
bin/krun-bench: FORCE
	$(GO) $(BUILD) -ldflags "-X main.buildVersion=$(VERSION)" -o $@ ./cmd/krun-bench

# The OCI runtime (docs/OCI.md).
bin/krun-oci: FORCE
	$(GO) $(BUILD) -o $@ ./cmd/krun-oci

bin/krun-sandbox-exec: FORCE
	$(GO) $(BUILD) -o $@ ./cmd/krun-sandbox-exec

# The guest's PID 1 for `run --root DIR -- CMD` (static, like everything).
bin/krun-init: FORCE
	$(GO) $(BUILD) -o $@ ./guest/init

bin/krun-plugin-%: FORCE
	$(GO) $(BUILD) -o $@ ./plugins/$*

# Debian packages the tests need (qemu, qemu-utils, passt, busybox-static, ...).
deps:
	./scripts/install-deps.sh

# Debian's stock kernel for krun-core run, into ~/.cache/krun-core/kernel
# (outside the repository); prints how to use it.
kernel:
	./scripts/fetch-kernel.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

# The whole suite, end-to-end tests with QEMU included, then the packages
# whose goroutines share state with the race detector on.
test: deps all vet
	$(GO) test -timeout 75m ./...
	$(MAKE) race

# The race detector over the packages where goroutines meet: the vCPU
# transport, the plugin host, the vhost-user framework and ring engine,
# the virtio-fs server, the console bridge, the virtio-blk and virtio-net
# devices, the disk images and krun-init (its stdio protocol). It needs cgo (gcc), so the sandbox's own tests, which
# launch the test binary as a static plugin, are not among them. qcow2's
# single-threaded model, corpus and crash tests (a child process killed
# mid-write) take minutes under the detector and share no state between
# goroutines: RACE_SKIP leaves them to the plain run.
RACE_PKGS := ./core/mmio ./core/pluginhost ./vhostuser/... ./devices/fs/... ./devices/console/... ./devices/blk/... ./devices/net/... ./disk/... ./guest/... ./internal/ratelog ./internal/syncbuf
# run's error paths, whose output pipes are copied by goroutines into the
# caller's writer while run writes its own line there (CI of stop 45).
RACE_RUN_CLI := ^(TestRunEarlyFailureKeepsItsLine|TestOutputPipesCopyAllBeforeClose|TestRunRootErrors|TestRunUsageErrors)$$
RACE_SKIP := ^(TestModel|TestCorpusMatchesQemu|TestKillKeepsAcknowledgedWrites|TestCrashLeaksAtWorst|TestResizeOverBackingCrash|TestManySnapshotsBoundedOverlapWork)$$
race:
	CGO_ENABLED=1 $(GO) test -race -short -timeout 20m -skip '$(RACE_SKIP)' $(RACE_PKGS)
	CGO_ENABLED=1 $(GO) test -race -short -timeout 5m -run '$(RACE_RUN_CLI)' ./cmd/krun-core

# The runtime-spec conformance programs (opencontainers/runtime-tools)
# krun-oci claims, nested: about 12 minutes (docs/OCI.md). `make test`
# runs a smoke subset of them.
conformance: all
	KRUN_OCI_RUNTIME_TOOLS=claimed $(GO) test -count=1 -run 'TestRuntimeTools$$' -timeout 60m ./e2e/oci/

# Every fuzz target in turn, FUZZTIME each (default 30s); FUZZ='Regexp'
# picks targets by name, FUZZ_PKGS packages, FUZZ_PARALLEL workers (1).
fuzz:
	GO="$(GO)" ./scripts/fuzz-all.sh

# Unit tests only (no QEMU guests).
unit:
	$(GO) test -short ./...

# The whole comparison in one run (krun-bench all): blk-raw and blk-qcow2
# against qemu-storage-daemon and fio, virtio-fs against virtiofsd, serve's
# start-up against qemu-storage-daemon's, in alternating rounds; prints a
# table of medians and ratios. Run it alone on the machine (on a shared
# one: flock /tmp/krun-heavy.lock make bench).
# BENCH_FLAGS passes options, e.g. BENCH_FLAGS="--rounds 3 --seconds 1".
BENCH_FLAGS ?=
bench: all
	./bin/krun-bench all $(BENCH_FLAGS)

clean:
	rm -rf bin
