#!/usr/bin/env bash
# Several GPU hosts (a cluster without SLURM): one process per host, joined by jax.distributed.
#   bash launch/gpu_multi.sh [--dry-run] --workdir=/mnt/shared/run COORDINATOR_HOST:PORT \
#     NUM_HOSTS HOST_INDEX /ckpt/Qwen2.5-3B-Instruct configs/arithmetic.py [--config.x=y ...]
# Run it on every host with its own HOST_INDEX (0 is the coordinator and the only writer) and
# the same --workdir, storage every host sees at that path: a shared mount (NFS, Filestore, a
# bucket mounted with gcsfuse; the run checks this at start and refuses a local disk); install
# every host from one commit. Each
# process drives its host's GPUs; the mesh spans all of them (put data = NUM_HOSTS for the
# slower links between hosts). Under SLURM, srun one process per host and leave the coordinator
# fields out: JAX reads SLURM's environment. --dry-run prints the commands.
set -euo pipefail
source "$(dirname "$0")/common.sh"
set -- "${ARGS[@]}"
usage="usage: launch/gpu_multi.sh [--dry-run] --workdir=/SHARED/DIR COORDINATOR NUM_HOSTS HOST_INDEX CHECKPOINT_DIR CONFIG [overrides...]"
need_shared_workdir "$usage"
COORDINATOR=${1:?$usage}
NUM_HOSTS=${2:?$usage}
HOST_INDEX=${3:?$usage}
CKPT=${4:?$usage}
CONFIG=${5:?$usage}
shift 5
cd "$(dirname "$0")/.."
run python -m pip install -q -e . "jax[cuda12]<0.11"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
run python -m sqlm_jax.main --config "$CONFIG" --config.model.path="$CKPT" \
  --workdir "$WORKDIR" \
  --config.mesh.distributed=on --config.mesh.coordinator="$COORDINATOR" \
  --config.mesh.num_processes="$NUM_HOSTS" --config.mesh.process_id="$HOST_INDEX" "$@"
