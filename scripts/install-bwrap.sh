#!/usr/bin/env bash
# Installs bubblewrap, which the sandbox service runs `exec` in. Idempotent: does
# nothing when bwrap is there.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
    echo "bubblewrap $(bwrap --version | awk '{print $2}') already installed"
    exit 0
fi
bash "$(dirname "$0")/apt-install.sh" bubblewrap
bwrap --version
