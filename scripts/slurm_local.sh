#!/usr/bin/env bash
# slurm_local.sh — bring up / tear down a real one-node Slurm cluster on
# localhost, for CI tests that exercise qpipe's Slurm backend.
#
# Usage (as root, Debian/Ubuntu host):
#   scripts/slurm_local.sh start    # install (if needed), configure, start, verify
#   scripts/slurm_local.sh stop     # stop the daemons that `start` launched
#   scripts/slurm_local.sh status   # print sinfo; exit 0 iff the cluster is healthy
#   scripts/slurm_local.sh restart  # stop + start
#
# What `start` does (idempotent; if the cluster is already healthy it only
# prints a summary):
#   1. apt-get installs slurm-wlm + munge, only if slurmctld/slurmd/munged are
#      missing.  Package maintainer scripts are prevented from starting any
#      service (temporary policy-rc.d), so the only daemons running are the
#      ones this script starts and records.
#   2. Creates /etc/munge/munge.key if absent and starts munged (as the
#      packaged `munge` user, or as root if that user does not exist).
#   3. Writes slurm.conf + gres.conf (in /etc/slurm, or $SLURM_CONF's dir):
#      this host (`hostname -s`) is controller and the single node, CPUs and
#      RealMemory come from `slurmd -C`, one partition `debug` (default,
#      no time limit), select/cons_tres with CR_Core_Memory, a fake GRES
#      `gpu:2` backed by /dev/null-like char devices in
#      /var/lib/qpipe-slurm/fakegpu (Slurm drops file-less GPUs), short
#      timeouts, and a job-completion log in /var/log/slurm/jobcomp.log.  There is no
#      slurmdbd, so `sacct` does not work; use `scontrol show job` (completed
#      jobs stay visible for MinJobAge=300 s) or the jobcomp log.
#   4. Starts slurmctld and slurmd (daemonized); their pids, and munged's if
#      this script started it, are recorded in $STATE_DIR
#      (/var/run/qpipe-slurm), and `stop` kills exactly those pids.
#   5. Waits (up to $QPIPE_SLURM_TIMEOUT, default 60 s) for the node to be
#      `idle`, resuming it if it came up down/drained, then runs a one-task
#      `srun` smoke test.  Exits 0 only if all of that worked; otherwise it
#      names the failing step and prints the tail of the relevant log.
#
# Who uses it: `.ci/run` runs `scripts/slurm_local.sh start` before the tests (and
# `stop` at the end); `tests/slurm.rs` drives `qpipe build --executor slurm` against it and
# skips loudly when no cluster answers (fails instead under QPIPE_REQUIRE_SLURM=1, which
# .ci/run sets once the cluster is up).
#
# Environment knobs:
#   QPIPE_SLURM_TIMEOUT   seconds to wait for daemons/node (default 60)
#   QPIPE_SLURM_GPUS      fake GRES gpu count on the node; 0 disables GRES (default 2)
#   QPIPE_SLURM_STATE_DIR pid/state dir (default /var/run/qpipe-slurm)
#   SLURM_CONF            slurm.conf path (default /etc/slurm/slurm.conf)

set -euo pipefail

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

STATE_DIR=${QPIPE_SLURM_STATE_DIR:-/var/run/qpipe-slurm}
TIMEOUT=${QPIPE_SLURM_TIMEOUT:-60}
GPUS=${QPIPE_SLURM_GPUS:-2}
PARTITION=debug
CLUSTER=qpipe
LOG_DIR=/var/log/slurm
CTLD_SPOOL=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
CTLD_LOG=$LOG_DIR/slurmctld.log
SLURMD_LOG=$LOG_DIR/slurmd.log
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_KEY=/etc/munge/munge.key
FAKE_GPU_DIR=/var/lib/qpipe-slurm/fakegpu
HOST=$(hostname -s)

log() { printf '[slurm_local] %s\n' "$*" >&2; }

# die STEP MESSAGE [LOGFILE...]: report the failing step, tail its logs, exit 1.
die() {
    local step=$1 msg=$2 f
    shift 2
    printf '[slurm_local] ERROR in step "%s": %s\n' "$step" "$msg" >&2
    for f in "$@"; do
        if [[ -r $f ]]; then
            printf '[slurm_local] ---- last 25 lines of %s ----\n' "$f" >&2
            tail -n 25 "$f" >&2 || true
            printf '[slurm_local] ---- end of %s ----\n' "$f" >&2
        else
            printf '[slurm_local] (log %s does not exist)\n' "$f" >&2
        fi
    done
    exit 1
}

conf_path() {
    if [[ -n ${SLURM_CONF:-} ]]; then
        printf '%s\n' "$SLURM_CONF"
    elif [[ -d /etc/slurm-llnl && ! -d /etc/slurm ]]; then
        # Debian/Ubuntu packages older than Slurm 21.08.
        printf '%s\n' /etc/slurm-llnl/slurm.conf
    else
        printf '%s\n' /etc/slurm/slurm.conf
    fi
}

# ---------------------------------------------------------------- pid helpers

# pid_of NAME: print the recorded pid of daemon NAME if that process is alive
# and really is NAME (guards against pid reuse); return 1 otherwise.
pid_of() {
    local name=$1 file=$STATE_DIR/$1.pid pid comm
    [[ -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$name" ]] || return 1
    printf '%s\n' "$pid"
}

# stop_one NAME: TERM (then KILL after 15 s) the recorded daemon NAME.
stop_one() {
    local name=$1 pid i
    if pid=$(pid_of "$name"); then
        log "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.5
        done
        if [[ -d /proc/$pid ]]; then
            log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$STATE_DIR/$name.pid"
}

# ------------------------------------------------------------- health checks

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_state() { sinfo -h -N -n "$HOST" -o %t 2>/dev/null | head -n 1; }

# A node is usable when it is idle, partly or fully allocated, or completing
# (no '*' not-responding, '~' powered-down or drain/down suffixes).
healthy() {
    command -v sinfo >/dev/null 2>&1 || return 1
    munge_ok || return 1
    ctld_up || return 1
    # sinfo keeps showing a dead slurmd as idle until SlurmdTimeout; ask it.
    scontrol show slurmd >/dev/null 2>&1 || return 1
    case "$(node_state)" in
        idle | mix | alloc | comp) return 0 ;;
        *) return 1 ;;
    esac
}

summary() {
    local ver
    ver=$(sinfo -V 2>/dev/null | awk '{print $2}')
    printf 'slurm_local: cluster UP (Slurm %s) — node %s [%s] partition %s, conf %s%s\n' \
        "${ver:-?}" "$HOST" "$(node_state)" "$PARTITION" "$(conf_path)" "${1:-}"
}

# ------------------------------------------------------------------ install

install_packages() {
    local missing=() b
    for b in slurmctld slurmd munged sinfo; do
        command -v "$b" >/dev/null 2>&1 || missing+=("$b")
    done
    ((${#missing[@]} == 0)) && return 0
    log "installing slurm-wlm + munge (missing: ${missing[*]})"
    command -v apt-get >/dev/null 2>&1 ||
        die install "apt-get not found; install slurm-wlm and munge manually"
    # Stop maintainer scripts from starting daemons we would not track.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    local rc=0 apt_log
    apt_log=$(mktemp)
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                slurm-wlm munge
    } >"$apt_log" 2>&1 || rc=$?
    ((own_policy)) && rm -f "$policy"
    if ((rc != 0)); then
        die install "apt-get failed (exit $rc)" "$apt_log"
    fi
    rm -f "$apt_log"
    for b in slurmctld slurmd munged sinfo; do
        command -v "$b" >/dev/null 2>&1 || die install "$b still missing after apt-get install"
    done
}

# -------------------------------------------------------------------- munge

start_munge() {
    if munge_ok; then
        log "munged already answering; leaving it alone"
        return 0
    fi
    local user=root
    id munge >/dev/null 2>&1 && user=munge
    install -d -m 0700 -o "$user" -g "$user" /etc/munge /var/lib/munge /var/log/munge
    install -d -m 0755 -o "$user" -g "$user" /run/munge
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" ||
                die munge-key "mungekey --create failed"
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown "$user:$user" "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    rm -f /run/munge/munged.pid
    if [[ $user == munge ]]; then
        runuser -u munge -- munged || die munged "munged failed to start (as user munge)" "$MUNGE_LOG"
    else
        munged || die munged "munged failed to start (as root)" "$MUNGE_LOG"
    fi
    local i
    for ((i = 0; i < 20; i++)); do
        munge_ok && break
        sleep 0.5
    done
    munge_ok || die munged "munged started but 'munge -n | unmunge' fails" "$MUNGE_LOG"
    if [[ -r /run/munge/munged.pid ]]; then
        cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
    else
        pgrep -n -x munged >"$STATE_DIR/munged.pid" || true
    fi
    log "munged up (pid $(cat "$STATE_DIR/munged.pid" 2>/dev/null || echo '?'), user $user)"
}

# ------------------------------------------------------------------- config

# make_fake_gpus: Slurm 22.05 drops GPUs that have no File= ("Removing
# file-less GPU"), so give each fake GPU a character device with /dev/null's
# numbers.  If mknod is not allowed, fall back to plain files (slurmd then logs
# "is not a valid character or block device" but still counts them).
make_fake_gpus() {
    local i dev
    install -d -m 0755 "$FAKE_GPU_DIR"
    for ((i = 0; i < GPUS; i++)); do
        dev=$FAKE_GPU_DIR/gpu$i
        [[ -c $dev ]] && continue
        rm -f "$dev"
        mknod -m 0666 "$dev" c 1 3 2>/dev/null || install -m 0666 /dev/null "$dev"
    done
}

# write_config: (re)write slurm.conf and gres.conf; prints "changed" if either
# file's contents changed.
write_config() {
    local conf gres hw cpus mem defmem node_gres="" tmp changed=0
    conf=$(conf_path)
    gres=$(dirname "$conf")/gres.conf
    hw=$(slurmd -C 2>/dev/null | head -n 1) || die config "'slurmd -C' failed"
    cpus=$(grep -o 'CPUs=[0-9]*' <<<"$hw" | cut -d= -f2)
    mem=$(grep -o 'RealMemory=[0-9]*' <<<"$hw" | cut -d= -f2)
    [[ -n $cpus && -n $mem ]] || die config "cannot parse CPUs/RealMemory from 'slurmd -C': $hw"
    # Without DefMemPerCPU a job that omits --mem is given the whole node's
    # memory under CR_Core_Memory, which serializes all jobs.
    defmem=$((mem / cpus))
    ((GPUS > 0)) && node_gres=" Gres=gpu:$GPUS"
    install -d -m 0755 "$(dirname "$conf")" "$LOG_DIR" "$STATE_DIR"
    install -d -m 0755 "$CTLD_SPOOL" "$SLURMD_SPOOL"

    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Generated by scripts/slurm_local.sh — one-node test cluster. Do not edit.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
ReturnToService=2
StateSaveLocation=$CTLD_SPOOL
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$CTLD_LOG
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
# Short timeouts for tests.
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=300
Waittime=0
${node_gres:+GresTypes=gpu}
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem${node_gres} State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if ! cmp -s "$tmp" "$conf"; then
        install -m 0644 "$tmp" "$conf"
        changed=1
    fi
    if ((GPUS > 0)); then
        make_fake_gpus
        printf '# Generated by scripts/slurm_local.sh: fake GPUs (char devices aliasing /dev/null).\nNodeName=%s Name=gpu File=%s/gpu[0-%d]\n' \
            "$HOST" "$FAKE_GPU_DIR" "$((GPUS - 1))" >"$tmp"
    else
        printf '# Generated by scripts/slurm_local.sh: no GRES.\n' >"$tmp"
    fi
    if ! cmp -s "$tmp" "$gres"; then
        install -m 0644 "$tmp" "$gres"
        changed=1
    fi
    rm -f "$tmp"
    log "config $conf (CPUs=$cpus RealMemory=$mem${node_gres})"
    ((changed)) && echo changed
    return 0
}

# ------------------------------------------------------------------- daemons

start_slurmctld() {
    if pid_of slurmctld >/dev/null; then
        log "slurmctld already running (pid $(pid_of slurmctld))"
    else
        log "starting slurmctld"
        slurmctld || die slurmctld "slurmctld failed to start" "$CTLD_LOG"
    fi
    local i
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        ctld_up && return 0
        # The daemon writes its pid file shortly after forking; allow 10 s.
        if ((i >= 20)) && ! pid_of slurmctld >/dev/null; then
            die slurmctld "slurmctld is not running (exited during startup?)" "$CTLD_LOG"
        fi
        sleep 0.5
    done
    die slurmctld "slurmctld not answering 'scontrol ping' after ${TIMEOUT}s" "$CTLD_LOG"
}

start_slurmd() {
    if pid_of slurmd >/dev/null; then
        log "slurmd already running (pid $(pid_of slurmd))"
        return 0
    fi
    log "starting slurmd"
    slurmd || die slurmd "slurmd failed to start" "$SLURMD_LOG"
}

wait_node_idle() {
    local i st resumed=0
    for ((i = 0; i < TIMEOUT * 2; i++)); do
        st=$(node_state)
        case "$st" in
            idle | mix | alloc | comp) return 0 ;;
            down* | drain* | drng* | fail*)
                if ((resumed == 0)); then
                    log "node $HOST is '$st'; resuming it"
                    scontrol update nodename="$HOST" state=resume ||
                        log "scontrol update state=resume failed (will keep waiting)"
                    resumed=1
                fi
                ;;
        esac
        if ((i >= 20)) && ! pid_of slurmd >/dev/null; then
            die slurmd "slurmd is not running (exited during startup?)" "$SLURMD_LOG" "$CTLD_LOG"
        fi
        sleep 0.5
    done
    scontrol show node "$HOST" >&2 || true
    die node-idle "node $HOST is '${st:-unknown}', not idle, after ${TIMEOUT}s" "$SLURMD_LOG" "$CTLD_LOG"
}

smoke_test() {
    local out
    out=$(cd /tmp && timeout "$TIMEOUT" srun --quiet -p "$PARTITION" -N1 -n1 -t 1 hostname 2>&1) ||
        die smoke-test "srun hostname failed: $out" "$SLURMD_LOG" "$CTLD_LOG"
    [[ $out == *"$HOST"* ]] || log "warning: srun hostname printed '$out'"
}

# ------------------------------------------------------------------ commands

cmd_start() {
    local t0=$SECONDS changed
    [[ $(id -u) -eq 0 ]] || die preflight "must run as root"
    if healthy 2>/dev/null; then
        summary " (already running; nothing to do)"
        return 0
    fi
    install -d -m 0755 "$STATE_DIR"
    install_packages
    start_munge
    changed=$(write_config)
    if [[ $changed == changed ]]; then
        # Daemons running with an older config must pick up the new one.
        stop_one slurmd
        stop_one slurmctld
    fi
    start_slurmctld
    start_slurmd
    wait_node_idle
    smoke_test
    healthy || die verify "cluster not healthy after start: node '$(node_state)'" "$SLURMD_LOG" "$CTLD_LOG"
    summary " (started in $((SECONDS - t0))s)"
}

cmd_stop() {
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
    log "stopped"
}

cmd_status() {
    if ! command -v sinfo >/dev/null 2>&1; then
        echo "slurm_local: sinfo not installed" >&2
        return 1
    fi
    sinfo || true
    if healthy; then
        summary
        return 0
    fi
    echo "slurm_local: cluster NOT healthy (munge ok: $(munge_ok && echo yes || echo no), slurmctld up: $(ctld_up && echo yes || echo no), slurmd up: $(scontrol show slurmd >/dev/null 2>&1 && echo yes || echo no), node: '$(node_state)')" >&2
    return 1
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart)
        cmd_stop
        cmd_start
        ;;
    status) cmd_status ;;
    *)
        echo "usage: $0 {start|stop|restart|status}" >&2
        exit 2
        ;;
esac
