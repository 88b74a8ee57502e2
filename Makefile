# The README's two commands live here: `make demo` and `make test`. Both set up what they need
# (Debian packages, the virtualenv, the native build) and can be run again at any time.
SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
PY := $(VENV)/bin/python
STAMPS := .make
APT_PACKAGES := build-essential pkg-config python3 python3-venv python3-dev libtss2-dev \
	libssl-dev swtpm swtpm-tools tpm2-tools mosquitto udev prometheus systemd libcap2-bin \
	slurmd slurmctld slurm-client munge libslurm-dev
NVML_SIM := native/nvml-sim/build/libnvidia-ml.so.1

.PHONY: demo test deps native proto lint typecheck pytest deb clean

$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,tpm]'
	@touch $@

deps: $(STAMPS)/venv

native: $(STAMPS)/apt
	@$(MAKE) -s -C native/nvml-sim
	@$(MAKE) -s -C native/dcmi-sim
	@$(MAKE) -s -C native/slurm-spank
	@$(MAKE) -s -C native/imafast

proto: deps
	@$(PY) tools/gen_proto.py

lint: deps
	@$(VENV)/bin/ruff check agent tests hwtests tools
	@$(VENV)/bin/ruff format --check agent tests hwtests tools

typecheck: deps
	@$(VENV)/bin/mypy

# Three workers (pytest-xdist) on two cores: most tests wait on real processes (agents,
# controllers, mosquitto, swtpm), and the CPUs were idle a quarter of the time with two: with
# 2132 tests, two workers took 966 s of pytest, three 819 s (one at a time took 16 minutes for
# 1300 tests). The slowest tests are listed at the end, to keep the suite under 15 minutes. Each worker runs in a PID namespace of its own (tools/xdist-python): see there why.
pytest: deps native
	@$(VENV)/bin/pytest -q -d --tx 3*popen//python=tools/xdist-python --durations=15

test: lint typecheck pytest

demo: deps native
	@bash tools/demo.sh

# The Debian package (docs/operations.md, "Install"): build/accelguard_<version>_<arch>.deb, built
# from the files git lists (packaging/deb/build.sh says what goes where). Rebuilt only when one
# of them (or this Makefile) changed; the dependencies' wheels are kept in build/deb/wheelhouse.
# `pytest` does not depend on it: tests/packaging/test_deb.py runs `make deb` itself, on one
# worker while the other runs tests.
DEB := $(or $(shell packaging/deb/build.sh --name 2>/dev/null),build/accelguard.deb)
DEB_INPUTS := $(wildcard $(shell git ls-files --cached --others --exclude-standard -- \
	agent native/imafast native/nvml-sim native/dcmi-sim native/slurm-spank native/scrub systemd \
	docs packaging \
	pyproject.toml README.md 2>/dev/null))

deb: $(DEB)

$(DEB): $(STAMPS)/apt Makefile $(DEB_INPUTS)
	@packaging/deb/build.sh $@

clean:
	@$(MAKE) -s -C native/nvml-sim clean
	@$(MAKE) -s -C native/dcmi-sim clean
	@$(MAKE) -s -C native/slurm-spank clean
	@$(MAKE) -s -C native/imafast clean
	@rm -rf $(STAMPS) build .pytest_cache .mypy_cache .ruff_cache
