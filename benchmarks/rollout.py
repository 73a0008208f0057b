"""Rollout and update speed at real model shapes: prefill and decode tokens/s, the decode's share of
the memory-bandwidth floor, and the update's model-FLOPs utilisation.

  python benchmarks/rollout.py [--shapes 0.5b,3b] [--rows 64] [--prompt 128] [--new 256]
      [--dtype bfloat16] [--out results/rollout_<chip>.txt]

Random weights of a Qwen2.5-0.5B- or 3B-shaped model (nothing is downloaded), on one device,
decoded by the project's Sampler in the rollout layout and dtype (weights cast once, as a run
does), greedy with a stop id outside the vocabulary so every row writes exactly --new tokens.

- prefill tokens/s: prompt tokens of all rows / prefill time (the prompt's prefill is shared by
  its samples, as in a run: --samples rows per prompt);
- decode tokens/s: generated tokens / decode time;
- bandwidth floor: each decode step must read the weights once and the KV cache written so far;
  floor = (weight bytes + mean KV bytes) / the chip's memory bandwidth (table below), and the
  fraction reported is floor / measured step time (1.0 = at the roofline);
- update MFU: 6 x parameters x trained tokens / update time / the chip's peak bf16 FLOP/s, one
  donated optimizer step (AdamW) of rl.make_update_fn on --train-rows rows of --prompt + --new
  tokens. A model whose float32 weights and Adam states do not fit the host (3B on a 24 GiB
  CPU machine) is reported as skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Memory bandwidth (GB/s) and dense bf16 peak (TFLOP/s) per chip, from the vendors' data sheets.
CHIPS = {"TPU v4": (1200, 275), "TPU v5 lite": (819, 197), "TPU v5e": (819, 197),
         "TPU v5p": (2765, 459), "TPU v6 lite": (1640, 918), "TPU v6e": (1640, 918),
         "H100": (3350, 989), "H200": (4800, 989), "A100": (2039, 312)}
SHAPES = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16,
               num_kv_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}


def chip_figures():
  import jax
  kind = jax.devices()[0].device_kind
  for name, figures in CHIPS.items():
    if name.lower() in kind.lower():
      return kind, figures
  return kind, None


def timed(fn, repeats=2):
  fn()  # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def run_shape(name, args, out):
  import jax
  import jax.numpy as jnp

  from sqlm_jax import rl
  from sqlm_jax.loop import roles
  from sqlm_jax.scale import sharding
  from sqlm_jax.models import ModelConfig, transformer
  from sqlm_jax.rollout.sampling import Sampler
  kind, figures = chip_figures()
  config = ModelConfig(model_type="qwen2", qkv_bias=True, max_position_embeddings=8192,
                       dtype=args.dtype, param_dtype=args.dtype, rope_theta=1e6,
                       **SHAPES[name])
  n_params = config.num_params()
  params = jax.jit(lambda k: jax.tree.map(lambda p: p.astype(args.dtype),
                                          transformer.init_params(config, k)))(jax.random.key(0))
  stop = config.vocab_size  # Never sampled: every row writes exactly --new tokens.
  sampler = Sampler(config, pad_id=0, stop_ids=[stop])
  prompts = [list(np.random.RandomState(i).randint(1, 1000, args.prompt))
             for i in range(args.rows // args.samples)]
  kw = dict(max_new_tokens=args.new, num_samples=args.samples, temperature=0.0)
  total = timed(lambda: sampler(params, prompts, jax.random.key(0), **kw))
  prefill_only = timed(lambda: sampler(params, prompts, jax.random.key(0),
                                       **dict(kw, max_new_tokens=1)))
  decode = max(total - prefill_only, 1e-9)
  width = np.dtype(jnp.dtype(args.dtype)).itemsize
  weight_bytes = n_params * width
  kv_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * width
  mean_kv = args.rows * (args.prompt + args.new / 2) * kv_per_token
  step = decode / (args.new - 1)
  line = (f"{name}: {n_params / 1e9:.2f}B params, {args.dtype}, {args.rows} rows "
          f"({len(prompts)} prompts x {args.samples}), prompt {args.prompt}, new {args.new}\n"
          f"  prefill {len(prompts) * args.prompt / prefill_only:10.1f} prompt tokens/s "
          f"({prefill_only:.2f} s)\n"
          f"  decode  {args.rows * (args.new - 1) / decode:10.1f} tokens/s "
          f"({step * 1e3:.2f} ms per step)")
  if figures:
    floor = (weight_bytes + mean_kv) / (figures[0] * 1e9)
    line += f", bandwidth floor {floor * 1e3:.2f} ms: {floor / step:.2f} of the roofline"
  out.append(line)
  print(line, flush=True)

  host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  need = n_params * 4 * 5 / 2**30  # float32 weights, Adam's two moments, gradients, accumulator
  if jax.default_backend() == "cpu" and need > 0.8 * host_gib:
    out.append(f"  update  skipped: float32 weights and AdamW need ~{need:.0f} GiB, the host has "
               f"{host_gib:.0f} GiB")
    print(out[-1], flush=True)
    return
  train_config = config.replace(param_dtype="float32", remat=True)
  params = None  # Frees the decoding weights before the update allocates its own.
  train_params = jax.jit(lambda k: transformer.init_params(train_config, k))(jax.random.key(1))
  cfg = rl.default_config()
  optimizer = rl.make_optimizer(cfg)
  apply_fn = roles.apply_fn(train_config, sharding.default_layout(), cfg.logprob_chunk)
  update = rl.make_update_fn(apply_fn, optimizer, cfg, args.micro, sharding.default_layout())
  rows, length = args.train_rows, args.prompt + args.new
  batch = {"tokens": jnp.ones((rows, length), jnp.int32),
           "attention_mask": jnp.ones((rows, length), bool),
           "loss_mask": jnp.ones((rows, length), jnp.float32).at[:, :args.prompt].set(0),
           "old_logprobs": jnp.full((rows, length), -3.0, jnp.float32),
           "advantages": jnp.linspace(-1, 1, rows).astype(jnp.float32),
           "sample_weight": jnp.ones((rows,), jnp.float32)}
  state = [train_params, optimizer.init(train_params)]

  def step_once():
    state[0], state[1], metrics = update(state[0], state[1], batch)
    jax.block_until_ready(metrics["loss"])

  seconds = timed(step_once, repeats=1)
  flops = 6 * n_params * rows * length * (4 / 3)  # remat: the forward runs twice
  line = f"  update  {rows * length / seconds:10.1f} tokens/s ({seconds:.2f} s per step"
  if figures:
    line += f", MFU {flops / seconds / (figures[1] * 1e12):.3f}"
  out.append(line + ")")
  print(out[-1], flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="0.5b,3b")
  parser.add_argument("--rows", type=int, default=64)
  parser.add_argument("--samples", type=int, default=4)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--new", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--train-rows", type=int, default=8)
  parser.add_argument("--micro", type=int, default=4)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  import jax
  kind, figures = chip_figures()
  out = [f"python benchmarks/rollout.py {' '.join(sys.argv[1:])}",
         f"device: {kind} ({jax.default_backend()}), jax {jax.__version__}; chip table: "
         + (f"{figures[0]} GB/s, {figures[1]} TFLOP/s bf16" if figures else "none (no floor "
            "or MFU reported)")]
  if jax.default_backend() == "cpu":
    import subprocess
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    out.append(next((l.strip() for l in model.splitlines() if "Model name" in l), ""))
  print("\n".join(out), flush=True)
  for name in args.shapes.split(","):
    run_shape(name, args, out)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(out) + "\n")


if __name__ == "__main__":
  main()
