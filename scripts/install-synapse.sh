#!/usr/bin/env bash
# Installs Synapse (PyPI `matrix-synapse`), the Matrix homeserver the channels service's
# Matrix tests talk to (each test starts its own, SQLite, on a free loopback port), into
# .tools/synapse. Idempotent: does nothing when the pinned version is there.
set -euo pipefail
VERSION="${SYNAPSE_VERSION:-1.163.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/synapse"
if PYTHONPATH="$DEST" python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('matrix-synapse') != '$VERSION')" 2>/dev/null; then
    echo "synapse $VERSION already installed"
    exit 0
fi
rm -rf "$DEST"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$DEST" "matrix-synapse==$VERSION"
PYTHONPATH="$DEST" python3 -c "import importlib.metadata as m; print('synapse', m.version('matrix-synapse'))"
