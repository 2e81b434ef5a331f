#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice), install cada_jax on every worker, run a `cada`
# command on all workers at once, and tear it down. Needs the gcloud CLI, logged in, with a project.
#
# Every worker runs the same command; cada_jax.distributed.initialize_distributed() finds the other
# hosts through the TPU metadata, so nothing else needs to be set for a pod slice.
#
# Examples:
#   launch/tpu_vm.sh up  --name cada-v5e --zone us-west4-a --accelerator v5litepod-8
#   launch/tpu_vm.sh run --name cada-v5e --zone us-west4-a -- pipeline configs/llama3_8b_tpu.yaml
#   launch/tpu_vm.sh delete --name cada-v5e --zone us-west4-a
#   launch/tpu_vm.sh all --name cada-v5p --zone us-east5-a --accelerator v5p-64 --spot -- rl c.yaml
#   launch/tpu_vm.sh --dry-run all --name t --zone us-central2-b --accelerator v4-8 -- --help   # print only
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [--dry-run] COMMAND --name NAME --zone ZONE [options] [-- CADA_ARGS...]

commands:
  create   create the TPU VM / pod slice
  setup    copy this checkout (tracked files) to every worker, install jax[tpu] + cada_jax there
  run      run `cada CADA_ARGS...` on every worker (--worker=all)
  ssh      run a shell command (CADA_ARGS joined) on every worker
  delete   delete the TPU VM
  up       create + setup
  all      create + setup + run, then delete (also when run fails)

options:
  --name NAME           TPU VM name (required)
  --zone ZONE           e.g. us-west4-a (v5e), us-east5-a (v5p), us-central2-b (v4) (required)
  --accelerator TYPE    accelerator type (default v5litepod-8), e.g. v4-8, v5p-64, v6e-8
  --version VERSION     TPU runtime version (default: chosen from the accelerator family)
  --project PROJECT     GCP project (default: gcloud's configured project)
  --spot                create a Spot TPU VM
  --remote-dir DIR      where the project lives on the workers (default cada_jax, in $HOME)
  --env KEY=VALUE       environment variable for `run` (repeatable), e.g. --env HF_TOKEN=...
  --dry-run             print the gcloud commands instead of running them
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

dry_run=0
cmd=""
name=""
zone=""
accel="v5litepod-8"
version=""
project=""
spot=0
remote_dir="cada_jax"
envs=()
cada_args=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --name|--zone|--accelerator|--version|--project|--remote-dir|--env)
      [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
      case "$1" in
        --name) name="$2" ;;
        --zone) zone="$2" ;;
        --accelerator) accel="$2" ;;
        --version) version="$2" ;;
        --project) project="$2" ;;
        --remote-dir) remote_dir="$2" ;;
        --env) [[ "$2" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$2'"; envs+=("$2") ;;
      esac
      shift 2 ;;
    --spot) spot=1; shift ;;
    --) shift; cada_args=("$@"); break ;;
    create|setup|run|ssh|delete|up|all)
      [[ -z "$cmd" ]] || die "two commands given ('$cmd' and '$1'); give one"
      cmd="$1"; shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done

[[ -n "$cmd" ]] || { usage >&2; die "no command given (create, setup, run, ssh, delete, up or all)"; }
[[ -n "$name" ]] || die "--name is required (the TPU VM name)"
[[ -n "$zone" ]] || die "--zone is required, e.g. --zone us-west4-a"
if [[ "$cmd" == run || "$cmd" == ssh ]] && [[ ${#cada_args[@]} -eq 0 ]]; then
  die "'$cmd' needs the command after --, e.g. -- pipeline configs/x.yaml"
fi

if [[ -z "$version" ]]; then
  case "$accel" in
    v4-*) version="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
    v5p-*) version="v2-alpha-tpuv5" ;;
    v6e-*) version="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for accelerator '$accel'; pass --version (see 'gcloud compute tpus versions list')" ;;
  esac
fi

gc=(gcloud compute tpus tpu-vm)
common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

run_cmd() {
  if ((dry_run)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

do_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  run_cmd "${gc[@]}" create "$name" "${common[@]}" --accelerator-type="$accel" --version="$version" "${extra[@]}"
}

do_setup() {
  local tmp tarball
  if ((dry_run)); then
    tmp="/tmp/cada_jax-upload"
  else
    tmp="$(mktemp -d)"
  fi
  tarball="$tmp/cada_jax.tar.gz"
  if ((dry_run)); then
    echo "+ (cd $repo_root && git ls-files -z | tar --null -czf $tarball -T -)"
  else
    (cd "$repo_root" && git ls-files -z | tar --null -czf "$tarball" -T -)
  fi
  run_cmd "${gc[@]}" scp "$tarball" "$name:cada_jax.tar.gz" "${common[@]}" --worker=all
  ((dry_run)) || rm -rf "$tmp"
  local install="set -e; mkdir -p $remote_dir && tar xzf cada_jax.tar.gz -C $remote_dir && cd $remote_dir"
  install+=" && python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip"
  install+=" && pip install -q -e '.[tpu]' && python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
  run_cmd "${gc[@]}" ssh "$name" "${common[@]}" --worker=all --command="$install"
}

remote_env() {
  local out="" kv
  for kv in "${envs[@]+"${envs[@]}"}"; do out+="export $(printf '%q' "$kv"); "; done
  printf '%s' "$out"
}

do_run() {
  local quoted
  quoted="$(printf ' %q' "${cada_args[@]}")"
  run_cmd "${gc[@]}" ssh "$name" "${common[@]}" --worker=all \
    --command="cd $remote_dir && . .venv/bin/activate && $(remote_env)cada$quoted"
}

do_ssh() {
  run_cmd "${gc[@]}" ssh "$name" "${common[@]}" --worker=all \
    --command="cd $remote_dir && . .venv/bin/activate && $(remote_env)${cada_args[*]}"
}

do_delete() {
  run_cmd "${gc[@]}" delete "$name" "${common[@]}" --quiet
}

case "$cmd" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  ssh) do_ssh ;;
  delete) do_delete ;;
  up) do_create; do_setup ;;
  all)
    do_create
    trap 'status=$?; echo "tpu_vm.sh: deleting $name" >&2; do_delete || true; exit $status' EXIT
    do_setup
    if [[ ${#cada_args[@]} -gt 0 ]]; then do_run; fi
    ;;
esac
