#!/usr/bin/env bash
# Shared by the launch scripts: `--dry-run` handling and printing/running commands.
# Sourced, not run: sets DRY_RUN and ARGS (the arguments without --dry-run).

DRY_RUN=0
ARGS=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$arg"); fi
done

# run CMD...: prints the command (shell-quoted) and, unless --dry-run, runs it.
run() {
  printf '%q ' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}
