#!/usr/bin/env bash
# `make demo`: start the server on the bundled digits model, call it from PHP, stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
SOCKET=${1:-/tmp/tensorbridge-demo.sock}
python3 -m tensorbridge serve --socket "$SOCKET" --model digits=tensorbridge.models.digits:create &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
python3 -m tensorbridge health --socket "$SOCKET" --timeout 1 >/dev/null 2>&1 || \
  until python3 -m tensorbridge health --socket "$SOCKET" --timeout 1 >/dev/null 2>&1; do
    kill -0 $SERVER || exit 1; sleep 0.2; done
php examples/digits.php "$SOCKET"
