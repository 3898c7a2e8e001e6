#!/usr/bin/env bash
# Installs ngircd, the IRC server the channels service's IRC tests talk to (each test
# starts its own on a free loopback port). The package's own daemon is not left
# running. Idempotent: does nothing when ngircd is there.
set -euo pipefail
if command -v ngircd >/dev/null 2>&1 || [ -x /usr/sbin/ngircd ]; then
    echo "ngircd already installed"
    exit 0
fi
# Keep the package from starting its system-wide daemon (policy-rc.d: 101 = not now).
policy=/usr/sbin/policy-rc.d
created=no
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created=yes
fi
trap '[ "$created" = yes ] && rm -f "$policy"' EXIT
bash "$(dirname "$0")/apt-install.sh" ngircd
if command -v service >/dev/null 2>&1; then service ngircd stop >/dev/null 2>&1 || true; fi
/usr/sbin/ngircd --version | head -1
