#!/usr/bin/env bash
# A multi-host TPU pod slice (e.g. v4-32, v5p-64): copy the code to every worker, install it,
# and start the same command on all of them; JAX finds the other workers by itself.
#   bash launch/tpu_pod.sh [--dry-run] --workdir=/mnt/shared/run TPU_NAME ZONE \
#     /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
# Run it from a machine with gcloud. --workdir must be storage every worker sees at the same
# path: a shared mount (NFS, Filestore, or a GCS bucket mounted with gcsfuse), never a worker's
# local disk (the run checks this at start and refuses it);
# its checkpoints are what a preempted pod resumes from: rerun the same command. The checkpoint
# folder must exist at the same path on every worker (a persistent disk or a copy per worker).
# Every worker gets the same checkout and installs it the same way. --dry-run prints the
# gcloud commands without running them.
set -euo pipefail
source "$(dirname "$0")/common.sh"
set -- "${ARGS[@]}"
usage="usage: launch/tpu_pod.sh [--dry-run] --workdir=/SHARED/DIR TPU_NAME ZONE CHECKPOINT_DIR CONFIG [overrides...]"
need_shared_workdir "$usage"
NAME=${1:?$usage}
ZONE=${2:?$usage}
CKPT=${3:?$usage}
CONFIG=${4:?$usage}
shift 4
cd "$(dirname "$0")/.."
OVERRIDES=$(printf '%q ' "$@")
REMOTE="cd ~/sqlm_jax && python -m pip install -q -e . 'jax[tpu]<0.11' && \
python -m sqlm_jax.main --config $(printf '%q' "$CONFIG") --config.model.path=$(printf '%q' "$CKPT") \
--config.mesh.distributed=on --workdir $(printf '%q' "$WORKDIR") $OVERRIDES"
run gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse \
  sqlm_jax setup.py configs "$NAME":~/sqlm_jax
run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
