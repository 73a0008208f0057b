#!/usr/bin/env bash
# Shared by the launch scripts: `--dry-run` and `--workdir=DIR` handling, printing/running commands.
# Sourced, not run: sets DRY_RUN, WORKDIR ("" when not given) and ARGS (the other arguments).

DRY_RUN=0
WORKDIR=""
ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --workdir=*) WORKDIR="${arg#--workdir=}" ;;
    *) ARGS+=("$arg") ;;
  esac
done

# run CMD...: prints the command (shell-quoted) and, unless --dry-run, runs it.
run() {
  printf '%q ' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

# need_shared_workdir USAGE: several hosts write one run, so the workdir must be given, and be
# storage every host sees at the same path (a shared mount); each host's local disk is not.
need_shared_workdir() {
  if [[ -z "$WORKDIR" ]]; then
    echo "$1" >&2
    echo "--workdir=DIR is required: every host must see it at the same path, so use a shared" \
      "mount (NFS, Filestore, a GCS bucket mounted with gcsfuse), never a local disk." >&2
    exit 2
  fi
}
