#!/usr/bin/env bash
# Installs the few Debian packages livehist needs beyond Python itself, only if missing:
# venv support, a C/C++ compiler and Python headers (PyMca5's fisx builds from source),
# what Qt needs to draw (the Taurus panel; Xvfb for the panel's tests on a headless machine).
set -euo pipefail
PY=${PY:-python3}
need=()
"$PY" -c "import ensurepip" 2>/dev/null || need+=(python3-venv)
command -v c++ >/dev/null || need+=(g++)
inc=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
[ -f "$inc/Python.h" ] || need+=(python3-dev)
command -v Xvfb >/dev/null || need+=(xvfb)
# a real browser for the web view's tests (Playwright drives it; its own browser download is not used)
[ -x /usr/bin/chromium ] || need+=(chromium)
for lib in libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
           libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libgl1 libegl1 libfontconfig1 libdbus-1-3; do
    dpkg -s "$lib" >/dev/null 2>&1 || need+=("$lib")
done
[ ${#need[@]} -eq 0 ] && exit 0
echo "livehist: installing Debian packages: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
