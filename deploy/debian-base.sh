#!/bin/sh
# deploy/debian-base.sh ENGINE TAG [ARCHIVE]: makes a base image equivalent to debian:bookworm-slim
# with mmdebstrap (from Debian's own package mirror, no image registry needed) and loads it into
# ENGINE (podman or docker) as TAG. Build the image on it with `--build-arg BASE=TAG`.
#
# What debian:bookworm-slim is, made the same way: Debian's "minbase" variant (Essential and
# Priority: required packages, apt), without documentation, manual pages and translations, with apt
# told to keep no downloaded packages: about 78 MB, as the official one. ARCHIVE (a .tar) keeps the
# root file system between runs: when it exists it is imported as it is. Needs mmdebstrap, and root
# (or mmdebstrap's unshare mode).
set -eu

engine=${1:?usage: debian-base.sh ENGINE TAG [ARCHIVE]}
tag=${2:?usage: debian-base.sh ENGINE TAG [ARCHIVE]}
archive=${3:-}
suite=${SUITE:-bookworm}

cleanup=
if [ -z "$archive" ]; then
    cleanup=$(mktemp -d)
    trap 'rm -rf "$cleanup"' EXIT
    archive=$cleanup/base.tar
fi

if [ ! -s "$archive" ]; then
    mkdir -p "$(dirname "$archive")"
    # Written under another name and renamed, so an interrupted run leaves no half archive behind.
    # shellcheck disable=SC2016 # "$1" in a hook is the root directory, expanded by mmdebstrap
    # The merged-usr hook lays out /bin -> usr/bin as Debian 12 has it, without the usrmerge package
    # (and the whole of perl it would bring), as the official image does.
    mmdebstrap --variant=minbase --format=tar \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --customize-hook='echo "APT::Keep-Downloaded-Packages \"false\";" \
            >"$1/etc/apt/apt.conf.d/docker-clean"' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
        "$suite" "$archive.tmp"
    mv "$archive.tmp" "$archive"
fi

"$engine" import --change 'CMD ["bash"]' "$archive" "$tag" >/dev/null
echo "imported $archive ($(du -m "$archive" | cut -f1) MB) into $engine as $tag"
