# SOAKP in one container that gets and renews its own Let's Encrypt certificate.
#
#   docker build -t soakp .
#   docker run -d --name soakp -p 80:80 -p 443:443 \
#     -v soakp-letsencrypt:/etc/letsencrypt -v soakp-data:/data \
#     -e SOAKP_DOMAIN=proxy.example.com -e CERTBOT_EMAIL=you@example.com \
#     -e SOAKP_SECRET_FILE=/data/secret soakp
#
# All the logic is in certbot-entrypoint.sh (tested by tests/test_certbot.py); its header lists the
# settings. SOAKP's own options are its SOAKP_* variables (SPEC.md). Try CERTBOT_SERVER set to Let's
# Encrypt's staging directory first. Without SOAKP_DOMAIN it serves on a self-signed certificate.
#
# Base: Debian's own python3 instead of python:3.*-slim. Debian's certbot needs Debian's python3
# anyway, so one interpreter serves both, and the zipapp (whose cffi library is built for one Python
# version) is built in the first stage by that same interpreter.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv make ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile pyproject.toml README.md soakp.py ./
RUN make zipapp

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 certbot ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A non-root user. Certbot's standalone server binds port 80 and SOAKP binds 443: Docker (since 20.10,
# moby#41030), Podman and containerd 2 set net.ipv4.ip_unprivileged_port_start=0 in a container's own
# network namespace, so this user may bind them. Where that is not so (--network host, older engines,
# CRI-O) either add `--sysctl net.ipv4.ip_unprivileged_port_start=0`, or use high ports and map them:
# `-e CERTBOT_HTTP01_PORT=8080 -e SOAKP_LISTEN=0.0.0.0:8443 -p 80:8080 -p 443:8443`.
# Certbot writes /etc/letsencrypt (mode 0700 live/ and archive/), so the same user runs both, and
# owns the directories below. A bind mount instead of a named volume must be owned by uid 10001.
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin soakp \
 && mkdir -p /etc/letsencrypt /var/lib/letsencrypt /var/log/letsencrypt /data /run/soakp \
 && chown soakp:soakp /etc/letsencrypt /var/lib/letsencrypt /var/log/letsencrypt /data /run/soakp

COPY --from=build /src/dist/soakp.pyz /app/soakp.pyz
COPY certbot-entrypoint.sh /app/certbot-entrypoint.sh
# shiv unpacks the zipapp's libraries once, here at build time, into a directory the runtime user
# only reads; compiling them now spares every start that work.
ENV SHIV_ROOT=/opt/soakp
RUN python3 /app/soakp.pyz --version && python3 -m compileall -q /opt/soakp

ENV SOAKP_LISTEN=0.0.0.0:443 \
    SOAKP_DB=/data/soakp.db \
    SOAKP_LETSENCRYPT_DIR=/etc/letsencrypt \
    SOAKP_SELFSIGNED_DIR=/data/selfsigned \
    SOAKP_PIDFILE=/run/soakp/soakp.pid
# Certificates and Certbot's account; the token database (and a secret file, if you keep it there).
VOLUME ["/etc/letsencrypt", "/data"]
# 80: ACME HTTP-01 challenges (certbot, only while it runs); 443: SOAKP.
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
