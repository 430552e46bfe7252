# syntax=docker/dockerfile:1
# zeroq-server, zeroq-worker and the zeroq command line on Debian 12.
#
#   docker build -t zeroq .
#   docker run -p 50051:50051 -p 9464:9464 -v zeroq-data:/var/lib/zeroq \
#     -v "$PWD/tenants.json:/etc/zeroq/tenants.json:ro" zeroq
#
# The server listens on all interfaces, so it wants a tenants file (API keys
# as SHA-256, quotas; deploy/tenants.example.json shows the format); none is
# baked into the image. docker-compose.yml runs it with Prometheus and
# Grafana, deploy/k8s/ on Kubernetes.

# ---------------------------------------------------------------- builder
# Builds exactly as CI does: the same package script, the same build script
# (which also builds the tests).
FROM debian:12 AS builder
ENV DEBIAN_FRONTEND=noninteractive
WORKDIR /src
COPY . .
RUN bash scripts/install-deps.sh
RUN --mount=type=cache,target=/root/.cache/ccache bash scripts/build.sh

# ---------------------------------------------------------------- runtime
FROM debian:12
ARG DEBIAN_FRONTEND=noninteractive
# The packages of the shared libraries the three binaries link directly
# (readelf -d NEEDED, then dpkg -S); apt brings what those link in turn.
# libc6, libgcc-s1 and libstdc++6 are in the base image. libopenblas0 is
# LibTorch's recommended BLAS (the reference libblas3 is much slower).
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libabsl20220623 \
      libgrpc++1.51 \
      libgrpc29 \
      libprotobuf32 \
      libprometheus-cpp-core1.0 \
      libprometheus-cpp-pull1.0 \
      libsqlite3-0 \
      libssl3 \
      libtorch1.13 \
      libopenblas0 \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/zeroq \
      --shell /usr/sbin/nologin zeroq \
 && mkdir -p /var/lib/zeroq /etc/zeroq \
 && chown zeroq:zeroq /var/lib/zeroq

# The server starts the worker from beside itself.
COPY --from=builder /src/build/server/zeroq-server \
                    /src/build/core/worker/zeroq-worker \
                    /src/build/client/zeroq \
                    /usr/local/bin/

USER zeroq
WORKDIR /var/lib/zeroq
VOLUME /var/lib/zeroq
# gRPC API, Prometheus /metrics.
EXPOSE 50051 9464

# Healthy while the server answers: `zeroq` exits 3 only when it cannot
# connect; an answer such as UNAUTHENTICATED (no key given here) exits 1
# and still shows a serving server. With TLS on, pass --tls_ca as well.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD zeroq --server=127.0.0.1:50051 --connect_timeout=5 models > /dev/null 2>&1; \
      [ $? -ne 3 ]

CMD ["zeroq-server", "--listen=0.0.0.0:50051", "--metrics_listen=0.0.0.0:9464", \
     "--data_dir=/var/lib/zeroq", "--tenants_file=/etc/zeroq/tenants.json"]
