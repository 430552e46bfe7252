#!/usr/bin/env bash
# A throwaway PostgreSQL 15 for the tests: a fresh cluster in DIR that
# listens only on a Unix socket in DIR (no TCP), trusts every local
# connection, and skips fsync. ctest starts and stops it around the server
# tests (fixture "postgres", server/CMakeLists.txt).
#
#   scripts/pg_test_server.sh start DIR   # prints the URI once it accepts connections
#   export ZEROQ_TEST_PG_URI=$(scripts/pg_test_server.sh start /tmp/zq-pg)
#   scripts/pg_test_server.sh stop DIR    # stops it and removes DIR
#   scripts/pg_test_server.sh pause DIR   # stops it, keeps DIR and its data
#   scripts/pg_test_server.sh resume DIR  # starts it again on the same socket
#   scripts/pg_test_server.sh restart DIR # pause, then resume
#
# pause and resume make a database outage (tests of servers that must ride
# one out): pause stops the cluster (-m fast: open connections are cut, and
# every committed transaction is kept, which an immediate stop would not
# promise with synchronous_commit off) and leaves its folder and data;
# resume starts the same cluster on the same socket, waits until it accepts
# connections and prints the URI.
#
# `start` first stops and removes what an earlier run left in DIR (a run
# killed before its `stop`). PostgreSQL refuses to run as root: as root the
# cluster belongs to the postgres user (Debian's postgresql-15 package makes
# it), and when that user cannot reach DIR (a checkout under /root, say) the
# cluster goes to a folder under /tmp that DIR links to. The socket's path,
# DIR/.s.PGSQL.5432, must fit in 107 bytes.
set -euo pipefail

PG_BIN=${ZEROQ_PG_BIN:-/usr/lib/postgresql/15/bin}
PORT=5432   # only names the socket file: nothing listens on TCP

usage() {
  echo "usage: $0 start|stop|pause|resume|restart DIR" >&2
  exit 2
}
[ $# -eq 2 ] || usage
command=$1
dir=$(realpath -m -s -- "$2")   # -s: DIR may be our own link
case $dir in
  *[[:space:]\'\"\&\?=%#]*)
    echo "pg_test_server: DIR must not contain blanks, quotes or URI characters: $dir" >&2
    exit 2 ;;
esac

as_owner=()
if [ "$(id -u)" -eq 0 ]; then as_owner=(runuser -u postgres --); fi

# The cluster's folder: DIR itself, or where DIR links to.
cluster_dir() {
  if [ -L "$dir" ]; then readlink -- "$dir"; else echo "$dir"; fi
}

stop() {
  local real
  real=$(cluster_dir)
  if [ -f "$real/data/postmaster.pid" ]; then
    # Immediate: the cluster is thrown away, no checkpoint is worth waiting
    # for. Fails harmlessly when the server is already gone.
    (cd / && "${as_owner[@]}" "$PG_BIN/pg_ctl" stop -D "$real/data" -m immediate -w -t 60) \
      > /dev/null 2>&1 || true
  fi
  if [ -L "$dir" ]; then rm -f -- "$dir"; fi
  rm -rf -- "$real" "$dir"
}

start() {
  if [ ! -x "$PG_BIN/initdb" ]; then
    echo "pg_test_server: no $PG_BIN/initdb; install postgresql-15 (scripts/install-deps.sh)" >&2
    exit 1
  fi
  local socket="$dir/.s.PGSQL.$PORT"
  if [ ${#socket} -gt 107 ]; then
    echo "pg_test_server: the socket path $socket is longer than 107 bytes; choose a shorter DIR" >&2
    exit 1
  fi
  stop
  mkdir -p -- "$(dirname -- "$dir")"
  local real=$dir
  if [ ${#as_owner[@]} -gt 0 ] && ! "${as_owner[@]}" test -x "$(dirname -- "$dir")"; then
    real=$(mktemp -d /tmp/zeroq-pg-XXXXXX)
    ln -s -- "$real" "$dir"
  else
    mkdir -- "$dir"
  fi
  if [ ${#as_owner[@]} -gt 0 ]; then chown postgres: "$real"; fi
  chmod 700 "$real"

  # initdb and pg_ctl complain when they cannot read the working directory.
  cd "$real"
  if ! "${as_owner[@]}" "$PG_BIN/initdb" -D "$real/data" --username=postgres \
      --auth=trust --encoding=UTF8 --no-locale --no-sync > "$real/initdb.log" 2>&1; then
    cat "$real/initdb.log" >&2
    echo "pg_test_server: initdb failed" >&2
    exit 1
  fi
  run_cluster "$real"
}

# Starts the cluster in $1 (its data in $1/data) and waits until it accepts
# connections; prints the URI.
run_cluster() {
  local real=$1
  local socket="$dir/.s.PGSQL.$PORT"
  if ! "${as_owner[@]}" "$PG_BIN/pg_ctl" start -D "$real/data" -l "$real/server.log" -w -t 60 \
      -o "-c listen_addresses='' -c unix_socket_directories='$real' -c port=$PORT \
          -c fsync=off -c synchronous_commit=off -c full_page_writes=off" > /dev/null; then
    tail -n 20 "$real/server.log" >&2 || true
    echo "pg_test_server: the server did not start" >&2
    exit 1
  fi
  # pg_ctl -w waits for the postmaster; wait until it takes connections too.
  for _ in $(seq 1 300); do
    if "$PG_BIN/pg_isready" -q -h "$dir" -p "$PORT" -U postgres -d postgres; then
      echo "postgresql:///postgres?host=$dir&port=$PORT&user=postgres"
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$real/server.log" >&2 || true
  echo "pg_test_server: the server does not accept connections on $socket" >&2
  exit 1
}

# Stops the cluster, keeping its folder and data.
pause() {
  local real
  real=$(cluster_dir)
  if [ ! -d "$real/data" ]; then
    echo "pg_test_server: no cluster in $dir" >&2
    exit 1
  fi
  if [ -f "$real/data/postmaster.pid" ]; then
    if ! (cd / && "${as_owner[@]}" "$PG_BIN/pg_ctl" stop -D "$real/data" -m fast -w -t 60) \
        > /dev/null; then
      echo "pg_test_server: the server in $dir did not stop" >&2
      exit 1
    fi
  fi
}

# Starts the paused cluster again (on the same socket).
resume() {
  local real
  real=$(cluster_dir)
  if [ ! -d "$real/data" ]; then
    echo "pg_test_server: no cluster in $dir" >&2
    exit 1
  fi
  cd "$real"
  run_cluster "$real"
}

case $command in
  start) start ;;
  stop) stop ;;
  pause) pause ;;
  resume) resume ;;
  restart) pause; resume ;;
  *) usage ;;
esac
