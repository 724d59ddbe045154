#!/usr/bin/env bash
# Install dicom3tools (Debian package `dicom3tools`: dciodvfy, dcdump, ...) for the conformance
# tests of lungcad's DICOM results (tests/dicom_conformance.py): every SEG, SR and KOS the
# tests write must pass David Clunie's `dciodvfy` IOD validator with no Error. Idempotent:
# does nothing when dciodvfy runs.
set -euo pipefail

have() { command -v dciodvfy >/dev/null 2>&1 && dciodvfy -version >/dev/null 2>&1; }
version() { dciodvfy -version 2>&1 | sed -n 's/^dicom3tools Version: //p' | head -n1; }

if have; then
    echo "dicom3tools.sh: dciodvfy (dicom3tools $(version)) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "dicom3tools.sh: dicom3tools is missing and installing it needs root." >&2
    echo "  Run: sudo $0   (or: sudo apt-get install -y dicom3tools)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "dicom3tools.sh: apt-get not found; install dicom3tools with your system's package" \
         "manager (or build it from https://www.dclunie.com/dicom3tools.html)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends dicom3tools >/dev/null
have || { echo "dicom3tools.sh: installed dicom3tools but dciodvfy does not run" >&2; exit 1; }
echo "dicom3tools.sh: installed dciodvfy (dicom3tools $(version))"
