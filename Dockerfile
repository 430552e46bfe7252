# zeroq-server, zeroq-worker and the zeroq command line on Debian 12, with
# LibTorch from the pinned torch wheel (scripts/requirements-torch.txt: the
# CUDA 13.2 build). Jobs run on a GPU where the container is given one
# (docker run --gpus all, or the compose profile "gpu"), else on the CPU.
#
#   docker build -t zeroq .
#   docker run --network host -v zeroq-data:/var/lib/zeroq \
#     -v "$PWD/tenants.json:/etc/zeroq/tenants.json:ro" zeroq
#
# The default command listens on all interfaces, so it wants a tenants file
# (API keys as SHA-256, quotas; deploy/tenants.example.json shows the
# format); none is baked into the image. docker-compose.yml runs it with
# Prometheus and Grafana, deploy/k8s/ on Kubernetes. Plain Dockerfile syntax:
# the classic builder and BuildKit both build it.

# ---------------------------------------------------------------- builder
# Builds as CI does: the same package script, the same build script. The
# LibTorch environment goes to a fixed path, which the binaries' RPATH names
# and the runtime stage copies to the same place.
FROM debian:12 AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    ZEROQ_VENV=/opt/zeroq/venv-torch-2.15.0
WORKDIR /src
# The package script and its lists alone first: that layer (the Debian
# packages and the 4.4 GB torch environment) is reused while sources change.
COPY scripts/install-deps.sh scripts/torch_env.sh scripts/requirements-torch.txt scripts/
RUN ZEROQ_SKIP_TEST_PACKAGES=1 bash scripts/install-deps.sh
COPY . .
# The programs only (no tests or benchmarks); no ccache in a one-off build.
RUN CCACHE_DISABLE=1 bash scripts/build.sh -DZEROQ_BUILD_TESTS=OFF -DZEROQ_BUILD_BENCH=OFF

# ---------------------------------------------------------------- runtime
FROM debian:12
ARG DEBIAN_FRONTEND=noninteractive
# The packages of the shared libraries the three binaries link directly
# (readelf -d NEEDED, then dpkg -S); apt brings what those link in turn.
# libc6, libgcc-s1 and libstdc++6 are in the base image; LibTorch and its
# OpenMP, CUDA and cuDNN libraries come from the torch environment below.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libabsl20220623 \
      libgrpc++1.51 \
      libgrpc29 \
      libpq5 \
      libpqxx-6.4 \
      libprotobuf32 \
      libprometheus-cpp-core1.0 \
      libprometheus-cpp-pull1.0 \
      libsqlite3-0 \
      libssl3 \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/zeroq \
      --shell /usr/sbin/nologin zeroq \
 && mkdir -p /var/lib/zeroq /etc/zeroq \
 && chown zeroq:zeroq /var/lib/zeroq

# LibTorch's libraries at the path the binaries' RPATH names: torch/lib
# (libtorch_cpu.so, libc10.so, and libtorch_cuda.so, which a worker loads
# only for a CUDA device) and, beside it, the wheel's CUDA libraries
# (nvidia/*/lib), which torch/lib's libraries find through their own
# $ORIGIN/../../nvidia RPATH. No Python: the rest of the environment stays in
# the builder.
ARG TORCH_SITE=/opt/zeroq/venv-torch-2.15.0/lib/python3.11/site-packages
COPY --from=builder ${TORCH_SITE}/torch/lib ${TORCH_SITE}/torch/lib
COPY --from=builder ${TORCH_SITE}/nvidia ${TORCH_SITE}/nvidia

# The server starts the worker from beside itself.
COPY --from=builder /src/build/server/zeroq-server \
                    /src/build/core/worker/zeroq-worker \
                    /src/build/client/zeroq \
                    /usr/local/bin/

# The NVIDIA container runtime mounts the driver's compute libraries when the
# container is given a GPU. ZEROQ_SERVER is where `zeroq` (and the health
# check) finds the server: set it when --listen is another port.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ZEROQ_SERVER=127.0.0.1:50051

USER zeroq
WORKDIR /var/lib/zeroq
VOLUME /var/lib/zeroq
# gRPC API, Prometheus /metrics, HTTP/JSON API and dashboard.
EXPOSE 50051 9464 8080

# Healthy while the server answers: `zeroq` exits 3 only when it cannot
# connect; an answer such as UNAUTHENTICATED (no key given here) exits 1
# and still shows a serving server. With TLS on, pass --tls_ca as well.
HEALTHCHECK --interval=15s --timeout=10s --start-period=30s --retries=3 \
  CMD zeroq --connect_timeout=5 models > /dev/null 2>&1; [ $? -ne 3 ]

CMD ["zeroq-server", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464", \
     "--http_listen=0.0.0.0:8080", \
     "--data_dir=/var/lib/zeroq", "--tenants_file=/etc/zeroq/tenants.json"]
