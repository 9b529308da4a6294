# The sidecar as a container entrypoint: `sidecar run -- CMD…` as PID 1, the dev server as its
# child. Build:   docker build --network host -t sidecar .
# Run (the orchestrator passes the signed URL and the scoped token, see README):
#   docker run -e SNAPSHOT_URL=… -e REALTIME_URL=… -e REALTIME_APIKEY=… -e REALTIME_TOKEN=… \
#              -e PROJECT_ID=… -p 3000:3000 -p 8787:8787 sidecar [your dev server command]
#
# Works with the real python:3.11-slim-bookworm and with the local debootstrap stand-in that
# scripts/docker-setup builds (whose interpreter is only `python3`): every step calls `python3`
# or the venv's own `python`. Uses only classic Dockerfile syntax so that the legacy builder
# (no BuildKit, as with docker.io 20.10 + docker-compose 1.29) builds it too.
# No tini: the sidecar is PID 1 itself (forwards signals, reaps zombies).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Two venvs: /opt/venv is what ships; /opt/buildtools only builds the project's wheel, so the
# runtime venv carries no build backend.
RUN python3 -m venv /opt/venv \
 && python3 -m venv /opt/buildtools \
 && /opt/buildtools/bin/pip install --quiet "setuptools>=68" wheel

# Dependencies first, from pyproject.toml alone: editing the code does not reinstall them.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; d = tomllib.load(open('/src/pyproject.toml', 'rb')); print('\n'.join(d['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --quiet --only-binary=:all: -r /tmp/requirements.txt

# The project itself, as a wheel (no source tree in the runtime image).
COPY README.md /src/README.md
COPY sidecar /src/sidecar
# pip and setuptools leave the runtime venv (25 MB, and nothing at runtime needs them).
RUN /opt/buildtools/bin/pip wheel --quiet --no-deps --no-build-isolation -w /tmp/wheels /src \
 && /opt/venv/bin/pip install --quiet --no-deps /tmp/wheels/*.whl \
 && /opt/venv/bin/pip uninstall --quiet --yes pip setuptools \
 && /opt/venv/bin/sidecar --help >/dev/null

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="Hydrates a project from a signed snapshot and keeps it in sync over Supabase Realtime; runs the dev server as its child." \
      org.opencontainers.image.licenses="MIT"

RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin app \
 && mkdir -p /app/project \
 && chown app:app /app/project

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PROJECT_DIR=/app/project \
    SIDECAR_HTTP_ADDR=0.0.0.0:8787

# Two users (README, "Trust boundary"): the sidecar runs as root so that it can run the dev
# server as `app` (SIDECAR_CHILD_USER), hand it the project tree, and keep the token file and its
# state to itself; it is non-dumpable, so `app` cannot read its /proc/<pid>/environ or mem.
# Hardened runs drop the rest: --cap-drop ALL --cap-add CHOWN,DAC_OVERRIDE,FOWNER,SETUID,SETGID,KILL
ENV SIDECAR_CHILD_USER=app
WORKDIR /app/project
EXPOSE 8787 3000

# Liveness only (/healthz); orchestrators that want readiness probe /readyz themselves.
# No curl in slim images: the venv's python does the GET, on the port SIDECAR_HTTP_ADDR names.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; h, _, p = os.environ.get('SIDECAR_HTTP_ADDR', '0.0.0.0:8787').rpartition(':'); h = h.strip('[]'); h = '127.0.0.1' if h in ('', '0.0.0.0', '::', '*') else ('[' + h + ']' if ':' in h else h); urllib.request.urlopen('http://' + h + ':' + p + '/healthz', timeout=2)"]

ENTRYPOINT ["sidecar", "run", "--"]
CMD ["python3", "-m", "http.server", "3000"]
