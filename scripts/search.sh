#!/usr/bin/env bash
# The semantic-search example's PostgreSQL, under a directory of this checkout (default
# .run/pg/): data in data/, reachable only through the Unix socket in socket/ (no TCP), run as
# an unprivileged user (postgres, when this script runs as root). Nothing under /etc is used.
#
#   scripts/search.sh start    initdb when needed, start PostgreSQL, create database "search"
#   scripts/search.sh index    index Debian's package descriptions (examples/search/index.php;
#                              needs the TensorBridge server with minilm and search-index)
#   scripts/search.sh stop     stop PostgreSQL
#   scripts/search.sh status   exit 0 when it runs
#   scripts/search.sh toml     print the two models' config for `tensorbridge serve --config`
#   scripts/search.sh env NAME print TB_SEARCH_DSN or TB_SEARCH_VECTORS (what PHP is given)
#
# Environment: TB_PG_DIR (default .run/pg), TB_SEARCH_LIMIT (documents to index, default 2000;
# 0 = all), TENSORBRIDGE_SOCKET (for index). scripts/web.sh runs start/index/stop for `make demo`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGROOT=$(realpath -m "${TB_PG_DIR:-$ROOT/.run/pg}")
DATA=$PGROOT/data
SOCKDIR=$PGROOT/socket
VECTORS=$PGROOT/vectors.tbv
DB=search
ROLE=tensorbridge
export TB_SEARCH_DSN="pgsql:host=$SOCKDIR;dbname=$DB;user=$ROLE"
export TB_SEARCH_VECTORS=$VECTORS

say() { printf 'search: %s\n' "$*"; }
die() { printf 'search: error: %s\n' "$*" >&2; exit 1; }

bindir() {
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -x $dir/pg_ctl ]] || die "PostgreSQL is needed: run 'make setup' (apt-get install postgresql php8.2-pgsql)"
  echo "$dir"
}

# PostgreSQL refuses to run as root: as root, run its programs as the postgres user.
as_pg() {
  if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}

running() {
  local bin
  [[ -f $DATA/PG_VERSION ]] || return 1
  bin=$(bindir)
  [[ -f $DATA/PG_VERSION ]] && as_pg "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start() {
  local bin
  bin=$(bindir)
  if running; then
    say "PostgreSQL already runs ($DATA)"
  else
    mkdir -p "$PGROOT"
    chmod 755 "$PGROOT"
    if ((EUID == 0)) && ! runuser -u postgres -- test -x "$PGROOT"; then
      die "the postgres user cannot enter $PGROOT (a parent directory is private); give another place: TB_PG_DIR=/var/tmp/tb-pg make demo"
    fi
    if [[ ! -f $DATA/PG_VERSION ]]; then
      say "creating a PostgreSQL cluster in $DATA"
      mkdir -p "$DATA"
      ((EUID == 0)) && chown postgres: "$DATA"
      as_pg "$bin/initdb" -D "$DATA" -U "$ROLE" --auth=trust -E UTF8 --no-locale >/dev/null \
        || die "initdb failed in $DATA"
    fi
    mkdir -p "$SOCKDIR"
    ((EUID == 0)) && chown postgres: "$SOCKDIR"
    say "starting PostgreSQL (socket $SOCKDIR, log $DATA/postgres.log)"
    as_pg "$bin/pg_ctl" -D "$DATA" -l "$DATA/postgres.log" -w -t 60 \
      -o "-c listen_addresses='' -c unix_socket_directories='$SOCKDIR'" start >/dev/null \
      || die "PostgreSQL did not start; see $DATA/postgres.log"
  fi
  if ! "$bin/psql" -h "$SOCKDIR" -U "$ROLE" -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
    "$bin/createdb" -h "$SOCKDIR" -U "$ROLE" "$DB" || die "cannot create database $DB"
  fi
}

stop() {
  local bin
  [[ -f $DATA/PG_VERSION ]] || return 0   # never created here
  bin=$(bindir)
  if running; then
    as_pg "$bin/pg_ctl" -D "$DATA" -m fast -w stop >/dev/null && say "stopped PostgreSQL"
  fi
}

index() {
  running || die "PostgreSQL is not running: scripts/search.sh start"
  php "$ROOT/examples/search/index.php" --limit "${TB_SEARCH_LIMIT:-2000}"
}

toml() {
  cat <<EOF
[models.minilm]
source = "tensorbridge.models.minilm:create"
# two copies with one thread each: on ONNX Runtime this costs a third less CPU per sentence than
# one copy with two threads (docs/models.md)
instances = 2
max_batch_size = 64
max_queue_delay_us = 2000

[models.search-index]
source = "tensorbridge.models.nearest:create"
options = { path = "$VECTORS", dim = 384, top_k = 10 }
max_batch_size = 16
max_queue_delay_us = 1000
EOF
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  index) index ;;
  toml) toml ;;
  env) printf '%s\n' "${!2}" ;;   # the value of TB_SEARCH_DSN or TB_SEARCH_VECTORS
  status) if running; then say "PostgreSQL runs ($DATA)"; else say "PostgreSQL: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|index|stop|status|toml|env NAME" >&2; exit 2 ;;
esac
