#!/usr/bin/env bash
# A single-host TPU VM (e.g. v4-8, v5e-8, v5p-8): install JAX for TPU, check the checkpoint, run.
#   bash launch/tpu_vm.sh [--dry-run] [--workdir=DIR] /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
# Run it on the VM itself (gcloud compute tpus tpu-vm ssh NAME --command "bash ..."). The run
# uses every chip of the VM through the config's mesh (default --config.mesh.fsdp=-1: parameters,
# optimizer states and batches split over all of them); the checkpoint folder must be on the
# VM's disk. --dry-run prints the commands.
set -euo pipefail
source "$(dirname "$0")/common.sh"
set -- "${ARGS[@]}"
usage="usage: launch/tpu_vm.sh [--dry-run] [--workdir=DIR] CHECKPOINT_DIR CONFIG [overrides...]"
CKPT=${1:?$usage}
CONFIG=${2:?$usage}
shift 2
cd "$(dirname "$0")/.."
run python -m pip install -q -e . "jax[tpu]<0.11"
# The parity check needs torch (pip install torch, a CPU build is enough); skipped without it.
if [[ "$DRY_RUN" == 1 ]] || python -c "import torch" 2>/dev/null; then
  run python -m sqlm_jax.check_parity "$CKPT"
fi
WORKDIR=${WORKDIR:-"runs/$(basename "$CONFIG" .py)-$(date +%Y%m%d-%H%M%S)"}
run python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" --dry_run \
  --workdir "$WORKDIR" "$@"
run python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" --workdir "$WORKDIR" "$@"
