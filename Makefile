# SOAKP developer commands. `make run` starts a dev server, `make test` is the test command.
# Every variable below can be overridden on the command line (`make run LISTEN=127.0.0.1:8443`)
# or from the environment. ARGS passes extra flags to the command a target runs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again only when pyproject.toml is newer.
STAMP := $(VENV)/.installed

# Development state for `make run` and `make mint`: created on first use, kept by `make clean`.
VAR ?= var
SECRET_FILE ?= $(VAR)/secret
ADMIN_USER ?= admin
ADMIN_PASS_FILE ?= $(VAR)/admin-pass
CERT_DIR ?= $(VAR)/tls
TLS_HOST ?= localhost
DB ?= $(VAR)/soakp.db
LISTEN ?= 127.0.0.1:3033
ARGS ?=

.PHONY: venv system-deps test run mint zipapp clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Debian packages the tests use beyond Python: pebble + certbot (a real ACME issuance), wrk + nginx
# (the benchmark's quick run and the balancer of tests/test_shared_state.py), chromium (browser tests),
# redis-server (private Redis servers and a Redis Cluster for tests/test_shared_state.py). `make test` installs the missing ones with
# apt-get (through sudo when not root), so one command sets up and runs everything on a fresh machine.
TEST_PACKAGES ?= pebble certbot wrk nginx chromium redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-deps:
	@missing=""; for pkg in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the tests:$$missing"; \
		$(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

test: venv system-deps
	$(BIN)/python -m pytest -q $(ARGS)

# 48 random bytes, URL-safe base64: 64 characters, well over SOAKP's minimum of 32.
# Written to a temporary name first so an interrupted run never leaves a short secret behind.
$(SECRET_FILE) $(ADMIN_PASS_FILE):
	@mkdir -p -m 700 $(@D)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(48))' > $@.tmp && mv $@.tmp $@
	@echo "generated $@ (mode 600)"

$(CERT_DIR)/fullchain.pem: | $(STAMP)
	@mkdir -p -m 700 $(VAR)
	$(BIN)/soakp selfsigned --dir $(CERT_DIR) --host $(TLS_HOST)

run: venv $(SECRET_FILE) $(ADMIN_PASS_FILE) $(CERT_DIR)/fullchain.pem
	@echo
	@echo "SOAKP dev server on https://$(LISTEN) (self-signed certificate for $(TLS_HOST): $(CERT_DIR)/fullchain.pem)"
	@echo "Mint a token for an OpenAI key (in another terminal):"
	@printf '  %s\n' "curl -sk -u $(ADMIN_USER):\$$(cat $(ADMIN_PASS_FILE)) https://$(LISTEN)/jwt/generate -H 'Content-Type: application/json' -d '{\"key\":\"sk-...\"}'"
	@echo "or, without the server:  make mint KEY=sk-..."
	@echo
	@exec env SOAKP_SECRET_FILE='$(SECRET_FILE)' SOAKP_ADMIN_USER='$(ADMIN_USER)' \
		SOAKP_ADMIN_PASS="$$(cat '$(ADMIN_PASS_FILE)')" \
		$(BIN)/soakp serve --listen '$(LISTEN)' --cert-dir '$(CERT_DIR)' --db '$(DB)' $(ARGS)

# `make mint KEY=sk-... ARGS='--ttl 12h --sub laptop'`: the token is the last line printed.
# The recipe is not echoed, so the key does not appear on the terminal.
mint: venv $(SECRET_FILE)
	@test -n '$(KEY)' || { echo "usage: make mint KEY=sk-... [ARGS='--ttl 12h']" >&2; exit 2; }
	@$(BIN)/soakp mint --secret-file '$(SECRET_FILE)' --db '$(DB)' --key '$(KEY)' $(ARGS)

# `make zipapp`: dist/soakp.pyz, one file with soakp and its dependencies inside (shiv). It runs on
# any python3 of the Python version and CPU it was built for: `python3 dist/soakp.pyz serve ...`.
# For another CPU or Python (an edge device), name the target's wheel platform and version:
# `make zipapp PLATFORM=manylinux2014_aarch64 PYVER=3.11` (no compiler needed: wheels only).
# shiv is a build tool: it lives in $(SHIV_VENV), never in the zipapp.
# `make zipapp EXTRAS=redis` puts redis-py inside too, for `--redis` (several instances, one state).
ZIPAPP ?= dist/soakp.pyz
EXTRAS ?=
PLATFORM ?=
PYVER ?=
SHIV_VENV ?= build/shiv-venv
WHEELS_FOR = --only-binary=:all: $(if $(PLATFORM),--platform $(PLATFORM)) $(if $(PYVER),--python-version $(PYVER))

$(SHIV_VENV)/bin/shiv:
	$(PYTHON) -m venv $(SHIV_VENV)
	$(SHIV_VENV)/bin/python -m pip install -q shiv

# soakp's wheel is built from a copy, so the tree gets no build/lib or .egg-info and parallel builds
# share nothing; the zipapp is written under a temporary name and renamed, so it is whole or absent.
zipapp: $(SHIV_VENV)/bin/shiv
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	mkdir -p "$$tmp/src" "$(dir $(ZIPAPP))"; \
	cp soakp.py pyproject.toml README.md "$$tmp/src/"; \
	$(SHIV_VENV)/bin/python -m pip wheel -q --no-deps -w "$$tmp/wheels" "$$tmp/src"; \
	whl=$$(ls "$$tmp"/wheels/soakp-*.whl); \
	$(SHIV_VENV)/bin/python -m pip download -q -d "$$tmp/wheels" $(WHEELS_FOR) "$$whl$(if $(EXTRAS),[$(EXTRAS)])"; \
	$(SHIV_VENV)/bin/shiv -q -o "$(ZIPAPP).$$$$.tmp" -e soakp:main -p '/usr/bin/env python3' --reproducible \
		--no-index --find-links "$$tmp/wheels" $(WHEELS_FOR) 'soakp$(if $(EXTRAS),[$(EXTRAS)])'; \
	mv "$(ZIPAPP).$$$$.tmp" "$(ZIPAPP)"; \
	echo "built $(ZIPAPP) ($$(wc -c < "$(ZIPAPP)") bytes) from:"; ls "$$tmp/wheels" | sed 's/^/  /'

# `make bench`: SOAKP's speed against calling the upstream directly and against nginx (issue #6), with
# wrk and nginx when they are installed; about 3 minutes, best on a quiet machine. See bench/run.py.
# ARGS=--quick (seconds), ARGS='--python /path/venv/bin/python' (an interpreter with uvloop, say),
# ARGS='--markdown bench/RESULTS.md', ARGS=--profile (where SOAKP's time per request goes).
.PHONY: bench
bench: venv
	$(BIN)/python bench/run.py $(ARGS)

# `make reliability`: hostile input, upstream faults, 1,000 SSE streams held for 60 s and a 100,000-request
# soak against a real SOAKP, with a report (issue #5); about 2 minutes. See tools/reliability.py.
# ARGS=--quick (the subset the tests run, seconds), ARGS='--out bench/RELIABILITY.md --json FILE'.
.PHONY: reliability
reliability: venv
	$(BIN)/python tools/reliability.py $(ARGS)

# `make demo`: the browser story of examples/browser/ against a fake OpenAI (no account needed): starts the
# fake, SOAKP and the page's backend, then prints the URL to open. The first run installs the openai npm
# package into examples/browser/.cache/. DEMO_PORT is the page's port; ARGS='--ttl 30' shortens the token.
DEMO_PORT ?= 8787
.PHONY: demo
demo: venv
	$(BIN)/python examples/browser/demo.py --port $(DEMO_PORT) $(ARGS)

# Removes what a build or test run creates; keeps $(VAR)/ (dev secret, admin password, certificate, db).
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also forgets the dev secret: tokens minted with it stop working.
distclean: clean
	rm -rf $(VAR)
