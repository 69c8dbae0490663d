# shellcheck shell=bash
# Helpers that drive the real binaries: write a gateway config, start and stop the gateway,
# run the agent. Source after common.sh and after release_binaries (GATEWAY_BIN, AGENT_BIN).

IMAGETOOL=(python3 "$LIB_DIR/imagetool.py")

# gateway_config_head DATA_DIR : the part every demo/bench gateway config shares (loopback, a
# port picked by the kernel, the local backend, text logs).
gateway_config_head() {
    local data_dir=$1
    cat <<EOF
# written by $SCRIPT_NAME
listen = "127.0.0.1:0"
data_dir = "$data_dir"

[backend]
kind = "local"

[log]
format = "text"
level = "info"
EOF
}

# write_gateway_config FILE DATA_DIR DISK_ID SIZE_BYTES KEY_FILE
# A standalone gateway on loopback with a port picked by the kernel.
write_gateway_config() {
    local file=$1 data_dir=$2 disk=$3 size=$4 key=$5
    {
        gateway_config_head "$data_dir"
        cat <<EOF

[[disks]]
id = "$disk"
size_bytes = $size
key_file = "$key"
EOF
    } >"$file"
}

# write_gateway_config_cp FILE DATA_DIR CONTROL_URL TOKEN_FILE
# A gateway on loopback managed by a control plane: no [[disks]], they arrive by command; a
# loopback metrics port.
write_gateway_config_cp() {
    local file=$1 data_dir=$2 url=$3 token_file=$4
    {
        gateway_config_head "$data_dir"
        cat <<EOF

[metrics]
listen = "127.0.0.1:0"

# Under a control plane the DRS-like tiers apply by default, which keep only the newest snapshot
# of each 10-minute bucket; the demo compares every snapshot with the source at its point in
# time, so it turns pruning off (no tiers: keep every snapshot).
[retention]
tiers = []

[control_plane]
url = "$url"
bootstrap_token_file = "$token_file"
report_interval_secs = 2
EOF
    } >"$file"
}

# start_control STATE_DIR LOG [LISTEN] : starts `sync-control serve` on LISTEN (default: a free
# loopback port), waits for STATE_DIR/listen.addr. Sets CONTROL_PID, CONTROL_ADDR and CONTROL_URL.
start_control() {
    local state_dir=$1 log=$2 listen=${3:-127.0.0.1:0}
    mkdir -p "$state_dir"
    rm -f "$state_dir/listen.addr"
    # shellcheck disable=SC2153 # CONTROL_BIN is set by release_binaries
    spawn "$CONTROL_BIN" serve --listen "$listen" --state-dir "$state_dir" --report-interval-secs 2 >>"$log" 2>&1
    CONTROL_PID=$SPAWNED_PID
    if ! wait_for_file "$state_dir/listen.addr" 20 "$CONTROL_PID"; then
        show_log_tail "$log"
        die "sync-control did not start (no $state_dir/listen.addr); log: $log"
    fi
    CONTROL_ADDR=$(<"$state_dir/listen.addr")
    CONTROL_ADDR=${CONTROL_ADDR//[[:space:]]/}
    CONTROL_URL="http://$CONTROL_ADDR"
}

# control STATE_DIR ARGS... : the sync-control command line against the local control plane
control() {
    local state_dir=$1
    shift
    "$CONTROL_BIN" --state-dir "$state_dir" --url "$CONTROL_URL" "$@"
}

# start_gateway CONFIG DATA_DIR LOG : starts `sync-gateway run`, waits for DATA_DIR/listen.addr.
# Sets GATEWAY_PID and GATEWAY_ADDR.
start_gateway() {
    local config=$1 data_dir=$2 log=$3
    rm -f "$data_dir/listen.addr"
    # shellcheck disable=SC2153 # GATEWAY_BIN is set by release_binaries
    spawn "$GATEWAY_BIN" run --config "$config" >>"$log" 2>&1
    GATEWAY_PID=$SPAWNED_PID
    if ! wait_for_file "$data_dir/listen.addr" 20 "$GATEWAY_PID"; then
        show_log_tail "$log"
        die "the gateway did not start (no $data_dir/listen.addr); log: $log"
    fi
    GATEWAY_ADDR=$(<"$data_dir/listen.addr")
    GATEWAY_ADDR=${GATEWAY_ADDR//[[:space:]]/}
}

# stop_gateway LOG : SIGTERM, wait for the drain, require exit status 0.
stop_gateway() {
    local log=$1 rc=0
    [[ -n "${GATEWAY_PID:-}" ]] || return 0
    stop_spawned "$GATEWAY_PID" TERM 45 || rc=$?
    GATEWAY_PID=''
    if ((rc != 0)); then
        show_log_tail "$log"
        die "the gateway exited with status $rc after SIGTERM (expected 0); log: $log"
    fi
}

# snapshot_states CONFIG : "PENDING FAILED TOTAL" counts from `sync-gateway snapshots --json`
# (a snapshot without a state field counts as completed). No python here: it is polled.
snapshot_states() {
    local json
    json=$("$GATEWAY_BIN" snapshots --config "$1" --json) || return 1
    printf '%s %s %s\n' \
        "$(grep -Eo '"state": *"pending"' <<<"$json" | wc -l)" \
        "$(grep -Eo '"state": *"failed"' <<<"$json" | wc -l)" \
        "$(grep -Eo '"id": *"' <<<"$json" | wc -l)"
}

# wait_snapshots_completed CONFIG TIMEOUT_S : snapshots complete in the background after the
# checkpoint ack (copy-before-write on file systems without reflinks); waits until none is
# pending. Fails on a failed snapshot or at the timeout.
wait_snapshots_completed() {
    local config=$1 timeout=$2 i pending failed total
    for ((i = 0; i < timeout * 10; i++)); do
        read -r pending failed total < <(snapshot_states "$config") ||
            die "sync-gateway snapshots --config $config failed"
        ((failed == 0)) || die "$failed of $total snapshot(s) are in state failed"
        ((pending == 0)) && return 0
        sleep 0.1
    done
    die "$pending snapshot(s) still pending after ${timeout}s"
}

# gateway_cpu_ticks PID : utime + stime of a live process, in clock ticks (/proc/PID/stat
# fields 14 and 15; the command name in field 2 may hold spaces, so cut after its ')').
gateway_cpu_ticks() {
    local stat rest
    stat=$(<"/proc/$1/stat")
    rest=${stat##*) }
    # rest starts at field 3 (state): utime is the 12th word, stime the 13th
    awk '{ print $12 + $13 }' <<<"$rest"
}

# run_agent OUT_JSON ERR_LOG MEASURE_JSON ARGS... : `sync-agent replicate ARGS` with its stdout to
# OUT_JSON and stderr to ERR_LOG, under `imagetool.py measure` (wall and CPU time to
# MEASURE_JSON). Returns the agent's exit status.
run_agent() {
    local out=$1 err=$2 measure=$3
    shift 3
    run_tracked "${IMAGETOOL[@]}" measure "$measure" -- "$AGENT_BIN" replicate "$@" >"$out" 2>"$err"
}

# json_get FILE KEY... : values of top-level keys of a JSON object, one per line.
json_get() { "${IMAGETOOL[@]}" json "$@"; }
