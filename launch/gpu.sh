#!/usr/bin/env bash
# One host with one or more NVIDIA GPUs: install JAX with CUDA, check the checkpoint, run a config.
#   bash launch/gpu.sh [--dry-run] [--workdir=DIR] /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
# One process drives every GPU of the host; the mesh (default: parameters and batches split
# over all of them, --config.mesh.fsdp=-1) comes from the config. --dry-run prints the commands.
set -euo pipefail
source "$(dirname "$0")/common.sh"
set -- "${ARGS[@]}"
usage="usage: launch/gpu.sh [--dry-run] [--workdir=DIR] CHECKPOINT_DIR CONFIG [overrides...]"
CKPT=${1:?$usage}
CONFIG=${2:?$usage}
shift 2
cd "$(dirname "$0")/.."
run python -m pip install -q -e ".[test]" "jax[cuda12]<0.11"
run python -m sqlm_jax.check_parity "$CKPT"  # float32 logits vs transformers, before GPU hours
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
WORKDIR=${WORKDIR:-"runs/$(basename "$CONFIG" .py)-$(date +%Y%m%d-%H%M%S)"}
# The memory plan first (no weights read): a config that cannot fit stops here.
run python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" --dry_run \
  --workdir "$WORKDIR" "$@"
run python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" --workdir "$WORKDIR" "$@"
