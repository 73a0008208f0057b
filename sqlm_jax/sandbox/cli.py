"""The command line (`python -m sqlm_jax.sandbox`): one program run exactly as training runs it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional, Sequence

from sqlm_jax.sandbox.isolation import describe
from sqlm_jax.sandbox.launch import run
from sqlm_jax.sandbox.limits import DEFAULT_LIMITS

# CLI: python -m sqlm_jax.sandbox PROGRAM.py [--stdin FILE] [--timeout S] [--expected FILE]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m sqlm_jax.sandbox",
      description="Run one program in the sandbox exactly as training does; print JSON.")
  parser.add_argument("program", nargs="?", help="path of the Python program to run")
  parser.add_argument("--stdin", help="file whose contents are the program's stdin")
  parser.add_argument("--expected", help="file holding the expected stdout")
  parser.add_argument("--timeout", type=float, default=DEFAULT_LIMITS.timeout_s,
                      help="wall-clock limit in seconds")
  parser.add_argument("--unsafe-no-bwrap", action="store_true",
                      help="without bubblewrap, run with rlimits only (host files visible)")
  parser.add_argument("--describe", action="store_true",
                      help="print which isolation this machine gives (memory mode, seccomp, uids)")
  args = parser.parse_args(argv)
  if args.describe:
    print(json.dumps(describe(), indent=2))
    return 0
  if args.program is None:
    parser.error("give a PROGRAM to run, or --describe")
  read = lambda path: open(path, encoding="utf-8").read() if path else None
  try:
    result = run(read(args.program), read(args.stdin) or "", read(args.expected),
                 dataclasses.replace(DEFAULT_LIMITS, timeout_s=args.timeout),
                 allow_unsandboxed=args.unsafe_no_bwrap)
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 2
  print(json.dumps(dataclasses.asdict(result), indent=2))
  return 0
