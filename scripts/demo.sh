#!/usr/bin/env bash
# `make demo`: start the web demo's stack (TensorBridge server, PHP-FPM, nginx; see
# scripts/web.sh), classify ten digits once from the PHP CLI, print the page's URL and return,
# leaving the stack running, with the semantic search (PostgreSQL, indexed on the first start)
# at /search/ unless TB_SEARCH=0. `make demo-stop` stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${TB_WEB_DIR:-$PWD/.run/web}
scripts/web.sh start
echo "PHP CLI example (examples/digits.php):"
php examples/digits.php "$RUN/tb.sock" | sed 's/^/  /'
echo
if [[ ${TB_SEARCH:-1} != 0 ]]; then
  echo "Semantic search: http://127.0.0.1:${TB_WEB_PORT:-8080}/search/   (examples/search/)"
fi
echo "Web demo: http://127.0.0.1:${TB_WEB_PORT:-8080}/   (stop it with: make demo-stop)"
