# SOAKP in one container that gets and renews its own Let's Encrypt certificate.
#
#   docker build -t soakp .                       # or: podman build --format docker -t soakp .
#   docker run -d --name soakp -p 80:80 -p 443:443 --stop-timeout 35 \
#     -v soakp-letsencrypt:/etc/letsencrypt -v soakp-data:/data \
#     -e SOAKP_DOMAIN=proxy.example.com -e CERTBOT_EMAIL=you@example.com \
#     -e SOAKP_SECRET_FILE=/data/secret soakp
#
# compose.yaml does the same with Compose; deploy/ has a systemd unit for the zipapp instead.
# All the logic is in certbot-entrypoint.sh (tested by tests/test_certbot.py and
# tests/test_dns01.py); its header lists the settings, DNS-01 and wildcard names included. SOAKP's own options are its
# SOAKP_* variables (SPEC.md). Try CERTBOT_SERVER set to Let's Encrypt's staging directory first.
# Without SOAKP_DOMAIN it serves on a self-signed certificate. `make container-test` builds this
# file and checks the image (tests/test_container.py).
#
# What each engine needs:
# - Docker (20.10 and later): nothing more. It sets net.ipv4.ip_unprivileged_port_start=0 in the
#   container's network namespace, so the non-root user below may bind 80 and 443.
# - Podman: build with `--format docker`; its default OCI format drops HEALTHCHECK. Podman 4.3
#   (Debian 12) does NOT set that sysctl: run with `--sysctl net.ipv4.ip_unprivileged_port_start=0`,
#   or with high ports (`-e CERTBOT_HTTP01_PORT=8080 -e SOAKP_LISTEN=0.0.0.0:8443 -p 80:8080
#   -p 443:8443`). On a host with hybrid (v1) cgroups Podman 4.3 needs the runc runtime (crun fails
#   with "cgroups in hybrid mode not supported"). Its default_ulimits must stay within the host's
#   hard limits (`ulimit -Hn`), and nproc within the 32768 processes conmon runs with, or every
#   start fails with "error setting rlimit"; tests/test_container.py writes such a containers.conf.
# - --network host, CRI-O and older engines: the same sysctl or high ports as for Podman.
#
# Build arguments:
#   BASE                 the Debian 12 image both stages start from (default debian:bookworm-slim).
#                        Where no image registry can be reached, deploy/debian-base.sh makes an
#                        equivalent one from Debian's package mirror with mmdebstrap.
#   CERTBOT_DNS_PLUGINS  Debian packages of Certbot DNS plugins to add, space-separated
#                        (`apt-cache search python3-certbot-dns`); RFC 2136 by default, which works
#                        with any standard DNS server (BIND, Knot, PowerDNS). "" for none.
#   EXTRA_CA_CERT        the PEM text of one more CA for the build's downloads from PyPI, for a
#                        network behind a TLS-inspecting proxy:
#                        `--build-arg EXTRA_CA_CERT="$(cat proxy-ca.pem)"`. It is trusted in the
#                        build stage only; the image itself trusts Debian's CA list alone.
#
# Base: Debian's own python3 instead of python:3.*-slim. Debian's certbot needs Debian's python3
# anyway, so one interpreter serves both, and the zipapp (whose cffi library is built for one Python
# version) is built in the first stage by that same interpreter.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv make ca-certificates \
 && rm -rf /var/lib/apt/lists/*
ARG EXTRA_CA_CERT=
RUN if [ -n "$EXTRA_CA_CERT" ]; then \
      printf '%s\n' "$EXTRA_CA_CERT" > /usr/local/share/ca-certificates/build-extra-ca.crt \
      && update-ca-certificates; \
    fi
# pip trusts its own copy of certifi's list unless told otherwise; Debian's list has the extra CA.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY Makefile pyproject.toml README.md soakp.py ./
RUN make zipapp
# shiv unpacks the zipapp's libraries on first run into SHIV_ROOT; doing it here, compiled, spares
# every start that work, and the runtime stage copies the result without the build's tools. Tests,
# C sources and type stubs inside the libraries serve nothing at run time.
ENV SHIV_ROOT=/opt/soakp
RUN python3 dist/soakp.pyz --version \
 && find /opt/soakp -depth \( -name tests -o -name '*.pyi' -o -name '*.c' -o -name '*.h' \
      -o -name __pycache__ \) -exec rm -rf {} + \
 && python3 -m compileall -q -j 0 /opt/soakp

FROM ${BASE}
ARG CERTBOT_DNS_PLUGINS=python3-certbot-dns-rfc2136
# python3-minimal would not do: certbot depends on the whole of python3. The apt lists, the Python
# test suites Debian ships with the interpreter, and documentation serve nothing at run time.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 certbot ca-certificates $CERTBOT_DNS_PLUGINS \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/log/apt \
      /var/log/dpkg.log /usr/share/doc /usr/share/man /usr/share/locale \
      /usr/lib/python3.11/test /usr/lib/python3.11/*/tests /usr/lib/python3.11/pydoc_data \
      /usr/lib/python3/dist-packages/*/tests

# A non-root user. Certbot's standalone server binds port 80 and SOAKP binds 443: see "What each
# engine needs" above for the sysctl that allows it. Certbot writes /etc/letsencrypt (mode 0700
# live/ and archive/), so the same user runs both, and owns the directories below. A bind mount instead of
# a named volume must be owned by uid 10001. uid 10001 is an ordinary uid (not --system, whose range
# ends at 999), kept apart from any user of the host.
RUN groupadd --gid 10001 soakp \
 && useradd --uid 10001 --gid soakp --no-create-home --no-log-init --home-dir /data \
      --shell /usr/sbin/nologin soakp \
 && mkdir -p /etc/letsencrypt /var/lib/letsencrypt /var/log/letsencrypt /data /run/soakp \
 && chown soakp:soakp /etc/letsencrypt /var/lib/letsencrypt /var/log/letsencrypt /data /run/soakp

COPY --from=build /opt/soakp /opt/soakp
COPY --from=build /src/dist/soakp.pyz /app/soakp.pyz
COPY certbot-entrypoint.sh /app/certbot-entrypoint.sh

ENV SHIV_ROOT=/opt/soakp \
    SOAKP_LISTEN=0.0.0.0:443 \
    SOAKP_DB=/data/soakp.db \
    SOAKP_LETSENCRYPT_DIR=/etc/letsencrypt \
    SOAKP_SELFSIGNED_DIR=/data/selfsigned \
    SOAKP_PIDFILE=/run/soakp/soakp.pid
# Certificates and Certbot's account; the token database (and a secret file, if you keep it there).
VOLUME ["/etc/letsencrypt", "/data"]
# 80: ACME HTTP-01 challenges (certbot, only while it runs; not used with DNS-01); 443: SOAKP.
EXPOSE 80 443
USER soakp
WORKDIR /data

# Any answer from /healthz over TLS on SOAKP_LISTEN's port; the certificate is not checked (it names
# the domain, not 127.0.0.1). The start period covers getting the first certificate.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python3", "-I", "-c", "import os, ssl, urllib.request; port = os.environ.get('SOAKP_LISTEN', '0.0.0.0:443').rpartition(':')[2]; urllib.request.urlopen(f'https://127.0.0.1:{port}/healthz', context=ssl._create_unverified_context(), timeout=4).read()"]

# SIGTERM (docker stop) reaches SOAKP through the entrypoint; in-flight streams get SOAKP_SHUTDOWN_GRACE
# (30 s by default), so give `docker stop --time 35` or set stop_grace_period in Compose.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/app/certbot-entrypoint.sh"]
