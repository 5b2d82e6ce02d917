# zchat broker image. See docs/docker.md.
#
#   docker compose up -d
#   docker compose --profile cluster up -d                # + Redis and two brokers sharing one chat
#   docker build -t zchat-broker .                        # deps from the package index
#   docker build --build-arg PYTHON_IMAGE=zchat-base:bookworm -t zchat-broker .
#                                                         # offline: deps from ./wheels
#
# Layer order, for the build cache: settings that never change first, then the
# dependencies (rebuilt only when pyproject.toml or ./wheels change), then the
# source (rebuilt on every edit, and cheap). Few instructions on purpose: on a
# vfs storage driver every step copies the whole filesystem.

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# PATH is spelled out rather than extended: an image made with `docker import`
# (such as zchat-base:bookworm) has no PATH of its own to extend.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/zchat \
    PATH=/opt/zchat/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ZCHAT_PORT=5555 \
    ZCHAT_PUB_PORT=5556 \
    ZCHAT_DATA=/data

EXPOSE 5555 5556

# broker.health pings the request port (ZCHAT_PORT) without saying hello; any
# valid envelope back (an error "not_registered") proves the broker is serving.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "broker.health", "--timeout", "3"]

# Exec form: the broker is PID 1 and gets SIGTERM from `docker stop` itself,
# so it closes its store cleanly.
CMD ["zchat-broker", "--host", "0.0.0.0"]

# Why "wheel[s]": COPY fails when a source matches nothing, but a pattern that
# matches nothing is fine as long as another source (pyproject.toml) exists.
# So this works with or without a wheels/ folder in the build context, with no
# placeholder file to keep around. When wheels/ is there, its *contents* land
# in /build next to pyproject.toml.
COPY pyproject.toml wheel[s] /build/

# - a venv, not the system Python: Debian marks its pip "externally managed";
# - an unprivileged user that owns only /data, which only it can read (messages
#   and DMs are in there; the broker warns about a store directory others can read);
# - the build backend, the runtime dependencies and those of the `backplane`
#   extra (redis-py, for --backplane / the compose file's cluster profile), all
#   read from pyproject.toml so that they are written down in one place. With
#   wheels, strictly from them (--no-index): an offline build gets everything
#   it needs from ./wheels or fails saying what is missing.
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin zchat \
    && mkdir -p /data \
    && chown zchat:zchat /data \
    && chmod 0700 /data \
    && python3 -m venv "$VIRTUAL_ENV" \
    && python -c "import tomllib; t = tomllib.load(open('/build/pyproject.toml', 'rb')); p = t['project']; \
print('\n'.join(t['build-system']['requires'] + p['dependencies'] + p['optional-dependencies']['backplane']))" \
        > /build/requirements.txt \
    && if ls /build/*.whl >/dev/null 2>&1; then \
        echo "installing from wheels/ (offline)"; \
        pip install --no-index --find-links /build -r /build/requirements.txt; \
    else \
        echo "no wheels/ in the build context: installing from the package index"; \
        pip install -r /build/requirements.txt; \
    fi \
    && rm -rf /build

# The project itself, always from source (.dockerignore admits only the
# packaging files, the three packages and wheels/, minus any wheel of zchat
# itself, which could be stale). The build backend is already in the venv:
# no build isolation (it would need an index or the wheels again), no deps.
COPY . /build/src/
RUN pip install --no-deps --no-build-isolation /build/src \
    && rm -rf /build \
    && zchat-broker --version

USER zchat
VOLUME ["/data"]
