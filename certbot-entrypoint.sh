#!/bin/sh
# certbot-entrypoint.sh: the Docker image's entrypoint (and usable on any host with certbot).
#
# With SOAKP_DOMAIN set it gets a certificate for that name (or for the names CERTBOT_DOMAINS
# lists) from Let's Encrypt unless Certbot's live directory already holds one: over HTTP-01 with
# certbot's standalone server, or over DNS-01 with a Certbot DNS plugin (CERTBOT_DNS_PLUGIN), which
# also gets wildcard names such as *.example.com and names that port 80 cannot reach. Then it starts
# SOAKP on it, runs `certbot renew` every RENEW_INTERVAL seconds (and at once for a certificate it
# found) with a deploy hook that sends SOAKP a SIGHUP (SOAKP also notices new files by itself within
# 10 s), passes SIGTERM, SIGINT and SIGHUP on to SOAKP, and exits with SOAKP's exit status. Without
# SOAKP_DOMAIN it serves on a self-signed certificate and says so on stderr.
#
# Settings, all from the environment; the defaults are the production ones. SOAKP's own options come
# from its SOAKP_* variables (SPEC.md), which SOAKP reads itself; arguments to this script are passed
# on to `soakp serve` after the certificate flags (`docker run IMAGE --log-level debug`).
#   SOAKP_DOMAIN            the name to get a certificate for; unset: self-signed (or
#                           SOAKP_CERT_DIR/SOAKP_CERT). It also names the certificate (Certbot's
#                           live/SOAKP_DOMAIN), so it is a plain name, never a wildcard: for
#                           *.example.com alone, set SOAKP_DOMAIN=example.com and
#                           CERTBOT_DOMAINS='*.example.com'
#   CERTBOT_DOMAINS         the names on the certificate, comma-separated (default SOAKP_DOMAIN),
#                           e.g. '*.example.com,example.com'; wildcards need DNS-01. Read when the
#                           certificate is first got: to change the names later, remove the lineage
#   CERTBOT_DNS_PLUGIN      DNS-01 instead of HTTP-01 with this Certbot DNS plugin: rfc2136 (in the
#                           image), or another whose Debian package the image was built with (build
#                           argument CERTBOT_DNS_PLUGINS), e.g. cloudflare for the package
#                           python3-certbot-dns-cloudflare
#   CERTBOT_DNS_CREDENTIALS the plugin's credentials file (INI; mount it as a secret readable by
#                           uid 10001 alone), passed as --dns-PLUGIN-credentials; unset for a plugin
#                           that takes none
#   CERTBOT_DNS_PROPAGATION_SECONDS  seconds to wait for the TXT record to reach every name server
#                           (default: the plugin's own, 60 s for rfc2136)
#   CERTBOT_EMAIL           Let's Encrypt account e-mail; needed only to get the first certificate
#   CERTBOT_SERVER          ACME directory URL (default Let's Encrypt production; for staging use
#                           https://acme-staging-v02.api.letsencrypt.org/directory)
#   SOAKP_LETSENCRYPT_DIR   Certbot's --config-dir, holding live/DOMAIN (default /etc/letsencrypt)
#   CERTBOT_WORK_DIR        Certbot's --work-dir (default /var/lib/letsencrypt)
#   CERTBOT_LOGS_DIR        Certbot's --logs-dir (default /var/log/letsencrypt)
#   CERTBOT_HTTP01_PORT     port Certbot's standalone server answers HTTP-01 challenges on (default 80)
#   CERTBOT_HTTP01_ADDRESS  address it binds (default: all)
#   CERTBOT_EXTRA_ARGS      more arguments for `certbot certonly` (split on spaces)
#   CERTBOT_RENEW_ARGS      more arguments for `certbot renew` (split on spaces), e.g. --force-renewal
#   RENEW_INTERVAL          seconds between `certbot renew` runs (default 43200: twice a day)
#   CERTBOT                 the certbot command (default certbot)
#   SOAKP_CMD               how SOAKP is started (default `python3 /app/soakp.pyz`; split on spaces)
#   SOAKP_PIDFILE           SOAKP's PID, read by the deploy hook (default /run/soakp/soakp.pid)
#   SOAKP_SELFSIGNED_DIR    where the self-signed pair is kept (default /data/selfsigned)
#   SOAKP_SELFSIGNED_HOST   the name the self-signed certificate is for (default localhost)
#   SOAKP_ADMIN_PASS_FILE   a file holding SOAKP_ADMIN_PASS (a Compose or Docker secret): read here
#                           and given to SOAKP in its environment, never on its command line
#
# `certbot renew` sleeps a random 1 to 480 s before renewing when stdin is not a terminal, which is
# always the case here. That spreads the load on Let's Encrypt and costs nothing, because the renew
# loop runs beside SOAKP; add --no-random-sleep-on-renew to CERTBOT_RENEW_ARGS to skip it (tests do).
set -u

LE_DIR=${SOAKP_LETSENCRYPT_DIR:-/etc/letsencrypt}
WORK_DIR=${CERTBOT_WORK_DIR:-/var/lib/letsencrypt}
LOGS_DIR=${CERTBOT_LOGS_DIR:-/var/log/letsencrypt}
SERVER=${CERTBOT_SERVER:-https://acme-v02.api.letsencrypt.org/directory}
HTTP01_PORT=${CERTBOT_HTTP01_PORT:-80}
HTTP01_ADDRESS=${CERTBOT_HTTP01_ADDRESS:-}
RENEW_INTERVAL=${RENEW_INTERVAL:-43200}
CERTBOT=${CERTBOT:-certbot}
SOAKP_CMD=${SOAKP_CMD:-python3 /app/soakp.pyz}
PIDFILE=${SOAKP_PIDFILE:-/run/soakp/soakp.pid}
SELFSIGNED_DIR=${SOAKP_SELFSIGNED_DIR:-/data/selfsigned}
SELFSIGNED_HOST=${SOAKP_SELFSIGNED_HOST:-localhost}
DOMAINS=${CERTBOT_DOMAINS:-${SOAKP_DOMAIN:-}}
DNS_PLUGIN=${CERTBOT_DNS_PLUGIN:-}
DNS_CREDENTIALS=${CERTBOT_DNS_CREDENTIALS:-}
DNS_PROPAGATION=${CERTBOT_DNS_PROPAGATION_SECONDS:-}

log() { printf 'certbot-entrypoint: %s\n' "$*" >&2; }
die() { log "$*"; exit 2; }

case $RENEW_INTERVAL in '' | *[!0-9]* | 0) die "RENEW_INTERVAL must be a whole number of seconds, not '$RENEW_INTERVAL'" ;; esac
case $HTTP01_PORT in '' | *[!0-9]*) die "CERTBOT_HTTP01_PORT must be a port number, not '$HTTP01_PORT'" ;; esac
case $PIDFILE in *"'"*) die "SOAKP_PIDFILE must not contain a quote" ;; esac
case ${SOAKP_DOMAIN:-} in *[!A-Za-z0-9.-]*)
    die "SOAKP_DOMAIN must be a plain name (it names the certificate), not '$SOAKP_DOMAIN';" \
        "put wildcards in CERTBOT_DOMAINS" ;;
esac
case $DOMAINS in *[!A-Za-z0-9.,*-]* | *,,* | ,* | *,)
    die "CERTBOT_DOMAINS must be names separated by commas, not '$DOMAINS'" ;;
esac
case $DNS_PLUGIN in *[!a-z0-9-]*)
    die "CERTBOT_DNS_PLUGIN must be a plugin name such as rfc2136, not '$DNS_PLUGIN'" ;;
esac
case $DNS_PROPAGATION in *[!0-9]*)
    die "CERTBOT_DNS_PROPAGATION_SECONDS must be a whole number, not '$DNS_PROPAGATION'" ;;
esac
if [ -n "$DNS_CREDENTIALS" ] && [ ! -r "$DNS_CREDENTIALS" ]; then
    die "CERTBOT_DNS_CREDENTIALS names '$DNS_CREDENTIALS', which this user ($(id -u)) cannot read"
fi
if [ -n "${SOAKP_ADMIN_PASS_FILE:-}" ]; then
    [ -r "$SOAKP_ADMIN_PASS_FILE" ] ||
        die "SOAKP_ADMIN_PASS_FILE names '$SOAKP_ADMIN_PASS_FILE', which this user cannot read"
    # The whole file but a trailing newline, as SOAKP reads SOAKP_SECRET_FILE.
    SOAKP_ADMIN_PASS=$(cat "$SOAKP_ADMIN_PASS_FILE") || die "cannot read SOAKP_ADMIN_PASS_FILE"
    export SOAKP_ADMIN_PASS
fi
case $DOMAINS in *'*'*)
    [ -n "$DNS_PLUGIN" ] ||
        die "a wildcard name in CERTBOT_DOMAINS needs DNS-01: set CERTBOT_DNS_PLUGIN" ;;
esac

# The hook is saved in Certbot's renewal/DOMAIN.conf and run by later renewals too, so it reads the PID
# from the pidfile at that time instead of naming one. Certbot also runs it after `certonly`, before
# SOAKP has started: then there is no pidfile yet and nothing to do. (Certbot wants the hook's first
# word to be a program on PATH, hence `test` rather than `if`.)
DEPLOY_HOOK="test ! -f '$PIDFILE' || kill -HUP \"\$(cat '$PIDFILE')\""

SOAKP_PID=
RENEW_PID=
STOP_SIGNAL=
# A pidfile left by an earlier run (`docker restart` keeps /run) names some other process by now.
rm -f "$PIDFILE"

# Until SOAKP runs, a signal only marks that we are to stop; afterwards it goes on to SOAKP.
on_signal() {
    if [ -n "$SOAKP_PID" ]; then
        log "SIG$1: passing it on to soakp (pid $SOAKP_PID)"
        kill -s "$1" "$SOAKP_PID" 2>/dev/null
    elif [ "$1" != HUP ]; then
        STOP_SIGNAL=$1
    fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

stop_if_asked() {
    case $STOP_SIGNAL in
        TERM) log "stopped by SIGTERM before soakp started"; exit 143 ;;
        INT) log "stopped by SIGINT before soakp started"; exit 130 ;;
    esac
}

# How certbot proves control of the names: the arguments for `certonly` and `renew` alike, so that a
# changed port or credentials file applies to an existing lineage too. Sets CHALLENGE_ARGS.
challenge_args() {
    if [ -n "$DNS_PLUGIN" ]; then
        set -- --authenticator "dns-$DNS_PLUGIN"
        if [ -n "$DNS_CREDENTIALS" ]; then
            set -- "$@" "--dns-$DNS_PLUGIN-credentials" "$DNS_CREDENTIALS"
        fi
        if [ -n "$DNS_PROPAGATION" ]; then
            set -- "$@" "--dns-$DNS_PLUGIN-propagation-seconds" "$DNS_PROPAGATION"
        fi
    else
        set -- --standalone --http-01-port "$HTTP01_PORT"
        if [ -n "$HTTP01_ADDRESS" ]; then set -- "$@" --http-01-address "$HTTP01_ADDRESS"; fi
    fi
    CHALLENGE_ARGS=$(printf '%s\n' "$@")
}

# Certbot's options are single words without spaces or newlines (checked above), so a list of them
# one per line in CHALLENGE_ARGS splits back into them safely with IFS set to a newline.
nl='
'

# certbot runs with this container's directories, its output on stderr with ours. Every name in
# CERTBOT_DOMAINS is a --domain; --cert-name keeps the lineage at live/SOAKP_DOMAIN whatever they
# are.
get_certificate() {
    set -- --server "$SERVER" --cert-name "$SOAKP_DOMAIN" --email "$CERTBOT_EMAIL" \
        --agree-tos --no-eff-email --keep-until-expiring --deploy-hook "$DEPLOY_HOOK"
    old_ifs=$IFS
    IFS=,
    for name in $DOMAINS; do set -- "$@" --domain "$name"; done
    IFS=$nl
    # shellcheck disable=SC2086 # one word per line
    set -- "$@" $CHALLENGE_ARGS
    IFS=$old_ifs
    # shellcheck disable=SC2086 # CERTBOT_EXTRA_ARGS is a list of words
    "$CERTBOT" --non-interactive --config-dir "$LE_DIR" --work-dir "$WORK_DIR" --logs-dir "$LOGS_DIR" \
        certonly "$@" ${CERTBOT_EXTRA_ARGS:-} >&2
}

# Runs in the background beside SOAKP. Its children run in the background too, so that SIGTERM from
# the main shell ends the loop at once instead of after a sleep or a renewal.
renew_loop() {
    delay=$1
    child=
    trap 'kill "$child" 2>/dev/null; exit 0' TERM
    old_ifs=$IFS
    IFS=$nl
    # shellcheck disable=SC2086 # one word per line
    set -- --cert-name "$SOAKP_DOMAIN" --deploy-hook "$DEPLOY_HOOK" $CHALLENGE_ARGS
    IFS=$old_ifs
    while :; do
        sleep "$delay" &
        child=$!
        wait "$child"
        delay=$RENEW_INTERVAL
        log "running certbot renew (next run in ${RENEW_INTERVAL}s)"
        # certbot itself goes to the background (never a function or a subshell), so `$!` is its PID.
        # shellcheck disable=SC2086 # CERTBOT_RENEW_ARGS is a list of words
        "$CERTBOT" --non-interactive --config-dir "$LE_DIR" --work-dir "$WORK_DIR" --logs-dir "$LOGS_DIR" \
            renew "$@" ${CERTBOT_RENEW_ARGS:-} >&2 &
        child=$!
        if wait "$child"; then
            log "certbot renew done"
        else
            log "certbot renew failed (exit $?); soakp keeps its certificate; see $LOGS_DIR/letsencrypt.log"
        fi
    done
}

if [ -n "${SOAKP_DOMAIN:-}" ]; then
    challenge_args
    live="$LE_DIR/live/$SOAKP_DOMAIN"
    if [ -f "$live/fullchain.pem" ] && [ -f "$live/privkey.pem" ]; then
        log "using the certificate in $live; checking it for renewal now"
        first_renew=0
    else
        [ -n "${CERTBOT_EMAIL:-}" ] || die "CERTBOT_EMAIL is needed to get a certificate for $SOAKP_DOMAIN"
        if [ -n "$DNS_PLUGIN" ]; then
            log "getting a certificate for $DOMAINS from $SERVER" \
                "(DNS-01 with certbot's dns-$DNS_PLUGIN plugin)"
        else
            log "getting a certificate for $DOMAINS from $SERVER (HTTP-01 on port $HTTP01_PORT)"
        fi
        get_certificate
        status=$?
        stop_if_asked
        if [ "$status" -ne 0 ]; then
            log "certbot certonly failed (exit $status); see $LOGS_DIR/letsencrypt.log"
            exit "$status"
        fi
        log "got a certificate for $SOAKP_DOMAIN in $live"
        first_renew=$RENEW_INTERVAL
    fi
    set -- serve --domain "$SOAKP_DOMAIN" --letsencrypt-dir "$LE_DIR" "$@"
elif [ -n "${SOAKP_CERT_DIR:-}${SOAKP_CERT:-}" ]; then
    log "no SOAKP_DOMAIN: serving on the certificate SOAKP_CERT_DIR or SOAKP_CERT names; no renewals"
    set -- serve "$@"
else
    if [ ! -f "$SELFSIGNED_DIR/fullchain.pem" ] || [ ! -f "$SELFSIGNED_DIR/privkey.pem" ]; then
        # shellcheck disable=SC2086 # SOAKP_CMD is a list of words
        $SOAKP_CMD selfsigned --dir "$SELFSIGNED_DIR" --host "$SELFSIGNED_HOST" >&2 ||
            die "could not write a self-signed certificate to $SELFSIGNED_DIR"
    fi
    stop_if_asked
    log "no SOAKP_DOMAIN: serving on a SELF-SIGNED certificate for $SELFSIGNED_HOST from $SELFSIGNED_DIR;" \
        "clients will not trust it. Set SOAKP_DOMAIN and CERTBOT_EMAIL for a Let's Encrypt certificate"
    set -- serve --cert-dir "$SELFSIGNED_DIR" "$@"
fi

# shellcheck disable=SC2086 # SOAKP_CMD is a list of words
$SOAKP_CMD "$@" &
SOAKP_PID=$!
log "started soakp (pid $SOAKP_PID): $SOAKP_CMD $1"  # not "$*": extra arguments may hold a secret
mkdir -p "$(dirname "$PIDFILE")" 2>/dev/null
echo "$SOAKP_PID" >"$PIDFILE" || log "cannot write $PIDFILE: renewals reach soakp by its file check only (10 s)"
case $STOP_SIGNAL in '') ;; *) on_signal "$STOP_SIGNAL" ;; esac

if [ -n "${SOAKP_DOMAIN:-}" ]; then
    renew_loop "$first_renew" &
    RENEW_PID=$!
fi

# `wait` returns early (status > 128) when a trapped signal arrives; wait again while soakp is there.
# When it is gone but was reaped during the trap, one more `wait` still reports its status (127 means
# that status was reported already).
while :; do
    wait "$SOAKP_PID"
    status=$?
    [ "$status" -gt 128 ] || break
    kill -0 "$SOAKP_PID" 2>/dev/null && continue
    wait "$SOAKP_PID"
    again=$?
    [ "$again" -eq 127 ] || status=$again
    break
done
log "soakp exited with status $status"

if [ -n "$RENEW_PID" ]; then
    kill "$RENEW_PID" 2>/dev/null
    wait "$RENEW_PID" 2>/dev/null
fi
rm -f "$PIDFILE"
exit "$status"
