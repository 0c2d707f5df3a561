#!/bin/sh
# deploy/apt-install.sh PACKAGE...: installs those of the Debian packages that are missing, with
# apt-get (through sudo when not root), retrying a failed `apt-get update` or download three times
# (a mirror hiccup must not fail a CI run). Prints what it installs and how long it took.
set -eu
missing=
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' ||
        missing="$missing $pkg"
done
[ -n "$missing" ] || exit 0
sudo=
[ "$(id -u)" = 0 ] || sudo=sudo
started=$(date +%s)
echo "installing Debian packages:$missing"
opts="-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3"
for attempt in 1 2 3; do
    # shellcheck disable=SC2086 # a list of package names
    if $sudo apt-get $opts update -q >/dev/null &&
        DEBIAN_FRONTEND=noninteractive $sudo apt-get $opts install -y -q --no-install-recommends \
            $missing >/dev/null; then
        echo "installed in $(($(date +%s) - started)) s:$missing"
        exit 0
    fi
    echo "apt-get failed (attempt $attempt of 3); retrying in $((attempt * 10)) s" >&2
    sleep $((attempt * 10))
done
echo "could not install:$missing" >&2
exit 1
