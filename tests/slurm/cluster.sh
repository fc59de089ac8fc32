#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for tests/test_slurm.py and CI (needs root).
#
#   bash tests/slurm/cluster.sh start    # apt-installs slurm-wlm + munge if absent, starts munged, slurmctld, slurmd
#   bash tests/slurm/cluster.sh status   # daemons, sinfo, squeue
#   bash tests/slurm/cluster.sh stop     # kills exactly the daemons that `start` started (pids in the state dir)
#
# The node offers its CPUs and memory (from `slurmd -C`) and one GPU GRES backed by /dev/null, so
# `--gpus=1` / `--gres=gpu:1` jobs schedule on a machine without a GPU (SLURM sets CUDA_VISIBLE_DEVICES=0;
# the trainers fall back to CPU when torch sees no CUDA). Two partitions share the node: `cpu` (default)
# and `gpu`, the names profiles/slurm/config.yaml defaults to. No accounting database: finished jobs stay
# visible to `squeue`/`scontrol show job` for MinJobAge=600 s, and the Snakemake plugin is told to use
# squeue for job status (--slurm-status-command squeue).
#
# slurm.conf and gres.conf go to /etc/slurm (where Debian's commands look, so sbatch/sinfo need no
# SLURM_CONF); an existing slurm.conf that this script did not write is never overwritten.
# State (spool, logs, pid files): $CNNBENCH_SLURM_STATE, default /var/tmp/cnnbench-slurm.
set -euo pipefail

STATE=${CNNBENCH_SLURM_STATE:-/var/tmp/cnnbench-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# cnnbench one-node test cluster (tests/slurm/cluster.sh)"
DAEMONS=(slurmd slurmctld munged)   # stop order

log() { echo "cluster.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

node_name() { slurmd -C | sed -n 's/^NodeName=\([^ ]*\).*/\1/p'; }

pid_alive() {  # pid_alive NAME -> 0 when the recorded pid runs a process named NAME
    local f=$STATE/$1.pid pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat /proc/"$pid"/comm 2>/dev/null)" == "$1" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [[ $(id -u) == 0 ]] || die "slurm-wlm/munge are not installed and we are not root to apt-get them"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

write_config() {
    local host node_line node
    host=$(hostname -s)
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; refusing to overwrite it"
    fi
    # "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"
    node_line=$(slurmd -C | grep '^NodeName=')
    [[ -n $node_line ]] || die "slurmd -C printed no NodeName line"
    node=$(node_name)
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log"
    # written aside and renamed: a command reading slurm.conf meanwhile never sees half a file
    cat > "$CONF.tmp" <<CONF
$MARKER
ClusterName=cnnbench
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
# Finished jobs stay in slurmctld (squeue/scontrol) this long: the plugin reads job states with squeue.
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
KillWait=5
MailProg=/bin/true
InactiveLimit=0
${node_line} NodeAddr=127.0.0.1 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$node Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$node MaxTime=INFINITE State=UP
CONF
    mv -f "$CONF.tmp" "$CONF"
    # A stand-in GPU: /dev/null, no autodetection.
    cat > "$CONF_DIR/gres.conf.tmp" <<CONF
$MARKER
AutoDetect=off
NodeName=$node Name=gpu File=/dev/null
CONF
    mv -f "$CONF_DIR/gres.conf.tmp" "$CONF_DIR/gres.conf"
    # Debian's cgroup.conf is not needed (proctrack/linuxproc, task/none).
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        if pid_alive munged; then log "munged already running (pid $(<"$STATE/munged.pid"))"
        else log "a munged not started by this script is already running; using it"; fi
        return
    fi
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    rm -f "$STATE/munged.pid"
    mkdir -p "$STATE/log"
    # munged forks and writes its pid file itself; it runs as the munge user.
    touch "$STATE/munged.pid"; chown munge:munge "$STATE/munged.pid"
    setpriv --reuid=munge --regid=munge --init-groups munged --pid-file="$STATE/munged.pid" \
        --log-file=/var/log/munge/munged.log </dev/null >>"$STATE/log/munged.out" 2>&1
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not come up (see /var/log/munge/munged.log)"
}

start_daemon() {  # start_daemon slurmctld|slurmd : each forks and writes its pid file (slurm.conf)
    local name=$1
    if pid_alive "$name"; then log "$name already running (pid $(<"$STATE/$name.pid"))"; return; fi
    rm -f "$STATE/$name.pid"
    # stdio away from the caller's pipes (a daemon holding them keeps a CI log reader waiting)
    "$name" </dev/null >>"$STATE/log/$name.out" 2>&1
    for _ in $(seq 50); do
        pid_alive "$name" && return
        sleep 0.2
    done
    die "$name did not start (see $STATE/log/$name.log)"
}

wait_node_idle() {  # up to ~60 s
    local host state i
    host=$(node_name)
    for i in $(seq 120); do
        pid_alive slurmctld || die "slurmctld exited; see $STATE/log/slurmctld.log"
        pid_alive slurmd || die "slurmd exited; see $STATE/log/slurmd.log"
        state=$(timeout 5 sinfo -h -n "$host" -o %T 2>/dev/null | head -n1 || true)
        case $state in
            idle*|mixed*|allocated*|completing*) log "node $host is $state"; return ;;
            drain*|down*|fail*|"")
                # A restarted node may come back DOWN/DRAINED: resume it.
                if [[ -n $state && $((i % 10)) == 5 ]]; then
                    scontrol update nodename="$host" state=resume 2>/dev/null || true
                fi ;;
        esac
        sleep 0.5
    done
    sinfo -N -l >&2 || true
    die "node $host did not become idle (last state: ${state:-unknown}); see $STATE/log/"
}

cmd_start() {
    [[ $(id -u) == 0 ]] || die "start needs root"
    install_packages
    if pid_alive slurmctld && pid_alive slurmd; then
        log "already running"
        wait_node_idle
        return
    fi
    write_config
    start_munge
    start_daemon slurmctld
    start_daemon slurmd
    wait_node_idle
    log "up: slurmctld $(<"$STATE/slurmctld.pid"), slurmd $(<"$STATE/slurmd.pid"); state in $STATE"
}

cmd_stop() {
    local name pid
    for name in "${DAEMONS[@]}"; do
        if pid_alive "$name"; then
            pid=$(<"$STATE/$name.pid")
            log "stopping $name (pid $pid)"
            kill "$pid"
            for _ in $(seq 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.2
            done
            if kill -0 "$pid" 2>/dev/null; then log "$name (pid $pid) ignores SIGTERM; SIGKILL"; kill -9 "$pid" || true; fi
        fi
        rm -f "$STATE/$name.pid"
    done
}

cmd_status() {
    local name rc=0
    for name in munged slurmctld slurmd; do
        if pid_alive "$name"; then echo "$name: running (pid $(<"$STATE/$name.pid"))"
        else echo "$name: not running (by this script)"; rc=1; fi
    done
    if [[ $rc == 0 ]]; then sinfo; squeue; fi
    return $rc
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
