#!/usr/bin/env bash
# Installs the Python packages tests use into .tools/py: the official OpenAI client (the
# client compatibility test), PyYAML (the check of compose.yaml), and nats-py with
# msgpack (the example channel adapter in Python). Idempotent: does nothing when the
# pinned versions are there.
set -euo pipefail
VERSION="${OPENAI_PY_VERSION:-3.54.0}"
YAML_VERSION="${PYYAML_VERSION:-6.0.2}"
NATS_VERSION="${NATS_PY_VERSION:-2.16.0}"
MSGPACK_VERSION="${MSGPACK_VERSION:-1.2.4}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/py"
if PYTHONPATH="$DEST" python3 -c "
import sys, importlib.metadata as m, openai, yaml, nats, msgpack
want = {'openai': '$VERSION', 'pyyaml': '$YAML_VERSION', 'nats-py': '$NATS_VERSION', 'msgpack': '$MSGPACK_VERSION'}
sys.exit(any(m.version(p) != v for p, v in want.items()) or not all(x.__file__.startswith('$DEST') for x in (openai, yaml, nats, msgpack)))
" 2>/dev/null; then
    echo "openai $VERSION, pyyaml $YAML_VERSION, nats-py $NATS_VERSION and msgpack $MSGPACK_VERSION already installed"
    exit 0
fi
rm -rf "$DEST"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$DEST" "openai==$VERSION" "pyyaml==$YAML_VERSION" "nats-py==$NATS_VERSION" "msgpack==$MSGPACK_VERSION"
PYTHONPATH="$DEST" python3 -c "import openai, yaml, nats, msgpack; print('openai', openai.__version__, 'pyyaml', yaml.__version__, 'msgpack', msgpack.version)"
