#!/usr/bin/env bash
# Installs Debian packages without prompts (with sudo when not root): the one way
# `make setup` installs system packages.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
