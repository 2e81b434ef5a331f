#!/usr/bin/env bash
# Run one command as N JAX processes on this machine (CPU devices), joined with jax.distributed.
#
# Each process gets CADA_COORDINATOR=127.0.0.1:PORT, CADA_NUM_PROCESSES=N, CADA_PROCESS_ID=i,
# JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D, which
# cada_jax.distributed.initialize_distributed() reads. Output lines are prefixed with "[i] ".
# Waits for all processes; if one fails, the others are stopped (they would otherwise block on
# the coordinator) and the script exits with the failed process's status.
#
# Example:
#   launch/multihost_local.sh -n 2 -d 4 -- python -m tests.multihost_worker /tmp/ckpt
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/multihost_local.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-t TIMEOUT_S] -- COMMAND [ARGS...]

  -n  number of processes (default 2)
  -d  CPU devices per process (default 1)
  -p  coordinator port on 127.0.0.1 (default: a free port)
  -t  kill everything and fail after TIMEOUT_S seconds (default: no limit)
EOF
}

num=2
devices=1
port=""
timeout_s=""
while getopts ":n:d:p:t:h" opt; do
  case "$opt" in
    n) num="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    t) timeout_s="$OPTARG" ;;
    h) usage; exit 0 ;;
    :) echo "multihost_local.sh: option -$OPTARG needs a value" >&2; usage >&2; exit 2 ;;
    *) echo "multihost_local.sh: unknown option -$OPTARG" >&2; usage >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
if [[ $# -eq 0 ]]; then
  echo "multihost_local.sh: no command given; put it after --" >&2
  usage >&2
  exit 2
fi
for pair in "n:$num" "d:$devices"; do
  if ! [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]]; then
    echo "multihost_local.sh: -${pair%%:*} must be a positive integer, got '${pair#*:}'" >&2
    exit 2
  fi
done
if [[ -n "$timeout_s" && ! "$timeout_s" =~ ^[1-9][0-9]*$ ]]; then
  echo "multihost_local.sh: -t must be a positive number of seconds, got '$timeout_s'" >&2
  exit 2
fi

if [[ -z "$port" ]]; then
  py="${PYTHON:-python3}"
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
fi

# Replace any device-count flag the caller had, keep their other XLA flags.
base_flags="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/ +/ /g; s/^ //; s/ $//')"

set -m  # every background job in its own process group, so a whole job can be stopped
pids=()
for ((i = 0; i < num; i++)); do
  (
    export CADA_COORDINATOR="127.0.0.1:${port}" CADA_NUM_PROCESSES="$num" CADA_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="${base_flags:+$base_flags }--xla_force_host_platform_device_count=${devices}"
    "$@" 2>&1 | sed -u "s/^/[$i] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=("$!")
done
set +m  # groups are set at fork; no job-control chatter from here on

stop_all() {
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

start=$SECONDS
status=0
remaining=$num
while ((remaining > 0)); do
  for idx in "${!pids[@]}"; do
    pid="${pids[$idx]}"
    [[ "$pid" == done ]] && continue
    if ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      pids[$idx]=done
      remaining=$((remaining - 1))
      if ((rc != 0 && status == 0)); then
        echo "multihost_local.sh: process $idx exited with status $rc; stopping the others" >&2
        status=$rc
        for p in "${pids[@]}"; do [[ "$p" != done ]] && kill -TERM -- "-$p" 2>/dev/null || true; done
      fi
    fi
  done
  if [[ -n "$timeout_s" ]] && ((SECONDS - start >= timeout_s)) && ((remaining > 0)); then
    echo "multihost_local.sh: timed out after ${timeout_s}s; stopping all processes" >&2
    for p in "${pids[@]}"; do [[ "$p" != done ]] && kill -KILL -- "-$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    exit 124
  fi
  ((remaining > 0)) && sleep 0.2
done
exit "$status"
