#!/usr/bin/env bash
# A single-host TPU VM (e.g. v4-8 / v5e-8): install JAX for TPU, check the checkpoint, run a config.
#   bash launch/tpu_vm.sh /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
# Run it on the VM itself (gcloud compute tpus tpu-vm ssh NAME --command "bash ...").
# The run uses the VM's first device; the checkpoint folder must be on the VM's disk.
set -euo pipefail
CKPT=${1:?usage: launch/tpu_vm.sh CHECKPOINT_DIR CONFIG [overrides...]}
CONFIG=${2:?usage: launch/tpu_vm.sh CHECKPOINT_DIR CONFIG [overrides...]}
shift 2
cd "$(dirname "$0")/.."
python -m pip install -q -e . "jax[tpu]<0.11"
# The parity check needs torch (pip install torch, a CPU build is enough); skipped without it.
if python -c "import torch" 2>/dev/null; then python -m sqlm_jax.check_parity "$CKPT"; fi
python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" \
  --workdir "runs/$(basename "$CONFIG" .py)-$(date +%Y%m%d-%H%M%S)" "$@"
