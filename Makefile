# meshagent: the two commands a fresh machine needs are `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo bench bench-scale docs proto clean

setup:  ## install system packages, kernel headers for bcc, bpffs, the venv (idempotent)
	bash scripts/setup.sh

test: setup  ## the whole test suite (what CI runs)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup  ## the demo of what meshagent does today (DATAPATH=nftables: on the nftables datapath; KVSTOREMESH=1: through KVStoreMesh; CILIUM_PEER=1: cluster2 a Cilium cluster)
	$(PY) scripts/demo.py --datapath $(or $(DATAPATH),ebpf) $(if $(KVSTOREMESH),--kvstoremesh) $(if $(CILIUM_PEER),--cilium-peer)

bench: setup  ## the benchmarks beside their floors; writes bench/results/*.json and docs/performance.md (--quick: short)
	$(PY) bench/run.py $(BENCH_ARGS)

bench-scale: setup  ## a million remote entries and the update-rate curves; adds them to docs/performance.md
	$(PY) bench/run.py --scale $(BENCH_ARGS)

docs: setup  ## regenerate docs/plugin-hooks.md from the hook specs
	$(PY) scripts/hookdocs.py > docs/plugin-hooks.md

proto: setup  ## regenerate core/observe/api/*/*_pb2*.py from the Hubble .proto files
	$(PY) scripts/genproto.py

clean:
	rm -rf $(VENV) build dist *.egg-info contrib/*/*.egg-info .pytest_cache
