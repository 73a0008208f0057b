#!/usr/bin/env bash
# One NVIDIA GPU: install JAX with CUDA, check the checkpoint, run a config.
#   bash launch/gpu.sh /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
set -euo pipefail
CKPT=${1:?usage: launch/gpu.sh CHECKPOINT_DIR CONFIG [overrides...]}
CONFIG=${2:?usage: launch/gpu.sh CHECKPOINT_DIR CONFIG [overrides...]}
shift 2
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]" "jax[cuda12]<0.11"
python -m sqlm_jax.check_parity "$CKPT"  # float32 logits vs transformers, before spending GPU hours
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" \
  --workdir "runs/$(basename "$CONFIG" .py)-$(date +%Y%m%d-%H%M%S)" "$@"
