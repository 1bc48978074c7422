#!/usr/bin/env bash
# A throwaway MariaDB for the KsanaLLM registry's MySQL tests (crates/pdx-ksana/tests/store.rs): no systemd, a
# datadir under /tmp, loopback only. Needs the Debian package mariadb-server.
#   eval "$(.ci/mariadb.sh start)"   # starts it (or finds it running) and prints `export PDX_TEST_MYSQL_URL=...`
#   .ci/mariadb.sh stop
set -euo pipefail
D=${PDX_MARIADB_DIR:-/tmp/pdx-mariadb}
PORT=${PDX_MARIADB_PORT:-13306}
URL="mysql://pdx:pdx@127.0.0.1:$PORT/pdx_ksana"
client() { mariadb --no-defaults -S "$D/sock" -uroot "$@"; }
case "${1:-}" in
start)
  mkdir -p "$D"
  if ! client -e 'SELECT 1' >/dev/null 2>&1; then
    if [ ! -d "$D/data/mysql" ]; then
      mariadb-install-db --no-defaults --datadir="$D/data" --user="$(id -un)" \
        --auth-root-authentication-method=socket >"$D/install.log" 2>&1
    fi
    nohup mariadbd --no-defaults --datadir="$D/data" --socket="$D/sock" --port="$PORT" \
      --bind-address=127.0.0.1 --user="$(id -un)" --pid-file="$D/pid" --log-error="$D/error.log" \
      --skip-log-bin --innodb-buffer-pool-size=32M >/dev/null 2>&1 &
    for _ in $(seq 100); do client -e 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  client -e "CREATE USER IF NOT EXISTS 'pdx'@'127.0.0.1' IDENTIFIED BY 'pdx';
             GRANT ALL PRIVILEGES ON *.* TO 'pdx'@'127.0.0.1';
             CREATE DATABASE IF NOT EXISTS pdx_ksana;" >&2
  echo "export PDX_TEST_MYSQL_URL=$URL";;
stop)
  if [ -f "$D/pid" ]; then kill "$(cat "$D/pid")" 2>/dev/null || true; fi;;
*) echo "usage: $0 start | stop" >&2; exit 2;;
esac
