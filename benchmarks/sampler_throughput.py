"""Greedy generation throughput on CPU: our jitted Sampler against transformers' `generate`.

  python benchmarks/sampler_throughput.py [--quick] [--batch 32] [--prompt-length 32]
      [--new-tokens 128] [--vocab 16384] [--hidden 384] [--layers 6] [--runs 5]

One random Qwen2-shaped checkpoint is saved by transformers and read by both sides, each in
float32 and in bfloat16. Every (side, dtype) runs in its own worker process, because peak RSS
(ru_maxrss) only grows within a process: separate processes keep one side's imports, weights and
compiled code out of the other's figure. The workers stay alive and are timed in interleaved
rounds (the order reversed every other round), so that load from other processes on a shared
machine falls on all four alike rather than on whichever ran during a busy minute.

The stop id is one past the vocabulary, so no row stops early and every row generates exactly
`--new-tokens` tokens on both sides (checked). Greedy outputs of the two float32 runs are
compared row by row; bfloat16 rows may diverge legitimately (the two sides round differently).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIDES = [("transformers", "float32"), ("ours", "float32"), ("transformers", "bfloat16"),
         ("ours", "bfloat16")]


def save_checkpoint(path, args):
  """A random Qwen2 checkpoint whose weights are large enough that greedy choices have margins.

  With transformers' default init (std 0.02) the logits are nearly flat, so float32 rounding
  differences between two correct implementations would flip argmaxes and hide real mismatches.
  """
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.manual_seed(0)
  heads = args.hidden // args.head_dim
  config = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=heads // args.gqa,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       eos_token_id=None, pad_token_id=0, bos_token_id=None)
  model = Qwen2ForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      elif p.ndim == 2:
        p.normal_(0.0, 2.0 / p.shape[-1] ** 0.5)
      else:
        p.normal_(0.0, 0.1)
  model.save_pretrained(path)
  return sum(p.numel() for p in model.parameters())


def make_prompts(args):
  """Token-id prompts of varied lengths; the longest has exactly --prompt-length tokens."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.prompt_length // 2, args.prompt_length + 1, args.batch)
  lengths[0] = args.prompt_length
  return [rng.integers(1, args.vocab, n).tolist() for n in lengths]


def usable_cpus():
  """os.cpu_count(), unless the process is pinned to fewer (e.g. by taskset)."""
  return len(os.sched_getaffinity(0))


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB.


# ---- Workers: one (side, dtype) each, driven over stdin/stdout ------------------------------------


def transformers_generator(args, prompts, dtype):
  import torch
  from transformers import AutoModelForCausalLM
  torch.set_num_threads(usable_cpus())
  model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=getattr(torch, dtype)).eval()
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for row, prompt in enumerate(prompts):  # Left padding, as transformers expects for generation.
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1

  def generate():
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                           do_sample=False, eos_token_id=args.vocab, pad_token_id=0)
    tokens = out[:, width:].numpy()
    return tokens, [tokens.shape[1]] * tokens.shape[0]  # No eos exists, so no row ends early.

  return generate


def ours_generator(args, prompts, dtype):
  import jax
  from sqlm_jax.rollout import sampling
  from sqlm_jax.models import load_pretrained
  config, params = load_pretrained(args.checkpoint, dtype=dtype, param_dtype=dtype)
  params = jax.device_put(params)
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[config.vocab_size])

  def generate():
    out = sampler(params, prompts, jax.random.key(0), max_new_tokens=args.new_tokens,
                  temperature=0.0)
    return out.tokens, out.lengths.tolist()

  return generate


def worker(args):
  """Loads one side, then answers `run` (one timed generation) until `finish`."""
  with open(args.prompts) as f:
    prompts = json.load(f)
  make = transformers_generator if args.side == "transformers" else ours_generator
  generate = make(args, prompts, args.dtype)
  reply = lambda kind, value: print(kind, json.dumps(value), flush=True)
  reply("READY", {"loaded_rss_mib": peak_rss_mib()})
  first = None
  for command in sys.stdin:
    if command.strip() == "finish":
      np.save(args.tokens_out, first)
      reply("DONE", {"peak_rss_mib": peak_rss_mib()})
      return
    start = time.perf_counter()
    tokens, lengths = generate()
    seconds = time.perf_counter() - start
    if first is None:
      first = tokens
    elif not np.array_equal(tokens, first):
      raise RuntimeError(f"{args.side} {args.dtype}: greedy generation is not deterministic")
    reply("TIME", {"seconds": seconds, "shape": list(tokens.shape), "min_length": min(lengths),
                   "max_length": max(lengths)})


class Worker:
  """The parent's handle on one worker process."""

  def __init__(self, side, dtype, args, files):
    self.side, self.dtype = side, dtype
    self.tokens_file = os.path.join(files["dir"], f"{side}-{dtype}.npy")
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--dtype", dtype,
               "--checkpoint", files["checkpoint"], "--prompts", files["prompts"],
               "--tokens-out", self.tokens_file, "--new-tokens", str(args.new_tokens),
               "--vocab", str(args.vocab)]
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
    self.times = []

  def ask(self, command, expect):
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self.read(expect)

  def read(self, expect):
    for line in self.process.stdout:
      kind, _, value = line.partition(" ")
      if kind == expect:
        return json.loads(value)
    raise RuntimeError(f"{self.side} {self.dtype} worker exited (code {self.process.wait()}) "
                       f"before answering {expect}; its stderr is above.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt-length", type=int, default=32, help="longest prompt; others vary")
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--vocab", type=int, default=16384)
  parser.add_argument("--hidden", type=int, default=384)
  parser.add_argument("--intermediate", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=6)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--gqa", type=int, default=3, help="query heads per kv head")
  parser.add_argument("--runs", type=int, default=5, help="timed rounds after the warm-up call")
  parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, short output")
  # Set by the parent when it starts a worker.
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--dtype", help=argparse.SUPPRESS)
  parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
  parser.add_argument("--prompts", help=argparse.SUPPRESS)
  parser.add_argument("--tokens-out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    return worker(args)
  if args.quick:
    args.batch, args.prompt_length, args.new_tokens, args.runs = 4, 12, 8, 2
    args.vocab, args.hidden, args.intermediate, args.layers, args.head_dim = 512, 64, 128, 2, 16

  with tempfile.TemporaryDirectory() as tmp:
    files = {"dir": tmp, "checkpoint": os.path.join(tmp, "checkpoint"),
             "prompts": os.path.join(tmp, "prompts.json")}
    num_params = save_checkpoint(files["checkpoint"], args)
    prompts = make_prompts(args)
    with open(files["prompts"], "w") as f:
      json.dump(prompts, f)
    lengths = [len(p) for p in prompts]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({usable_cpus()} usable here), "
          f"load average {os.getloadavg()[0]:.2f} at start; python {platform.python_version()}")
    print(f"model: Qwen2, {num_params / 1e6:.1f}M parameters: vocab {args.vocab}, hidden "
          f"{args.hidden}, mlp {args.intermediate}, {args.layers} layers, "
          f"{args.hidden // args.head_dim} heads / {args.hidden // args.head_dim // args.gqa} kv "
          f"heads of {args.head_dim}, untied head")
    print(f"workload: batch {args.batch}, prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(left-padded), greedy, {args.new_tokens} new tokens per row; torch threads = "
          f"{usable_cpus()}; one warm-up call per side, then {args.runs} interleaved rounds")

    workers = [Worker(side, dtype, args, files) for side, dtype in SIDES]
    loaded, first = {}, {}
    for w in workers:
      loaded[w] = w.read("READY")["loaded_rss_mib"]
    for w in workers:  # Warm-up (and, for ours, compilation) one side at a time.
      first[w] = w.ask("run", "TIME")["seconds"]
    for round_ in range(args.runs):
      for w in workers if round_ % 2 == 0 else workers[::-1]:
        reply = w.ask("run", "TIME")
        if reply["min_length"] != args.new_tokens or reply["shape"][1] != args.new_tokens:
          sys.exit(f"{w.side} {w.dtype}: rows generated {reply['min_length']}-"
                   f"{reply['max_length']} tokens, not {args.new_tokens}")
        w.times.append(reply["seconds"])
    peak = {w: w.ask("finish", "DONE")["peak_rss_mib"] for w in workers}
    tokens = {(w.side, w.dtype): np.load(w.tokens_file) for w in workers}
    for w in workers:
      w.process.wait()
    print(f"load average {os.getloadavg()[0]:.2f} at the end")

  rows = args.batch * args.new_tokens
  speed = {(w.side, w.dtype): rows / statistics.median(w.times) for w in workers}
  best = {(w.side, w.dtype): rows / min(w.times) for w in workers}
  print()
  for w in workers:
    runs = ", ".join(f"{t:.2f}" for t in w.times)
    shape = tokens[w.side, w.dtype].shape
    print(f"{w.side:>12} {w.dtype:>8}: first call {first[w]:6.2f} s; timed runs {runs} s; "
          f"generated {shape[0]} rows x {shape[1]} tokens")
  print()
  print(f"{'side':>12} {'dtype':>8} {'tokens/s':>9} {'best':>7} {'compile s':>9} "
        f"{'peak RSS MiB':>12} {'RSS growth MiB':>14}")
  for w in workers:
    key = (w.side, w.dtype)
    compile_s = f"{first[w] - statistics.median(w.times):9.2f}" if w.side == "ours" else f"{'-':>9}"
    print(f"{w.side:>12} {w.dtype:>8} {speed[key]:9.1f} {best[key]:7.1f} {compile_s} "
          f"{peak[w]:12.0f} {peak[w] - loaded[w]:14.0f}")
  print("tokens/s = batch x new tokens / median wall time of a generate call; best = the same "
        "over the fastest call.")
  print("compile s = our first call minus our median call (prefill and decode compilation).")
  print("peak RSS = ru_maxrss of the side's own process (interpreter, imports, weights, compiled "
        "code, generation); RSS growth = peak minus ru_maxrss right after loading the weights.")
  for dtype in ("float32", "bfloat16"):
    ratio = speed["ours", dtype] / speed["transformers", dtype]
    ratio_best = best["ours", dtype] / best["transformers", dtype]
    print(f"ours / transformers, {dtype}: {ratio:.2f}x (best calls: {ratio_best:.2f}x)")
  for dtype in ("float32", "bfloat16"):
    a, b = tokens["ours", dtype], tokens["transformers", dtype]
    same = (a == b).all(axis=1)
    print(f"greedy rows identical to transformers, {dtype}: {same.sum()}/{len(same)}; "
          f"tokens identical: {(a == b).mean():.1%}")


if __name__ == "__main__":
  main()
