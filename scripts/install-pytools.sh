#!/usr/bin/env bash
# Installs the Python packages tests use into .tools/py: the official OpenAI client (the
# client compatibility test) and PyYAML (the check of compose.yaml). Idempotent: does
# nothing when the pinned versions are there.
set -euo pipefail
VERSION="${OPENAI_PY_VERSION:-3.54.0}"
YAML_VERSION="${PYYAML_VERSION:-6.0.2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/py"
if PYTHONPATH="$DEST" python3 -c "import openai, yaml, sys; sys.exit(openai.__version__ != '$VERSION' or not openai.__file__.startswith('$DEST') or yaml.__version__ != '$YAML_VERSION' or not yaml.__file__.startswith('$DEST'))" 2>/dev/null; then
    echo "openai $VERSION and pyyaml $YAML_VERSION already installed"
    exit 0
fi
rm -rf "$DEST"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target "$DEST" "openai==$VERSION" "pyyaml==$YAML_VERSION"
PYTHONPATH="$DEST" python3 -c "import openai, yaml; print('openai', openai.__version__, 'pyyaml', yaml.__version__)"
