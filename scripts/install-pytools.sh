#!/usr/bin/env bash
# Installs the official OpenAI Python client into .tools/py for the client
# compatibility test. Idempotent: does nothing when the pinned version is there.
set -euo pipefail
VERSION="${OPENAI_PY_VERSION:-3.54.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/py"
if PYTHONPATH="$DEST" python3 -c "import openai, sys; sys.exit(openai.__version__ != '$VERSION' or not openai.__file__.startswith('$DEST'))" 2>/dev/null; then
    echo "openai $VERSION already installed"
    exit 0
fi
rm -rf "$DEST"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$DEST" "openai==$VERSION"
PYTHONPATH="$DEST" python3 -c "import openai; print('openai', openai.__version__)"
