# TensorBridge: `make demo` runs the bundled model from PHP; `make test` runs every test.
# Both install what they need first (Debian packages and the Python package).

PYTHON ?= python3
export PYTHONDONTWRITEBYTECODE = 1
# Tests, demo and benchmarks run this checkout's code even where another copy of the
# package is installed (the editable install is only for the dependencies and the command).
export PYTHONPATH := $(CURDIR)/python/src$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup demo demo-stop test test-python test-php lint bench bench-quick vectors clean soak fuzz ext

APT_PACKAGES = php8.2-cli php8.2-fpm php8.2-curl php8.2-gd phpunit composer nginx-light wrk \
  chromium chromium-driver
# The semantic-search example (examples/search/): its database and PHP's PDO driver for it.
APT_PACKAGES += postgresql php8.2-pgsql
# promtool (Debian package prometheus, without its recommends) checks deploy/prometheus/; the
# Prometheus service the package enables on a systemd host is switched off again.
APT_TOOLS = prometheus

# Installs: PHP (CLI, FPM; curl and gd for the benchmark baselines), phpunit, composer, nginx
# and wrk, chromium and chromium-driver for the web demo's browser test (apt, only when
# missing), torch 2.13.0 (the CPU wheel; a looser pin pulls CUDA builds), and this checkout's
# tensorbridge package, editable, with its dev and bench extras. Whether the Python part is
# there is decided by what pip installed (scripts/installed.py, run outside the tree with no
# PYTHONPATH), never by what the source tree can import.
setup:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing $(APT_PACKAGES) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(APT_PACKAGES) >/dev/null; fi
	@if ! dpkg -s $(APT_TOOLS) >/dev/null 2>&1; then \
	  echo "installing $(APT_TOOLS) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(APT_TOOLS) >/dev/null && \
	  { systemctl disable --now prometheus >/dev/null 2>&1 || true; }; fi
	@cd / && env -u PYTHONPATH $(PYTHON) $(CURDIR)/scripts/installed.py $(CURDIR) dev bench \
	  || { echo "installing torch==2.13.0 and python/[dev,bench] (editable, from $(CURDIR)) ..."; \
	  $(PYTHON) -m pip install -q torch==2.13.0 && \
	  $(PYTHON) -m pip install -q -e '$(CURDIR)/python[dev,bench]'; }

# The web demo: TensorBridge server + PHP-FPM + nginx under .run/web/, left running; prints the
# URL (port: TB_WEB_PORT, default 8080). `make demo-stop` stops it.
demo: setup
	@scripts/demo.sh

demo-stop:
	@scripts/web.sh stop

# pytest and the benchmark smoke run side by side: the suite's two workers spend much of their
# time waiting on servers and PHP processes, and the smoke run's figures are not kept. Each
# one's output is printed when it ends (-O).
test: setup lint
	@$(MAKE) --no-print-directory -O -j 2 test-python bench-quick
	@$(MAKE) --no-print-directory test-php

# The compiled frame parser (python/csrc/) built into the source tree that PYTHONPATH points
# at, so that tests, demo and benchmarks run the compiled path (pip install builds it too).
ext:
	cd python && $(PYTHON) setup.py -q build_ext --inplace

lint:
	$(PYTHON) -m ruff check python spec bench
	cd python && $(PYTHON) -m mypy
	@for f in $$(find php/src php/tests python/tests/php examples -name '*.php'); do \
	  php -l $$f >/dev/null || exit 1; done

# Two workers (this machine has 2 cores); tests that must not overlap share an xdist_group.
test-python: ext
	cd python && $(PYTHON) -m pytest -q -n 2 --dist loadgroup

test-php:
	cd php && phpunit

# Longer crash-recovery runs (defaults: 30 server kills, 200 client kills, 8 PHP processes x
# 5000 requests), the fault suite with each fault held 10 s under 6 PHP callers, and 200 hot
# reloads under 32 PHP callers plus the A/B split; each
# figure can be overridden: make soak TB_KILLS=100 (TB_FAULT_REPORT=FILE keeps the fault table).
soak: setup
	cd python && TB_KILLS=$${TB_KILLS:-30} TB_CLIENT_KILLS=$${TB_CLIENT_KILLS:-200} \
	  TB_SOAK_PROCS=$${TB_SOAK_PROCS:-8} TB_SOAK_REQUESTS=$${TB_SOAK_REQUESTS:-5000} \
	  TB_FAULTS_LONG=1 $(PYTHON) -m pytest -q -s tests/test_crash.py tests/test_faults.py
	cd python && TB_RELOADS=$${TB_RELOADS:-200} TB_RELOAD_CALLERS=$${TB_RELOAD_CALLERS:-32} \
	  $(PYTHON) -m pytest -q -s tests/test_lifecycle.py tests/test_routing.py

# 200,000 fuzzed frames and 5,000 hypothesis examples, and the compiled loop built with ASan and
# UBSan under 40,000 of them (TB_FUZZ_SEED=N replays a run).
fuzz: setup ext
	cd python && TB_FUZZ_FRAMES=$${TB_FUZZ_FRAMES:-200000} \
	  TB_FUZZ_EXAMPLES=$${TB_FUZZ_EXAMPLES:-5000} $(PYTHON) -m pytest -q -s tests/test_fuzz.py \
	  tests/test_fuzz_loop.py

# The full side-by-side run: several minutes; writes bench/results/, docs/benchmarks.md, plots.
bench: setup ext
	$(PYTHON) bench/run.py

# Every scenario with tiny sample counts, so the harness cannot rot (part of `make test`).
bench-quick: setup ext
	$(PYTHON) bench/run.py --quick --out $${TMPDIR:-/tmp}/tensorbridge-bench --docs ''

vectors:
	$(PYTHON) spec/vectors/source.py

clean:
	rm -rf python/src/*.egg-info .pytest_cache python/.pytest_cache php/.phpunit.result.cache
