# Cinderblock's task runner. These targets are exactly what CI (.ci/run) and users run.
#   make demo            a single-host Cinderblock walking a volume through its life
#                        (file pool + real tgtd on this host); DEMO=vm: the same in the test VMs
#   make test            fmt check, clippy -D warnings, every host test (installs what it needs)
#   make e2e             real-kernel tests in Debian VMs (LVM, iscsiadm, mounts)
#   make e2e-up / e2e-down   a running two-VM stack for outside tools, and its teardown
#   make bench           figures side by side with their baselines
#   make kube            the Helm chart, the Dockerfile lint and the Rust tests against a real
#                        kube-apiserver v1.20.2 (built from Debian's source once, then cached)
SHELL := /bin/bash
CARGO ?= cargo
DEMO ?= host

.PHONY: demo test deps lint unit e2e e2e-up e2e-down bench kube build release clean

build:
	$(CARGO) build

release:
	$(CARGO) build --release

deps:
	@bash tests/e2e/host-deps.sh test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --lib --bins --tests

test: deps lint unit

demo:
	@bash scripts/demo.sh $(DEMO)

e2e:
	@bash tests/e2e/run.sh

e2e-up:
	@bash tests/e2e/up.sh

e2e-down:
	@bash tests/e2e/down.sh

bench:
	@bash scripts/bench.sh

kube:
	@bash tests/kube/run.sh

clean:
	$(CARGO) clean
	rm -rf tests/e2e/.run tests/kube/.run
