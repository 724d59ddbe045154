#!/usr/bin/env bash
# Install dcmtk (Debian package `dcmtk`: storescu, storescp, echoscu) for the tests of
# `lungcad listen` (tests/service/test_dimse_listener.py), which send studies to lungcad and
# receive its results with the field's reference DICOM network tools. Idempotent: does
# nothing when all three tools run.
set -euo pipefail

TOOLS=(storescu storescp echoscu)

have_all() {
    local tool
    for tool in "${TOOLS[@]}"; do
        command -v "$tool" >/dev/null 2>&1 && "$tool" --version >/dev/null 2>&1 || return 1
    done
}

if have_all; then
    echo "dcmtk.sh: $(storescu --version 2>/dev/null | head -n1 | tr -d '$') already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "dcmtk.sh: dcmtk is missing and installing it needs root." >&2
    echo "  Run: sudo $0   (or: sudo apt-get install -y dcmtk)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "dcmtk.sh: apt-get not found; install dcmtk with your system's package manager" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dcmtk >/dev/null
have_all || { echo "dcmtk.sh: installed dcmtk but ${TOOLS[*]} do not all run" >&2; exit 1; }
echo "dcmtk.sh: installed $(storescu --version 2>/dev/null | head -n1 | tr -d '$')"
