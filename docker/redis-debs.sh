#!/usr/bin/env bash
# Download, on this Debian host, the .deb files that redis.Dockerfile installs
# into an offline base image, for `docker compose --profile cluster` on a
# machine that cannot pull redis:7 (see docs/docker.md).
#
#   docker/redis-debs.sh [BASE_IMAGE]       # default zchat-base:bookworm
#
# It reads the base image's dpkg database and asks this host's apt which
# packages redis-server and redis-tools need on top of it (with their exact
# versions), then `apt-get download`s just those into docker/redis-debs/
# (git-ignored; emptied first). The host must run the same Debian release as
# the image (bookworm for zchat-base:bookworm) with its package lists fresh
# (`apt-get update`), and docker must be running. No root needed beyond docker.
set -euo pipefail

image=${1:-zchat-base:bookworm}
here=$(cd "$(dirname "$0")" && pwd)
out="$here/redis-debs"
log() { printf 'redis-debs: %s\n' "$*" >&2; }

command -v apt-get >/dev/null || { log "needs apt-get (a Debian host)"; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# One container (each costs a copy of the image on the vfs storage driver): the
# image's Debian release on the first line, then its dpkg database.
docker run --rm --entrypoint sh "$image" -c '. /etc/os-release; echo "${VERSION_CODENAME:-?}"; cat /var/lib/dpkg/status' \
  >"$tmp/image"
image_codename=$(head -n 1 "$tmp/image")
tail -n +2 "$tmp/image" >"$tmp/status"
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$codename" != "$image_codename" ]; then
  log "this host is Debian '$codename' but $image is '$image_codename': run this on a $image_codename host"
  exit 1
fi

# What apt would install into the image: "Inst NAME (VERSION ...)" lines.
apt-get -s -o Dir::State::status="$tmp/status" install --no-install-recommends redis-server redis-tools \
  >"$tmp/plan" 2>&1 || { cat "$tmp/plan" >&2; log "apt cannot resolve redis-server for $image"; exit 1; }
mapfile -t wanted < <(awk '/^Inst /{ gsub(/[()]/, "", $3); print $2 "=" $3 }' "$tmp/plan")
[ ${#wanted[@]} -gt 0 ] || { log "$image already has redis-server?"; exit 1; }

rm -rf "$out"
mkdir -p "$out"
log "downloading ${wanted[*]}"
(cd "$out" && apt-get download -qq "${wanted[@]}" >"$tmp/err" 2>&1) \
  || { cat "$tmp/err" >&2; log "apt-get download failed (stale package lists? try apt-get update)"; exit 1; }
log "ready: $(ls "$out" | wc -l) packages in $out"
