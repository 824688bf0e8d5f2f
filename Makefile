# The two set-up commands of the README:
#   make run    - install into .venv and run filterd on its embedded default config
#   make test   - install everything the tests need and run the whole suite on Python 3.11 and 3.12
# Everything is installed into .venv (Python 3.11) and .venv312 (Python 3.12) of this checkout.

PY311 ?= python3.11
PY312 ?= env PYENV_VERSION=3.12.1 python3.12
PYTEST_ARGS ?=

.PHONY: run test test311 test312 bench clean system-deps

run: .venv/ok
	.venv/bin/filterd run

test: test311 test312

test311: .venv/ok-test system-deps
	.venv/bin/python -m pytest $(PYTEST_ARGS)

test312: .venv312/ok-test system-deps
	.venv312/bin/python -m pytest $(PYTEST_ARGS)

bench: .venv/ok-test
	.venv/bin/python bench/run_all.py

.venv/ok: setup.cfg
	$(PY311) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e .
	touch $@

.venv/ok-test: setup.cfg .venv/ok
	.venv/bin/pip install -q -e '.[test]'
	touch $@

.venv312/ok-test: setup.cfg
	$(PY312) -m venv .venv312
	.venv312/bin/pip install -q --upgrade pip
	.venv312/bin/pip install -q -e '.[test]'
	touch $@

# Headless Chromium (report and block-page screenshots) and libpcap (the sensor's BPF filters).
system-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! ldconfig -p | grep -q libpcap.so; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libpcap0.8 >/dev/null; \
	fi

clean:
	rm -rf .venv .venv312 .pytest_cache build *.egg-info
