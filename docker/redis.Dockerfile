# A Redis image for `docker compose --profile cluster` on a machine that cannot
# pull redis:7: Debian's redis-server, installed from .deb files downloaded on
# the host, on top of a local base image. See docs/docker.md.
#
#   docker/redis-debs.sh                                   # on the host: docker/redis-debs/*.deb
#   docker build -f docker/redis.Dockerfile -t zchat-redis:bookworm docker
#   REDIS_IMAGE=zchat-redis:bookworm docker compose --profile cluster up -d
#
# It behaves like the official image where the compose file relies on it:
# `redis-server` on the PATH, data in /data (a volume), redis-cli for the
# healthcheck; it runs as the unprivileged `redis` user.

ARG BASE_IMAGE=zchat-base:bookworm
FROM ${BASE_IMAGE}

# Few instructions on purpose: on the vfs storage driver every one of them,
# even one that only sets metadata, copies the whole filesystem.

# Fails here, saying redis-debs is missing, if docker/redis-debs.sh was not run.
COPY redis-debs/ /tmp/redis-debs/

# - containers cannot reach package indexes: dpkg -i the downloaded files, which
#   redis-debs.sh chose against this very base image (its missing dependencies
#   included);
# - policy-rc.d (exit 101) keeps the package's scripts from starting a Redis
#   daemon inside the build;
# - /data belongs to redis, so a new named volume mounted there does too.
RUN set -eu \
    && ls /tmp/redis-debs/*.deb >/dev/null \
    && printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d \
    && chmod 755 /usr/sbin/policy-rc.d \
    && DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/redis-debs/*.deb \
    && rm -f /usr/sbin/policy-rc.d \
    && rm -rf /tmp/redis-debs \
    && mkdir -p /data \
    && chown redis:redis /data \
    && redis-server --version

VOLUME ["/data"]
USER redis
# Without a config file, and so listening on all interfaces; protected mode
# (on by default when there is no password) would refuse the brokers, so it is
# off: publish this port nowhere but the compose network.
CMD ["redis-server", "--protected-mode", "no", "--dir", "/data"]
