#!/usr/bin/env bash
# Run a command on one GPU node: make (or reuse) a virtual environment, install cada_jax with
# jax[cuda12], check that JAX sees the GPUs, and run the command inside the environment.
#
# One node, all its GPUs: JAX uses every visible GPU as a device of one process; pick the mesh in
# the config (e.g. fsdp=8 for 8xH100). Several nodes: run this script once per node with
#   CADA_COORDINATOR=<node0 ip>:8476 CADA_NUM_PROCESSES=<nodes> CADA_PROCESS_ID=<rank>
# in the environment (or under SLURM, where JAX finds these itself); they are passed through.
#
# Examples:
#   launch/gpu.sh -- cada pipeline configs/llama3_8b_tpu.yaml
#   launch/gpu.sh --no-install -- python -m pytest -q tests/test_sharding.py
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu.sh [--venv DIR] [--python PYTHON] [--no-install] [--dry-run] -- COMMAND [ARGS...]

  --venv DIR       virtual environment to create or reuse (default: .venv in the repository)
  --python PYTHON  interpreter that creates the environment (default python3)
  --no-install     skip `pip install -e '.[cuda]'` (environment already set up)
  --dry-run        print what would run, change nothing
EOF
}

die() { echo "gpu.sh: $*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
python_bin="python3"
install=1
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --venv) [[ $# -ge 2 && -n "$2" ]] || die "--venv needs a directory"; venv="$2"; shift 2 ;;
    --python) [[ $# -ge 2 && -n "$2" ]] || die "--python needs an interpreter"; python_bin="$2"; shift 2 ;;
    --no-install) install=0; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown argument '$1' (put the command after --)" ;;
  esac
done
[[ $# -gt 0 ]] || { usage >&2; die "no command given; put it after --"; }

run_cmd() {
  if ((dry_run)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

if ! ((dry_run)) && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh: warning: nvidia-smi not found; is the NVIDIA driver installed on this node?" >&2
fi

if [[ ! -x "$venv/bin/python" ]]; then
  run_cmd "$python_bin" -m venv "$venv"
fi
if ((install)); then
  run_cmd "$venv/bin/python" -m pip install -q -U pip
  run_cmd "$venv/bin/python" -m pip install -q -e "$repo_root[cuda]"
fi
# Fail early, with a readable message, when JAX cannot see a GPU (wrong CUDA wheel, no driver).
run_cmd "$venv/bin/python" -c "import jax, sys; d = jax.devices(); print('jax devices:', d); sys.exit(0 if d[0].platform == 'gpu' else 'gpu.sh: JAX found no GPU (platform %s); check the driver and jax[cuda12]' % d[0].platform)"

export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
cd "$repo_root"
run_cmd "$@"
