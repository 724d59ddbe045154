#!/usr/bin/env bash
# Install headless Chromium (Debian package `chromium`) for the web-viewer browser test
# (tests/test_viewer.py). Idempotent: does nothing when /usr/bin/chromium already runs.
# Nothing is downloaded by the test itself; the Python driver is Playwright, which is told to
# use this system Chromium (`playwright install` is never run).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    echo "install_browser: $("$CHROMIUM" --version) already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: Chromium is missing and installing it needs root." >&2
    echo "  Run: sudo $0   (or: sudo apt-get install -y chromium)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install Chromium with your package manager" >&2
    echo "  and set CHROMIUM=/path/to/chromium for the viewer test." >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null

if ! "$CHROMIUM" --version >/dev/null 2>&1; then
    echo "install_browser: installed the chromium package but $CHROMIUM does not run" >&2
    exit 1
fi
echo "install_browser: installed $("$CHROMIUM" --version)"
