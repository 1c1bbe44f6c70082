# TensorBridge: `make demo` runs the bundled model from PHP; `make test` runs every test.
# Both install what they need first (Debian packages and the Python package).

PYTHON ?= python3
export PYTHONDONTWRITEBYTECODE = 1
# Tests, demo and benchmarks run this checkout's code even where another copy of the
# package is installed (the editable install is only for the dependencies and the command).
export PYTHONPATH := $(CURDIR)/python/src$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup demo demo-stop test test-python test-php lint bench bench-quick vectors clean

APT_PACKAGES = php8.2-cli php8.2-fpm php8.2-curl php8.2-gd phpunit nginx-light wrk \
  chromium chromium-driver

# Installs: PHP (CLI, FPM; curl and gd for the benchmark baselines), phpunit, nginx and wrk,
# chromium and chromium-driver for the web demo's browser test (apt, only when missing),
# torch 2.13.0 (the CPU wheel; a looser pin pulls CUDA builds), and the tensorbridge package
# with its dev and bench extras.
setup:
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
	  echo "installing $(APT_PACKAGES) ..."; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(APT_PACKAGES) >/dev/null; fi
	@$(PYTHON) -c "import tensorbridge, torch, sklearn, pytest, fastapi, uvicorn, orjson, matplotlib, selenium" \
	  2>/dev/null || { echo "installing torch==2.13.0 and python/[dev,bench] ..."; \
	  $(PYTHON) -m pip install -q torch==2.13.0 && \
	  $(PYTHON) -m pip install -q -e 'python[dev,bench]'; }

# The web demo: TensorBridge server + PHP-FPM + nginx under .run/web/, left running; prints the
# URL (port: TB_WEB_PORT, default 8080). `make demo-stop` stops it.
demo: setup
	@scripts/demo.sh

demo-stop:
	@scripts/web.sh stop

test: setup lint test-python test-php bench-quick

lint:
	$(PYTHON) -m ruff check python spec bench
	@for f in $$(find php/src php/tests python/tests/php examples -name '*.php'); do \
	  php -l $$f >/dev/null || exit 1; done

test-python:
	cd python && $(PYTHON) -m pytest -q

test-php:
	cd php && phpunit

# The full side-by-side run: several minutes; writes bench/results/, docs/benchmarks.md, plots.
bench: setup
	$(PYTHON) bench/run.py

# Every scenario with tiny sample counts, so the harness cannot rot (part of `make test`).
bench-quick: setup
	$(PYTHON) bench/run.py --quick --out $${TMPDIR:-/tmp}/tensorbridge-bench --docs ''

vectors:
	$(PYTHON) spec/vectors/source.py

clean:
	rm -rf python/src/*.egg-info .pytest_cache python/.pytest_cache php/.phpunit.result.cache
