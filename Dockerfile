# syntax=docker/dockerfile:1
# Build: docker build -t thinnest-gateway .
# Run:   docker run -p 8080:8080 -e THINNESTAI_API_KEY=... \
#          -v $PWD/config/gateway.yaml:/etc/thinnest-gateway/gateway.yaml:ro thinnest-gateway

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config /etc/thinnest-gateway
ENV GATEWAY_CONFIG=/etc/thinnest-gateway/gateway.yaml \
    PYTHONUNBUFFERED=1
USER 10001
EXPOSE 8080 9091
HEALTHCHECK --interval=10s --timeout=2s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["thinnest-gateway"]
CMD ["serve"]
