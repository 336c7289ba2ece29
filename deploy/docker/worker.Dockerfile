# syntax=docker/dockerfile:1.7
# The bulk-job worker: `perito worker` on a CUDA GPU (falls back to the CPU without one).
#   docker build -f deploy/docker/worker.Dockerfile -t perito-worker:0.1.0-cuda .

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11=3.11.* python3.11-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3.11 -m venv /opt/perito
COPY pyproject.toml setup.py constraints.txt README.md ./
COPY scripts/gen_protos.py scripts/
COPY proto/ proto/
COPY client/ client/
COPY core/ core/
COPY server/ server/
COPY worker/ worker/
COPY training/ training/
# PyPI's torch 2.14.1 wheels are the CUDA builds.
RUN /opt/perito/bin/pip install -c constraints.txt ".[serve]"

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11=3.11.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 perito \
    && useradd --system --uid 10001 --gid perito --home-dir /var/lib/perito --create-home perito
COPY --from=build /opt/perito /opt/perito
ENV PATH=/opt/perito/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PERITO_DEVICE=auto \
    PERITO_POOL=solo \
    PERITO_METRICS_PORT=9501 \
    PERITO_CACHE_DIR=/var/lib/perito/cache \
    PERITO_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/perito
EXPOSE 9501
# SIGTERM is Celery's warm shutdown: the chunk in hand finishes (or, past the grace period,
# is redelivered to another worker: tasks are acknowledged late).
STOPSIGNAL SIGTERM
ENTRYPOINT ["perito"]
CMD ["worker"]
