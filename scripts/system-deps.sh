#!/usr/bin/env bash
# Installs the few Debian packages livehist needs beyond Python itself, only if missing:
# venv support, a C/C++ compiler and Python headers (PyMca5's fisx builds from source).
set -euo pipefail
PY=${PY:-python3}
need=()
"$PY" -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
command -v c++ >/dev/null || need+=(g++)
inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
[ -f "$inc/Python.h" ] || need+=(python3-dev)
[ ${#need[@]} -eq 0 ] && exit 0
echo "livehist: installing Debian packages: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
