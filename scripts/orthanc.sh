#!/usr/bin/env bash
# Install, start and stop a private Orthanc (DICOM server with DICOMweb) for lungcad's PACS
# tests and for trying `lungcad watch` by hand.
#
#   scripts/orthanc.sh install
#       Install the Debian packages `orthanc`, `orthanc-dicomweb` and `curl` when missing
#       (needs root; idempotent). The packaged service is not started (no systemd here; see below).
#   scripts/orthanc.sh start DIR --http-port P [--dicom-port Q] [--user U --password PW]
#                            [--modality NAME=AET@HOST:PORT ...] [--timeout S]
#       Start `Orthanc DIR/orthanc.json` in the background with its own configuration and
#       storage under DIR, the DICOMweb plugin at http://127.0.0.1:P/dicom-web/, and wait until
#       it answers (default 30 s). Its pid is recorded in DIR/orthanc.pid, its log in
#       DIR/orthanc.log. With --user/--password, HTTP basic authentication is required.
#       Each --modality registers a DICOM node (e.g. lungcad listen) that may store into this
#       Orthanc (its DICOM AE title is LUNGCADTEST) and that /modalities/NAME/store sends to.
#       Starting an Orthanc that is already running from DIR is a no-op.
#   scripts/orthanc.sh stop DIR      stop the Orthanc started from DIR (TERM, then KILL).
#   scripts/orthanc.sh status DIR    exit 0 when the Orthanc of DIR runs and answers.
#   scripts/orthanc.sh plugin        print the path of the DICOMweb plugin.
#
# Loopback only: Orthanc 1.10 (Debian 12) cannot choose the address it listens on, so
# RemoteAccessAllowed=false makes its HTTP server refuse every client but 127.0.0.1, and the
# DICOM listener is off unless --dicom-port is given; even then no remote modality is
# registered and unknown callers may not store, query or retrieve.
set -euo pipefail

# curl: `start` and `status` ask the server's /system with it, and a minimal Debian lacks it.
PACKAGES=(orthanc orthanc-dicomweb curl)
PLUGIN_DIRS=(/usr/share/orthanc/plugins /usr/lib/orthanc/plugins /usr/local/share/orthanc/plugins)

die() { echo "orthanc.sh: $*" >&2; exit 1; }

plugin_path() {
    local dir so
    for dir in "${PLUGIN_DIRS[@]}"; do
        for so in "$dir"/libOrthancDicomWeb.so*; do
            [[ -f "$so" ]] && { echo "$so"; return 0; }
        done
    done
    # Fall back on the package's file list (another distribution layout).
    if command -v dpkg >/dev/null 2>&1; then
        so=$(dpkg -L orthanc-dicomweb 2>/dev/null | grep -E 'libOrthancDicomWeb\.so' | head -n1 || true)
        [[ -n "$so" && -f "$so" ]] && { echo "$so"; return 0; }
    fi
    return 1
}

installed() {
    command -v Orthanc >/dev/null 2>&1 && command -v curl >/dev/null 2>&1 && plugin_path >/dev/null
}

cmd_install() {
    if installed; then
        echo "orthanc.sh: Orthanc $(Orthanc --version 2>/dev/null | head -n1 | awk '{print $NF}')" \
             "and the DICOMweb plugin are installed ($(plugin_path))"
        return 0
    fi
    [[ "$(id -u)" -eq 0 ]] || die "installing ${PACKAGES[*]} needs root. Run as root, or:" \
        "sudo apt-get update && sudo apt-get install -y ${PACKAGES[*]}"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install Orthanc and its" \
        "DICOMweb plugin with your system's package manager (packages ${PACKAGES[*]})"
    # Keep the package scripts from starting the system-wide Orthanc service (port 8042 on
    # every interface): policy-rc.d exit code 101 means "action forbidden". Only when the
    # machine has no policy of its own; removed again afterwards.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
    fi
    local rc=0
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } || rc=$?
    [[ $added_policy -eq 1 ]] && rm -f "$policy"
    [[ $rc -eq 0 ]] || die "apt-get failed (exit $rc) installing ${PACKAGES[*]}"
    installed || die "installed ${PACKAGES[*]} but found no Orthanc binary or DICOMweb plugin" \
        "(looked in ${PLUGIN_DIRS[*]})"
    echo "orthanc.sh: installed Orthanc with the DICOMweb plugin ($(plugin_path))"
}

alive() {  # alive PID: the process exists and is not a zombie waiting to be reaped
    kill -0 "$1" 2>/dev/null || return 1
    local state; state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo Z)
    [[ "$state" != Z ]]
}

pid_of() {  # the pid recorded in DIR when that process is still an Orthanc
    local pidfile="$1/orthanc.pid" pid
    [[ -f "$pidfile" ]] || return 1
    pid=$(<"$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" &&
        grep -q Orthanc "/proc/$pid/cmdline" 2>/dev/null && { echo "$pid"; return 0; }
    return 1
}

answers() {  # answers DIR: the Orthanc of DIR replies on its HTTP port with its own name
    local dir=$1 port name auth=()
    port=$(sed -n 's/^ *"HttpPort" *: *\([0-9]*\).*/\1/p' "$dir/orthanc.json")
    name=$(sed -n 's/^ *"Name" *: *"\(.*\)".*/\1/p' "$dir/orthanc.json")
    [[ -f "$dir/credentials" ]] && auth=(--user "$(<"$dir/credentials")")
    curl -sf --max-time 2 "${auth[@]}" "http://127.0.0.1:$port/system" 2>/dev/null |
        grep -q "\"Name\" *: *\"$name\""
}

cmd_start() {
    local dir="${1:-}"; [[ -n "$dir" && "$dir" != --* ]] || die "usage: start DIR --http-port P ..."
    shift
    local http_port="" dicom_port="" user="" password="" timeout=30 modalities=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --http-port) http_port="$2"; shift 2 ;;
            --dicom-port) dicom_port="$2"; shift 2 ;;
            --user) user="$2"; shift 2 ;;
            --password) password="$2"; shift 2 ;;
            --timeout) timeout="$2"; shift 2 ;;
            --modality)
                [[ "$2" =~ ^([A-Za-z0-9_-]+)=([A-Za-z0-9_-]{1,16})@([A-Za-z0-9.-]+):([0-9]+)$ ]] ||
                    die "start: --modality NAME=AET@HOST:PORT expected; got $2"
                modalities+="${modalities:+, }\"${BASH_REMATCH[1]}\" : [ \"${BASH_REMATCH[2]}\", \"${BASH_REMATCH[3]}\", ${BASH_REMATCH[4]} ]"
                shift 2 ;;
            *) die "start: unknown option $1" ;;
        esac
    done
    [[ "$http_port" =~ ^[0-9]+$ ]] || die "start: --http-port N is required (a free TCP port)"
    [[ -z "$dicom_port" || "$dicom_port" =~ ^[0-9]+$ ]] || die "start: --dicom-port must be a number"
    [[ -n "$user" && -z "$password" || -z "$user" && -n "$password" ]] &&
        die "start: give both --user and --password, or neither"
    [[ "$user" =~ ^[A-Za-z0-9._-]*$ && "$password" != *[\"\\]* ]] ||
        die "start: --user may hold letters, digits and ._- only; --password no quote or backslash"
    command -v Orthanc >/dev/null 2>&1 || die "Orthanc is not installed; run: $0 install"
    local plugin; plugin=$(plugin_path) || die "the DICOMweb plugin is missing; run: $0 install"

    local pid
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd)
    if pid=$(pid_of "$dir"); then
        echo "orthanc.sh: Orthanc already running from $dir (pid $pid)"; return 0
    fi
    # A unique name: `answers` checks that the server on the port is this one, not another.
    local name="lungcad-$$-$RANDOM"
    local auth_enabled=false users="{}"
    if [[ -n "$user" ]]; then
        auth_enabled=true users="{ \"$user\": \"$password\" }"
        (umask 077; printf '%s:%s' "$user" "$password" >"$dir/credentials")
    else
        rm -f "$dir/credentials"
    fi
    local dicom_enabled=false; [[ -n "$dicom_port" ]] && dicom_enabled=true
    (umask 077; cat >"$dir/orthanc.json" <<EOF
{
  "Name" : "$name",
  "StorageDirectory" : "$dir/storage",
  "IndexDirectory" : "$dir/storage",
  "Plugins" : [ "$plugin" ],
  "HttpServerEnabled" : true,
  "HttpPort" : $http_port,
  "RemoteAccessAllowed" : false,
  "AuthenticationEnabled" : $auth_enabled,
  "RegisteredUsers" : $users,
  "HttpDescribeErrors" : true,
  "DicomServerEnabled" : $dicom_enabled,
  "DicomPort" : ${dicom_port:-4242},
  "DicomAet" : "LUNGCADTEST",
  "DicomModalities" : { $modalities },
  "DicomAlwaysAllowEcho" : false,
  "DicomAlwaysAllowStore" : false,
  "DicomAlwaysAllowFind" : false,
  "DicomAlwaysAllowMove" : false,
  "DicomAlwaysAllowGet" : false,
  "ConcurrentJobs" : 1,
  "SaveJobs" : false,
  "DicomWeb" : {
    "Enable" : true,
    "Root" : "/dicom-web/",
    "EnableWado" : false,
    "Ssl" : false
  }
}
EOF
    )
    # setsid: the server gets its own session, so a Ctrl-C in the caller's terminal does not
    # reach it and `stop` is the one way it ends.
    setsid Orthanc "$dir/orthanc.json" >"$dir/orthanc.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/orthanc.pid"
    local deadline=$((SECONDS + timeout))
    until answers "$dir"; do
        if ! alive "$pid"; then
            rm -f "$dir/orthanc.pid"
            tail -n 20 "$dir/orthanc.log" >&2 || true
            die "Orthanc exited during start-up (is port $http_port${dicom_port:+ or $dicom_port} in use?); log: $dir/orthanc.log"
        fi
        if (( SECONDS >= deadline )); then
            cmd_stop "$dir" >/dev/null 2>&1 || true
            tail -n 20 "$dir/orthanc.log" >&2 || true
            die "Orthanc did not answer on http://127.0.0.1:$http_port within ${timeout}s; log: $dir/orthanc.log"
        fi
        sleep 0.1
    done
    echo "orthanc.sh: Orthanc pid $pid answers at http://127.0.0.1:$http_port/dicom-web/ (data in $dir)"
}

cmd_stop() {
    local dir="${1:-}"; [[ -n "$dir" ]] || die "usage: stop DIR"
    local pid
    if ! pid=$(pid_of "$dir"); then
        rm -f "$dir/orthanc.pid"; echo "orthanc.sh: no Orthanc running from $dir"; return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        alive "$pid" || break
        sleep 0.05
    done
    if alive "$pid"; then
        echo "orthanc.sh: Orthanc pid $pid ignored TERM for 10 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/orthanc.pid"
    echo "orthanc.sh: stopped Orthanc pid $pid"
}

cmd_status() {
    local dir="${1:-}"; [[ -n "$dir" ]] || die "usage: status DIR"
    local pid; pid=$(pid_of "$dir") || { echo "not running"; return 1; }
    answers "$dir" || { echo "pid $pid runs but does not answer"; return 1; }
    echo "running (pid $pid)"
}

case "${1:-}" in
    install) cmd_install ;;
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    plugin) plugin_path || die "the DICOMweb plugin is not installed; run: $0 install" ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
