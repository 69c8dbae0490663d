# shellcheck shell=bash
# Shared helpers for scripts/test, scripts/demo and scripts/bench.
#
# Source it after `set -euo pipefail`. It provides:
#   - output helpers: step, info, ok, warn, die
#   - installs: ensure_apt_packages (idempotent: only what is missing, one `apt-get update`)
#   - process tracking: spawn / wait_spawned / stop_spawned, and one EXIT trap that kills
#     every process group the script started and runs the registered cleanup hooks
#   - small utilities: now, elapsed, median, human_bytes, wait_for_file, wait_for_listen

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LIB_DIR="$REPO_ROOT/scripts/lib"
export REPO_ROOT LIB_DIR

# ---------------------------------------------------------------------------------------------
# output

if [[ -t 1 && -z "${NO_COLOR:-}" ]]; then
    _C_BOLD=$'\e[1m' _C_GREEN=$'\e[32m' _C_YELLOW=$'\e[33m' _C_RED=$'\e[31m' _C_RESET=$'\e[0m'
else
    _C_BOLD='' _C_GREEN='' _C_YELLOW='' _C_RED='' _C_RESET=''
fi

SCRIPT_NAME="$(basename "$0")"

step() { printf '\n%s==> %s%s\n' "$_C_BOLD" "$*" "$_C_RESET"; }
info() { printf '    %s\n' "$*"; }
ok() { printf '    %sok%s  %s\n' "$_C_GREEN" "$_C_RESET" "$*"; }
warn() { printf '%s%s: warning:%s %s\n' "$_C_YELLOW" "$SCRIPT_NAME" "$_C_RESET" "$*" >&2; }
die() {
    printf '%s%s: FAILED:%s %s\n' "$_C_RED" "$SCRIPT_NAME" "$_C_RESET" "$*" >&2
    exit 1
}

# Prints the last lines of a log file, indented, to stderr (used when something failed).
show_log_tail() {
    local file=$1 lines=${2:-30}
    [[ -s "$file" ]] || return 0
    printf '    --- last %s lines of %s ---\n' "$lines" "$file" >&2
    tail -n "$lines" "$file" | sed 's/^/    | /' >&2
    printf '    ---\n' >&2
}

# ---------------------------------------------------------------------------------------------
# installs

_APT_UPDATED=0

# ensure_apt_packages PKG... : installs the Debian packages that are not installed yet.
ensure_apt_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null || die "missing packages ${missing[*]} and no apt-get to install them"
    local sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || die "missing packages ${missing[*]}: run as root or install them"
        sudo=(sudo)
    fi
    info "installing Debian packages: ${missing[*]}"
    if ((_APT_UPDATED == 0)); then
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get update -qq >/dev/null ||
            die "apt-get update failed"
        _APT_UPDATED=1
    fi
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/apt-install.XXXXXX")
    if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$log" 2>&1; then
        show_log_tail "$log" 20
        rm -f "$log"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$log"
}

# require_cmd CMD [DEBIAN_PACKAGE] : makes sure CMD exists, installing its package if needed.
require_cmd() {
    local cmd=$1 pkg=${2:-$1}
    command -v "$cmd" >/dev/null 2>&1 && return 0
    ensure_apt_packages "$pkg"
    command -v "$cmd" >/dev/null 2>&1 || die "$cmd is still missing after installing $pkg"
}

# require_rust : cargo with rustfmt and clippy. The toolchain comes with the machine (rustup);
# nothing here downloads one.
require_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
        PATH="$HOME/.cargo/bin:$PATH"
        export PATH
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (rustup, 1.85 or newer)"
}

# ---------------------------------------------------------------------------------------------
# processes and cleanup

# Every background job is started with setsid, so it leads its own process group and the trap
# can kill it together with anything it started (a pipeline, a child of a wrapper).
_SPAWNED_PGIDS=()
_CLEANUP_HOOKS=()
SPAWNED_PID=''

# spawn CMD... : starts CMD in the background in its own process group; sets SPAWNED_PID.
# Redirect the call itself to send its output somewhere: `spawn cmd >log 2>&1 <input`. (The
# explicit `<&0` keeps that stdin: bash would otherwise give a background job /dev/null.)
spawn() {
    setsid "$@" <&0 &
    SPAWNED_PID=$!
    _SPAWNED_PGIDS+=("$SPAWNED_PID")
}

# wait_spawned PID : waits for a spawned job and returns its exit status. Unlike a foreground
# command, `wait` is interrupted by signals, so Ctrl-C reaches the cleanup trap at once.
wait_spawned() {
    local rc=0
    wait "$1" || rc=$?
    return "$rc"
}

# Runs CMD in the foreground, but as a spawned job (see wait_spawned); returns its status.
run_tracked() {
    spawn "$@"
    wait_spawned "$SPAWNED_PID"
}

_pgid_alive() { kill -0 -- "-$1" 2>/dev/null; }

# stop_spawned PID [SIGNAL] [TIMEOUT_S] : signals a spawned job's process group, waits for it
# (SIGKILL after TIMEOUT_S) and returns the leader's exit status.
stop_spawned() {
    local pid=$1 sig=${2:-TERM} timeout=${3:-10} rc=0 i
    kill -s "$sig" -- "-$pid" 2>/dev/null || true
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        warn "process $pid did not exit within ${timeout}s of SIG$sig; killing it"
        kill -s KILL -- "-$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    # anything left in its group (children of a wrapper) goes too
    _pgid_alive "$pid" && kill -s KILL -- "-$pid" 2>/dev/null
    return "$rc"
}

# on_exit CMD : registers a cleanup command, run (last registered first) when the script exits.
on_exit() { _CLEANUP_HOOKS+=("$1"); }

_cleanup() {
    local rc=$? pg i live=()
    trap - EXIT INT TERM HUP
    set +e
    for pg in "${_SPAWNED_PGIDS[@]}"; do
        if _pgid_alive "$pg"; then
            kill -s TERM -- "-$pg" 2>/dev/null
            live+=("$pg")
        fi
    done
    if ((${#live[@]})); then
        for ((i = 0; i < 50; i++)); do
            local any=0
            for pg in "${live[@]}"; do _pgid_alive "$pg" && any=1; done
            ((any)) || break
            sleep 0.1
        done
        for pg in "${live[@]}"; do
            _pgid_alive "$pg" && kill -s KILL -- "-$pg" 2>/dev/null
        done
        wait 2>/dev/null
    fi
    for ((i = ${#_CLEANUP_HOOKS[@]} - 1; i >= 0; i--)); do
        eval "${_CLEANUP_HOOKS[i]}"
    done
    exit "$rc"
}

trap _cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

# ---------------------------------------------------------------------------------------------
# small utilities

# now : seconds since the epoch with microseconds (bash builtin, no fork).
now() { printf '%s' "${EPOCHREALTIME/,/.}"; }

# elapsed T0 [T1] : seconds between two `now` readings, 3 decimals.
elapsed() { awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN { printf "%.3f", b - a }'; }

# calc EXPR : floating-point arithmetic through awk, e.g. `calc "3 / 7" 4`.
calc() { awk "BEGIN { printf \"%.${2:-2}f\", $1 }"; }

# median NUM... : the median (mean of the middle two for an even count).
median() {
    printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "nan"; exit }
        if (NR % 2) printf "%.6g\n", v[(NR + 1) / 2]
        else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# human_bytes N : 1.5 GiB, 64.0 MiB, 12.3 KiB, 17 B
human_bytes() {
    awk -v n="$1" 'BEGIN {
        split("B KiB MiB GiB TiB", u, " "); i = 1
        while (n >= 1024 && i < 5) { n /= 1024; i++ }
        if (i == 1) printf "%d %s", n, u[i]; else printf "%.1f %s", n, u[i] }'
}

# wait_for_file FILE TIMEOUT_S [PID] : waits until FILE is non-empty; fails early if PID died.
wait_for_file() {
    local file=$1 timeout=$2 pid=${3:-} i
    for ((i = 0; i < timeout * 20; i++)); do
        [[ -s "$file" ]] && return 0
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.05
    done
    return 1
}

# install_python_env : Python packages for tests and scripts that drive Python tools (moto,
# boto3): listed in tests/requirements.txt and they are installed into $REPO_ROOT/.venv, which is put on PATH.
# The venv is rebuilt only when that file changes.
install_python_env() {
    local req="$REPO_ROOT/tests/requirements.txt" venv="$REPO_ROOT/.venv" want have=''
    [[ -f "$req" ]] || return 0
    ensure_apt_packages python3-venv
    want=$(sha256sum "$req" | cut -d' ' -f1)
    [[ -f "$venv/.requirements.sha256" ]] && have=$(<"$venv/.requirements.sha256")
    if [[ "$want" != "$have" || ! -x "$venv/bin/python" ]]; then
        info "creating $venv from tests/requirements.txt"
        rm -rf -- "$venv"
        python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req" ||
            die "pip install -r tests/requirements.txt failed"
        printf '%s\n' "$want" >"$venv/.requirements.sha256"
    else
        info "python venv up to date: $venv"
    fi
    export VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH"
}

# wait_for_listen PORT TIMEOUT_S : waits until a TCP socket listens on PORT (reads /proc/net/tcp*,
# so it never connects and never uses up a one-shot listener such as `nc -l`).
wait_for_listen() {
    local port=$1 timeout=$2 hex i
    hex=$(printf '%04X' "$port")
    for ((i = 0; i < timeout * 20; i++)); do
        if awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { f = 1 } END { exit !f }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# release_binaries : builds sync-gateway, sync-agent and sync-control in release mode; sets
# GATEWAY_BIN, AGENT_BIN and CONTROL_BIN. Honours CARGO_TARGET_DIR. With SYNC_BIN_DIR set, uses the binaries found there
# instead and builds nothing (to exercise installed or otherwise-built binaries).
release_binaries() {
    if [[ -n "${SYNC_BIN_DIR:-}" ]]; then
        GATEWAY_BIN="$SYNC_BIN_DIR/sync-gateway"
        AGENT_BIN="$SYNC_BIN_DIR/sync-agent"
        CONTROL_BIN="$SYNC_BIN_DIR/sync-control"
        [[ -x "$GATEWAY_BIN" && -x "$AGENT_BIN" && -x "$CONTROL_BIN" ]] ||
            die "SYNC_BIN_DIR=$SYNC_BIN_DIR holds no executable sync-gateway, sync-agent and sync-control"
        info "using prebuilt binaries from SYNC_BIN_DIR=$SYNC_BIN_DIR (no build)"
        export GATEWAY_BIN AGENT_BIN CONTROL_BIN
        return 0
    fi
    require_rust
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/sync-build.XXXXXX")
    if ! (cd "$REPO_ROOT" && cargo build --release --bins) >"$log" 2>&1; then
        show_log_tail "$log" 40
        rm -f "$log"
        die "cargo build --release failed"
    fi
    grep -E '^\s*(Finished|Compiling sync-gateway)' "$log" | sed 's/^ */    /' || true
    rm -f "$log"
    local target=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
    GATEWAY_BIN="$target/release/sync-gateway"
    AGENT_BIN="$target/release/sync-agent"
    CONTROL_BIN="$target/release/sync-control"
    local b
    for b in "$GATEWAY_BIN" "$AGENT_BIN" "$CONTROL_BIN"; do
        [[ -x "$b" ]] || die "no $b after the build"
    done
    export GATEWAY_BIN AGENT_BIN CONTROL_BIN
}
