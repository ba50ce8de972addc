# syntax=docker/dockerfile:1
#
# thinnest-gateway container image (needs BuildKit, the default builder since Docker 23).
#
#   docker build -t thinnest-gateway .
#   docker run --rm -p 8080:8080 \
#     -v "$PWD/my-gateway.yaml:/etc/thinnest-gateway/gateway.yaml:ro" thinnest-gateway
#
# The image runs `thinnest-gateway serve` as UID/GID 10001 with GATEWAY_CONFIG pointing at
# /etc/thinnest-gateway/gateway.yaml (a copy of config/gateway.yaml until you mount your own
# file there). Other commands: `docker run --rm thinnest-gateway check-config`,
# `... simulate --host 0.0.0.0`, `... keys new --tenant T --name N`.
#
# The admin port (/metrics, /healthz, /readyz) binds 127.0.0.1 unless the config says otherwise,
# which inside a container means nothing outside it can reach it: container configs set
# `admin: {host: 0.0.0.0, port: 9091}` (deploy/kubernetes/base/gateway.yaml,
# deploy/compose/gateway.yaml) and keep the port off the callers' network instead.
#
# Lint: .venv/bin/hadolint Dockerfile (part of `make check`).

# ---- build: wheels of the project and every dependency -------------------------------------
# Both stages use the same base, so the wheels match the runtime's interpreter and libc.
FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
# All runtime dependencies ship binary wheels for CPython 3.11 on amd64 and arm64, so this
# stage needs no compiler and no apt packages.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---- runtime: the installed package and the production example, nothing else ---------------
FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="thinnest-gateway" \
      org.opencontainers.image.description="API gateway in front of the thinnestAI agent chat API"
# The wheels are bind-mounted from the build stage, never copied into a layer. Installing from
# them with --no-index needs no network. pip, setuptools and wheel are removed afterwards: the
# gateway does not use them at run time, and an image without an installer is a smaller target.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --disable-pip-version-check --no-cache-dir --no-index /wheels/*.whl \
    && pip uninstall --disable-pip-version-check --yes pip setuptools wheel \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin gateway
COPY config/gateway.yaml /etc/thinnest-gateway/gateway.yaml
# Byte code was compiled at install time; at run time the root filesystem may be read-only.
ENV GATEWAY_CONFIG=/etc/thinnest-gateway/gateway.yaml \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# 8080: callers (listen). 9091: admin (/metrics, /healthz, /readyz), for Prometheus and probes.
EXPOSE 8080 9091
# The caller port's /healthz, with the interpreter already in the image (slim has no curl).
# Kubernetes ignores HEALTHCHECK and probes the admin port itself (deploy/kubernetes/).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# SIGTERM: /readyz turns 503, in-flight requests get shutdown_grace seconds, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["thinnest-gateway"]
CMD ["serve"]
