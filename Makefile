# SOAKP developer commands. `make run` starts a dev server, `make test` is the test command.
# Every variable below can be overridden on the command line (`make run LISTEN=127.0.0.1:8443`)
# or from the environment. ARGS passes extra flags to the command a target runs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Written after a successful install; pip runs again only when pyproject.toml is newer.
# RUN_STAMP: what serving needs (soakp and its three dependencies), for `make run` and `make mint`;
# STAMP: that plus the test extras, for `make test` and the tools.
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

# Development state for `make run` and `make mint`: created on first use, kept by `make clean`.
VAR ?= var
SECRET_FILE ?= $(VAR)/secret
# Retired secrets, one per line, still accepted for verifying (`make rotate` fills it, see README).
OLD_SECRETS_FILE ?= $(VAR)/old-secrets
ADMIN_USER ?= admin
ADMIN_PASS_FILE ?= $(VAR)/admin-pass
CERT_DIR ?= $(VAR)/tls
TLS_HOST ?= localhost
DB ?= $(VAR)/soakp.db
LISTEN ?= 127.0.0.1:3033
ARGS ?=

.PHONY: venv system-deps test run mint rotate drop-old-secrets zipapp clean distclean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e .
	touch $@

# Debian packages the tests use beyond Python: pebble + certbot (a real ACME issuance), wrk + nginx
# (the benchmark's quick run and the balancer of tests/test_shared_state.py), chromium (browser tests),
# bind9 + bind9-dnsutils + python3-certbot-dns-rfc2136 (DNS-01 through a real DNS server,
# tests/test_dns01.py), redis-server (private Redis servers and a Redis Cluster for
# tests/test_shared_state.py). `make test` installs the missing ones with apt-get (through sudo when
# not root), so one command sets up and runs everything on a fresh machine.
TEST_PACKAGES ?= pebble certbot wrk nginx chromium bind9 bind9-dnsutils python3-certbot-dns-rfc2136 \
	redis-server
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-deps:
	@missing=""; for pkg in $(TEST_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages for the tests:$$missing"; \
		$(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $$missing; \
	fi

test: venv system-deps lint
	$(BIN)/python -m pytest -q $(ARGS)

# `make lint`: ruff (lint rules and the formatter's layout) and mypy over soakp.py; settings in
# pyproject.toml. `make format` rewrites soakp.py in the formatter's layout.
.PHONY: lint format
lint: venv
	$(BIN)/ruff check soakp.py
	$(BIN)/ruff format --check soakp.py
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format soakp.py
	$(BIN)/ruff check --fix soakp.py

# 48 random bytes, URL-safe base64: 64 characters, well over SOAKP's minimum of 32.
# Written to a temporary name first so an interrupted run never leaves a short secret behind.
$(SECRET_FILE) $(ADMIN_PASS_FILE):
	@mkdir -p -m 700 $(@D)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(48))' > $@.tmp && mv $@.tmp $@
	@echo "generated $@ (mode 600)"

$(CERT_DIR)/fullchain.pem: | $(RUN_STAMP)
	@mkdir -p -m 700 $(VAR)
	$(BIN)/soakp selfsigned --dir $(CERT_DIR) --host $(TLS_HOST)

# The old secrets reach SOAKP as SOAKP_OLD_SECRETS: those of $(OLD_SECRETS_FILE), and any already in
# the environment. Start-up logs the kid of the signing secret and of each old one.
run: $(RUN_STAMP) $(SECRET_FILE) $(ADMIN_PASS_FILE) $(CERT_DIR)/fullchain.pem
	@echo
	@echo "SOAKP dev server on https://$(LISTEN) (self-signed certificate for $(TLS_HOST): $(CERT_DIR)/fullchain.pem)"
	@echo "Mint a token for an OpenAI key (in another terminal):"
	@printf '  %s\n' "curl -sk -u $(ADMIN_USER):\$$(cat $(ADMIN_PASS_FILE)) https://$(LISTEN)/jwt/generate -H 'Content-Type: application/json' -d '{\"key\":\"sk-...\"}'"
	@echo "or, without the server:  make mint KEY=sk-...  (or with OPENAI_API_KEY set: make mint)"
	@echo
	@old=$$( { printf '%s\n' "$${SOAKP_OLD_SECRETS:-}" | tr ',' '\n'; \
		cat '$(OLD_SECRETS_FILE)' 2>/dev/null; } | grep -v '^[[:space:]]*$$' | paste -sd, -); \
	exec env SOAKP_SECRET_FILE='$(SECRET_FILE)' SOAKP_OLD_SECRETS="$$old" \
		SOAKP_ADMIN_USER='$(ADMIN_USER)' SOAKP_ADMIN_PASS="$$(cat '$(ADMIN_PASS_FILE)')" \
		$(BIN)/soakp serve --listen '$(LISTEN)' --cert-dir '$(CERT_DIR)' --db '$(DB)' $(ARGS)

# `make mint KEY=sk-... ARGS='--ttl 12h --sub laptop'`, or `make mint` with OPENAI_API_KEY set: the
# token is the last line printed, signed with $(SECRET_FILE) (the new secret after `make rotate`). The key
# reaches soakp in OPENAI_API_KEY, never on its command line; the recipe is not echoed.
mint: $(RUN_STAMP) $(SECRET_FILE)
	@if [ -n '$(KEY)' ]; then OPENAI_API_KEY='$(KEY)'; export OPENAI_API_KEY; fi; \
	test -n "$${OPENAI_API_KEY:-}" || { \
		echo "usage: make mint KEY=sk-... [ARGS='--ttl 12h'], or set OPENAI_API_KEY and run make mint" >&2; \
		exit 2; }; \
	$(BIN)/soakp mint --secret-file '$(SECRET_FILE)' --db '$(DB)' $(ARGS)

# Rotation, in four steps (README, "Rotating the master secret"):
#   make rotate             the current secret moves to $(OLD_SECRETS_FILE), a new one to $(SECRET_FILE)
#   restart make run        signs with the new secret, still accepts tokens of the old one
#   (clients refresh)       POST /jwt/refresh trades an old token for one under the new secret
#   make drop-old-secrets   once the old tokens have expired or been refreshed; restart make run
# The new secret is written to a temporary name first, so an interruption never loses either secret.
rotate: $(SECRET_FILE)
	@umask 077 && $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(48))' > '$(SECRET_FILE).new'
	@umask 077 && cat '$(SECRET_FILE)' >> '$(OLD_SECRETS_FILE)'
	@mv '$(SECRET_FILE).new' '$(SECRET_FILE)'
	@echo "new secret in $(SECRET_FILE); the old one is in $(OLD_SECRETS_FILE) (still accepted)."
	@echo "Restart make run; once old tokens have expired or been refreshed: make drop-old-secrets"

drop-old-secrets:
	@rm -f '$(OLD_SECRETS_FILE)'
	@echo "removed $(OLD_SECRETS_FILE): restart make run, and tokens of old secrets get 401"

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

# `make figures`: the zipapp's size, its start times (first start with unpacking, then warm) and an
# idle server's memory, measured here on /usr/bin/python3 and printed with the machine they came from;
# the README's "What it weighs" comes from this. Builds dist/soakp.pyz first. See tools/figures.py.
.PHONY: figures
figures: zipapp
	$(PYTHON) tools/figures.py --zipapp $(ZIPAPP) $(ARGS)

# Deployment checks (issue 14), each minutes long, so outside `make test`; .ci/run runs them after it.
# They install what they need from Debian (deploy/apt-install.sh, with retries) and print their figures.
# `make container-test`: builds the Dockerfile with Podman on a debian:bookworm-slim equivalent made with
# mmdebstrap (no image registry needed) and runs the image: self-signed start, health check, uid 10001,
# stop with a stream in flight, certificates from Pebble with renewals and a restart, compose.yaml.
# `make edge-test`: the aarch64 zipapp on an arm64 Debian 12 root under qemu-user-static.
# Their caches (base image archive, arm64 root) live in build/; `make container-clean` drops the images.
CONTAINER_PACKAGES ?= podman runc slirp4netns uidmap netavark aardvark-dns iptables podman-compose mmdebstrap
EDGE_PACKAGES ?= mmdebstrap arch-test qemu-user-static binfmt-support
DEPLOY_TEST_TIMEOUT ?= 1800
.PHONY: container-deps container-test container-clean edge-deps edge-test

container-deps:
	@deploy/apt-install.sh $(CONTAINER_PACKAGES)

container-test: venv system-deps container-deps
	@rm -f build/container/timings.txt
	$(BIN)/python -m pytest -q -m container --timeout $(DEPLOY_TEST_TIMEOUT) tests/test_container.py $(ARGS)
	@echo "== container-test figures (build/container/timings.txt):"; cat build/container/timings.txt

# Also drops the build's layer cache: every dangling image, so ones of other projects too.
container-clean:
	-podman rmi --force localhost/soakp:test localhost/soakp-base:bookworm-slim
	-podman image prune --force
	rm -rf build/container

# qemu-user-static registers qemu-aarch64 with binfmt_misc; a machine without systemd may need the file
# system mounted and the entry enabled by hand, which this does (as root, or through sudo).
edge-deps:
	@deploy/apt-install.sh $(EDGE_PACKAGES)
	@[ -e /proc/sys/fs/binfmt_misc/register ] || $(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || $(SUDO) update-binfmts --enable qemu-aarch64

edge-test: venv edge-deps
	@rm -f build/edge/timings.txt
	$(BIN)/python -m pytest -q -m edge --timeout $(DEPLOY_TEST_TIMEOUT) tests/test_edge.py $(ARGS)
	@echo "== edge-test figures (build/edge/timings.txt):"; cat build/edge/timings.txt

# Removes what a build or test run creates; keeps $(VAR)/ (dev secret, admin password, certificate, db).
clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also forgets the dev secret: tokens minted with it stop working.
distclean: clean
	rm -rf $(VAR)
