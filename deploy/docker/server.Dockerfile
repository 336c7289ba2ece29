# syntax=docker/dockerfile:1.7
# The front service: `perito serve` (gRPC, CPU) and `perito web`. Slim, CPU-only torch.
#   docker build -f deploy/docker/server.Dockerfile -t perito-server:0.1.0 .

FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/perito
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY scripts/gen_protos.py scripts/
COPY proto/ proto/
COPY client/ client/
COPY core/ core/
COPY server/ server/
COPY worker/ worker/
COPY training/ training/
# CPU wheels of the pinned torch: a fraction of the CUDA build's size.
RUN /opt/perito/bin/pip install --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple \
        -c constraints.txt ".[serve,web]"

FROM python:3.11.10-slim-bookworm
LABEL org.opencontainers.image.title="perito-server" \
      org.opencontainers.image.source="https://github.com/perito/perito"
RUN groupadd --system --gid 10001 perito \
    && useradd --system --uid 10001 --gid perito --home-dir /var/lib/perito --create-home perito
COPY --from=build /opt/perito /opt/perito
ENV PATH=/opt/perito/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PERITO_HOST=0.0.0.0 \
    PERITO_PORT=8500 \
    PERITO_METRICS_PORT=9500 \
    PERITO_CACHE_DIR=/var/lib/perito/cache \
    PERITO_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/perito
EXPOSE 8500 8000 9500
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["perito", "health", "--server", "127.0.0.1:8500"]
# SIGTERM: NOT_SERVING first, in-flight calls finish, then exit (PERITO_GRACE_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["perito"]
CMD ["serve"]
