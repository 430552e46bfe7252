#!/usr/bin/env bash
# Installs everything the project needs to build, test and run:
#  - Debian 12 packages (toolchain, gRPC, Protobuf, Abseil, SQLite,
#    PostgreSQL, ...);
#  - LibTorch from the pinned `torch` wheel (scripts/requirements-torch.txt,
#    CUDA-enabled, runs on the CPU without a GPU) in a Python virtual
#    environment outside the repo, $ZEROQ_VENV (default below), so that the
#    system Python's packages stay untouched and every clone shares it.
# Idempotent: present packages are skipped, and the environment is rebuilt
# only when the pinned list changes. Used by .ci/run, the README commands and
# the Dockerfile. Nothing is downloaded at build or run time.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/torch_env.sh   # ZEROQ_VENV

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  # core (LibTorch itself comes from the torch wheel below)
  libabsl-dev nlohmann-json3-dev
  # service
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  prometheus-cpp-dev libsqlite3-dev libssl-dev
  # the PostgreSQL job store (libpqxx 6.4 over libpq)
  libpq-dev libpqxx-dev
  # the HTTP/JSON API and its event streams (Boost.Beast on Asio, headers)
  libboost1.74-dev
  # tests
  libgtest-dev libgmock-dev googletest openssl curl
  # the virtual environment; Python's gRPC and Protobuf (seen from inside it)
  # for the Python client; Fashion-MNIST for the accuracy checks
  python3 python3-venv python3-grpcio python3-protobuf dataset-fashion-mnist
  # deployment checks: YAML parsing, promtool
  python3-yaml prometheus
)

# Only the tests use these; ZEROQ_SKIP_TEST_PACKAGES=1 (the image's build)
# leaves them out.
TEST_PACKAGES=(
  # the dashboard's test in a real browser (headless, over WebDriver)
  chromium chromium-driver
  # the PostgreSQL server of the JobStore tests (scripts/pg_test_server.sh)
  postgresql-15
)
if [ "${ZEROQ_SKIP_TEST_PACKAGES:-0}" != 1 ]; then
  PACKAGES+=("${TEST_PACKAGES[@]}")
fi

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing+=("$p")
  fi
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} Debian packages present"
else
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The torch wheel. The stamp holds the hash of the pinned list it was made
# from; a changed list rebuilds the environment from scratch.
req=scripts/requirements-torch.txt
want=$(sha256sum "$req" | cut -d' ' -f1)
stamp="$ZEROQ_VENV/.zeroq-requirements.sha256"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
   "$ZEROQ_VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "install-deps: LibTorch present ($ZEROQ_VENV)"
  exit 0
fi
echo "install-deps: installing torch into $ZEROQ_VENV (about 4.4 GB with its CUDA libraries)"
rm -rf "$ZEROQ_VENV"
mkdir -p "$(dirname "$ZEROQ_VENV")"
# Debian's Python, with its site packages visible (gRPC, Protobuf, YAML);
# what the environment installs itself comes first.
/usr/bin/python3 -m venv --system-site-packages "$ZEROQ_VENV"
"$ZEROQ_VENV/bin/pip" install --quiet --no-input --disable-pip-version-check \
  --no-deps -r "$req"
"$ZEROQ_VENV/bin/python" -c 'import torch; assert torch.__version__.startswith("2.15.0"), torch.__version__'
echo "$want" > "$stamp"
echo "install-deps: done"
