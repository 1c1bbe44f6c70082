# TensorBridge: `make demo` runs the bundled model from PHP; `make test` runs every test.
# Both install what they need first (Debian packages and the Python package).

PYTHON ?= python3
SOCKET ?= /tmp/tensorbridge-demo.sock
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: setup demo test test-python test-php lint bench bench-quick vectors clean

# Installs: php8.2-cli/fpm + phpunit (apt, only when missing), torch 2.13.0 (the CPU wheel;
# a looser pin pulls CUDA builds), and the tensorbridge package with its dev extras.
setup:
	@command -v php >/dev/null && command -v phpunit >/dev/null && php -m | grep -q sockets || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    php8.2-cli php8.2-fpm phpunit >/dev/null; }
	@$(PYTHON) -c "import tensorbridge, torch, sklearn, pytest" 2>/dev/null || { \
	  $(PYTHON) -m pip install -q torch==2.13.0 && \
	  $(PYTHON) -m pip install -q -e 'python[dev]'; }

demo: setup
	@scripts/demo.sh $(SOCKET)

test: setup lint test-python test-php

lint:
	$(PYTHON) -m ruff check python spec bench
	@for f in $$(find php/src php/tests python/tests/php examples -name '*.php'); do \
	  php -l $$f >/dev/null || exit 1; done

test-python:
	cd python && $(PYTHON) -m pytest -q

test-php:
	cd php && phpunit

vectors:
	$(PYTHON) spec/vectors/source.py

clean:
	rm -rf python/src/*.egg-info .pytest_cache python/.pytest_cache php/.phpunit.result.cache
