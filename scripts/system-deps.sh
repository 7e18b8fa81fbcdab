#!/usr/bin/env bash
# Debian packages the test suite uses as real tools: promtool (prometheus) for metrics, config and rules checks.
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
command -v promtool
