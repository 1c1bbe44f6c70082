#!/usr/bin/env bash
# The web demo's stack: the TensorBridge server, PHP-FPM and nginx, configured under a run
# directory of this checkout (default .run/web/); no system configuration is touched.
#
#   scripts/web.sh start    start all three (or say they are up), wait until the page answers
#   scripts/web.sh stop     stop them and remove the socket and pid files
#   scripts/web.sh status   what runs, exit 0 only when all three do
#
# Environment: TB_WEB_PORT (default 8080), TB_WEB_DIR (default .run/web), TB_WEB_MODELS
# (space-separated NAME=SOURCE, default digits, digits-image and resnet18), PYTHON (python3),
# TB_SEARCH (1: also the semantic search at /search/, with PostgreSQL and the models minilm
# and search-index; 0: the image demo only), TB_PG_DIR and TB_SEARCH_LIMIT (scripts/search.sh).
# `make demo` runs it through scripts/demo.sh, and so does the browser test
# (python/tests/test_web.py), on a port and in a directory of its own.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${TB_WEB_PORT:-8080}
RUN=$(realpath -m "${TB_WEB_DIR:-$ROOT/.run/web}")   # absolute: nginx and php-fpm need it
PYTHON=${PYTHON:-python3}
MODELS=${TB_WEB_MODELS:-digits=tensorbridge.models.digits:create \
digits-image=tensorbridge.models.digits:create_image \
resnet18=tensorbridge.models.resnet:create}
SOCKET=$RUN/tb.sock
SEARCH=${TB_SEARCH:-1}
SEARCH_SH=$ROOT/scripts/search.sh
URL="http://127.0.0.1:$PORT/"
START_TIMEOUT=${TB_WEB_START_TIMEOUT:-300}   # seconds; ResNet-18 loads and warms up first
# Run this checkout's package even where another copy is installed (as the Makefile does).
export PYTHONPATH="$ROOT/python/src${PYTHONPATH:+:$PYTHONPATH}"

say() { printf 'web: %s\n' "$*"; }
die() {
  printf 'web: error: %s\n' "$*" >&2
  # A start that fails half way stops what it had started (the server holds the models).
  [[ ${STARTING:-} == 1 ]] && { STARTING=0; stop >/dev/null 2>&1 || true; }
  exit 1
}

# Prints the pid recorded in $RUN/NAME.pid when that process is alive and is the program we
# started (a pid left by a crash may have been reused by an unrelated process).
live_pid() {
  local name=$1 pattern=$2 pid
  [[ -s $RUN/$name.pid ]] || return 1
  pid=$(tr -dc 0-9 <"$RUN/$name.pid")
  [[ -n $pid ]] && alive "$pid" || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$pattern" || return 1
  echo "$pid"
}

# Each pattern names this run's files, so a reused pid of the system's nginx or php-fpm
# never matches.
server_pid() { live_pid server "tensorbridge serve --socket $SOCKET"; }
fpm_pid() { live_pid php-fpm "$RUN/php-fpm.conf"; }
nginx_pid() { live_pid nginx "$RUN"; }

# True while the process runs. A daemon that exited stays a zombie until its parent (init,
# since the daemons outlive this script) reaps it, which can take seconds: that counts as gone.
alive() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [[ -n $state && $state != Z ]]
}

stop_one() {
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do   # up to 10 s for a clean exit, then SIGKILL
    alive "$pid" || { say "stopped $name (pid $pid)"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  say "killed $name (pid $pid): it did not stop within 10 s"
}

stop() {
  local pid
  if pid=$(nginx_pid); then stop_one nginx "$pid"; fi
  if pid=$(fpm_pid); then stop_one php-fpm "$pid"; fi
  if pid=$(server_pid); then stop_one "tensorbridge server" "$pid"; fi
  if ((SEARCH)); then "$SEARCH_SH" stop; fi
  rm -f "$RUN"/{server,php-fpm,nginx}.pid "$SOCKET" "$RUN/php-fpm.sock"
}

status() {
  local ok=0 pid
  if pid=$(server_pid); then say "tensorbridge server: pid $pid, socket $SOCKET"; else say "tensorbridge server: not running"; ok=1; fi
  if pid=$(fpm_pid); then say "php-fpm: pid $pid"; else say "php-fpm: not running"; ok=1; fi
  if pid=$(nginx_pid); then say "nginx: pid $pid, $URL"; else say "nginx: not running"; ok=1; fi
  if ((SEARCH)); then "$SEARCH_SH" status || ok=1; fi
  return $ok
}

render() {   # template -> file, replacing @RUN@ @PORT@ @DOCROOT@ @SOCKET@ @ROOT@ @SEARCH_*@
  sed -e "s|@RUN@|$RUN|g" -e "s|@PORT@|$PORT|g" -e "s|@DOCROOT@|$ROOT/examples/web/public|g" \
    -e "s|@SOCKET@|$SOCKET|g" -e "s|@ROOT@|$ROOT|g" \
    -e "s|@SEARCH_DSN@|$("$SEARCH_SH" env TB_SEARCH_DSN)|g" \
    -e "s|@SEARCH_VECTORS@|$("$SEARCH_SH" env TB_SEARCH_VECTORS)|g" "$1" >"$2"
}

port_free() {
  "$PYTHON" - "$PORT" <<'EOF'
import socket, sys
with socket.socket() as s:
    # As nginx binds: connections it closed a moment ago (TIME_WAIT) do not block the port.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(sys.argv[1])))
    except OSError:
        sys.exit(1)
EOF
}

page_up() {
  "$PYTHON" - "$URL" <<'EOF'
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=5).status == 200 else 1)
except OSError:
    sys.exit(1)
EOF
}

# Waits for the server's "ready on" line, echoing its log (model loading, warm-up) meanwhile.
wait_for_server() {
  local pid=$1 shown=0 lines deadline=$((SECONDS + START_TIMEOUT))
  while true; do
    local ready=0
    # Look for readiness first, then show every line up to now: the other way round, a
    # "ready on" written in between would end the wait without being shown.
    grep -q "ready on" "$RUN/server.log" && ready=1
    lines=$(wc -l <"$RUN/server.log")
    if ((lines > shown)); then
      sed -n "$((shown + 1)),${lines}p" "$RUN/server.log" | sed 's/^/  server: /'
      shown=$lines
    fi
    ((ready)) && return 0
    alive "$pid" || die "the TensorBridge server exited; see $RUN/server.log"
    ((SECONDS < deadline)) || die "the TensorBridge server was not ready after ${START_TIMEOUT}s; see $RUN/server.log"
    sleep 0.2
  done
}

start() {
  local fpm nginx args=() m pid deadline
  # /usr/sbin is not on every user's PATH, and that is where Debian puts both.
  fpm=$(PATH=$PATH:/usr/sbin command -v php-fpm8.2 || true)
  nginx=$(PATH=$PATH:/usr/sbin command -v nginx || true)
  [[ -n $fpm && -n $nginx ]] || die "php-fpm8.2 and nginx are needed: run 'make setup' (apt-get install php8.2-fpm nginx-light)"

  if server_pid >/dev/null && fpm_pid >/dev/null && nginx_pid >/dev/null && page_up \
      && "$PYTHON" -m tensorbridge health --socket "$SOCKET" --timeout 2 >/dev/null 2>&1 \
      && { ((SEARCH == 0)) || "$SEARCH_SH" status >/dev/null; }; then
    say "already running: $URL (scripts/web.sh stop, or make demo-stop, to stop it)"
    return 0
  fi
  stop >/dev/null   # whatever is left of an earlier run
  port_free || die "port $PORT on 127.0.0.1 is taken; pick another one: TB_WEB_PORT=8081 make demo"

  mkdir -p "$RUN/tmp"
  STARTING=1
  render "$ROOT/examples/web/nginx.conf.in" "$RUN/nginx.conf"
  render "$ROOT/examples/web/php-fpm.conf.in" "$RUN/php-fpm.conf"

  for m in $MODELS; do args+=(--model "$m"); done
  if ((SEARCH)); then   # the database first: the indexing below needs it and the server
    "$SEARCH_SH" start || die "PostgreSQL did not start (scripts/search.sh start)"
    "$SEARCH_SH" toml >"$RUN/search.toml"
    args+=(--config "$RUN/search.toml")
  fi
  say "starting the TensorBridge server on $SOCKET (log: $RUN/server.log)"
  : >"$RUN/server.log"
  # setsid: the server outlives this script and the terminal's Ctrl-C of a later command.
  HF_HUB_OFFLINE=1 setsid "$PYTHON" -m tensorbridge serve --socket "$SOCKET" --log-level info "${args[@]}" \
    >>"$RUN/server.log" 2>&1 </dev/null &
  echo $! >"$RUN/server.pid"
  wait_for_server "$(cat "$RUN/server.pid")"
  if ((SEARCH)); then
    say "indexing package descriptions for the search (scripts/search.sh index)"
    TENSORBRIDGE_SOCKET=$SOCKET "$SEARCH_SH" index | sed 's/^/  /' \
      || die "indexing failed (scripts/search.sh index)"
  fi

  say "starting php-fpm and nginx on $URL"
  "$fpm" -R -y "$RUN/php-fpm.conf" || die "php-fpm did not start; see $RUN/php-fpm.log"
  "$nginx" -p "$RUN" -e "$RUN/nginx-error.log" -c "$RUN/nginx.conf" \
    || die "nginx did not start; see $RUN/nginx-error.log"
  deadline=$((SECONDS + 30))
  until page_up; do
    ((SECONDS < deadline)) || die "$URL does not answer; see $RUN/nginx-error.log and $RUN/php-errors.log"
    sleep 0.2
  done
  pid=$(server_pid) || die "the TensorBridge server is gone; see $RUN/server.log"
  STARTING=0
  say "up: $URL (server pid $pid)"
  if ((SEARCH)); then say "search: ${URL}search/"; fi
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
