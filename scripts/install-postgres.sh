#!/usr/bin/env bash
# Installs Debian's PostgreSQL server binaries, which the store's tests start as
# throw-away clusters (the testkit runs them as the `postgres` user when run as root).
# Idempotent: does nothing when initdb and the `postgres` user are there.
set -euo pipefail
have() {
    compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && id postgres >/dev/null 2>&1
}
if have; then
    echo "PostgreSQL $(ls /usr/lib/postgresql | sort -n | tail -1) already installed"
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" postgresql
# Debian's package starts a system cluster; the tests do not use it.
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
$SUDO service postgresql stop >/dev/null 2>&1 || true
have && echo "PostgreSQL installed"
