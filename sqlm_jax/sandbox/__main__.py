"""python -m sqlm_jax.sandbox PROGRAM.py [--stdin FILE] [--timeout S] [--expected FILE], or
--describe: see cli.py."""

import sys

from sqlm_jax.sandbox.cli import main

if __name__ == "__main__":
  sys.exit(main())
