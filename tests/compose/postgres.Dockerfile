# The compose test's PostgreSQL 15: Debian's postgresql-15 on the same base as the sidecar image,
# running sidecar/testing/postgres.py (the Supabase shim and the migration, as in the e2e tests)
# from the sidecar image's venv. The apt layer depends only on the base image, so it stays cached
# while the sidecar's code changes; only the venv is copied again.
ARG SIDECAR_IMAGE=sidecar:compose-test
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${SIDECAR_IMAGE} AS sidecar

FROM ${PYTHON_IMAGE}
# The same title as the sidecar image: compose-test prunes both images' dangling old builds.
LABEL org.opencontainers.image.title="sidecar" \
      org.opencontainers.image.description="PostgreSQL 15 with the sidecar migration, for the compose test only."
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=sidecar /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
# Listens on every address of the container; trust for the compose network only (samenet).
ENTRYPOINT ["python", "-m", "sidecar.testing.postgres", "--listen", "0.0.0.0", "--port", "5432"]
