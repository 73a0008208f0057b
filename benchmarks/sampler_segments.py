"""Segmented decoding against the sampler before it, side by side on the CPU in float32.

  python benchmarks/sampler_segments.py [--quick] [--baseline 9d0ee69] [--segments 4] [--batch 32]
      [--prompt-length 32] [--new-tokens 512 64] [--gqa 2] [--runs 7]

The sampler before segmented decoding (its prefill attends over the prompt and every answer
slot, and each decode step over the whole cache) is `git show <baseline>:sqlm_jax/rollout/sampling.py`
and `...models/transformer.py`, written to a temporary package and imported beside the current
one; both decode the same random Qwen2 checkpoint (benchmarks/sampler_throughput.py's, whose
weights give greedy choices margins) in one process, warmed up (compiled) first and then timed
in interleaved rounds (order reversed every other round), so load from other processes on a
shared machine falls on both alike.

Greedy, and the stop id is one past the vocabulary, so every row generates exactly
--new-tokens tokens (checked). Printed per answer length: tokens/s of both and their ratio,
whether their tokens are identical (and the largest log-prob difference), whether each
matches transformers' greedy `generate` in float32 row by row, and, sampling at temperature 1
with one key, whether both draw the same tokens.
"""

import argparse
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def load_throughput_module():
  """benchmarks/sampler_throughput.py (not a package), for its checkpoint and prompts."""
  spec = importlib.util.spec_from_file_location("sampler_throughput",
                                                os.path.join(HERE, "sampler_throughput.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def baseline_package(rev: str, folder: str):
  """Imports the sampler of commit `rev` as the package `baseline_sampler` (its sampling.py reads
  its own transformer.py; configs and sharding come from the current tree)."""
  show = lambda path: subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True,
                                     capture_output=True, text=True).stdout
  package = os.path.join(folder, "baseline_sampler")
  os.makedirs(package)
  open(os.path.join(package, "__init__.py"), "w").close()
  with open(os.path.join(package, "transformer.py"), "w") as f:
    f.write(show("sqlm_jax/models/transformer.py"))
  sampling = show("sqlm_jax/rollout/sampling.py")
  line = "from sqlm_jax.models import transformer\n"
  if line not in sampling:
    sys.exit(f"{rev}:sqlm_jax/rollout/sampling.py does not import the model as expected ({line!r}).")
  with open(os.path.join(package, "sampling.py"), "w") as f:
    f.write(sampling.replace(line, "from baseline_sampler import transformer\n"))
  sys.path.insert(0, folder)
  import baseline_sampler.sampling
  return baseline_sampler.sampling


def cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  except FileNotFoundError:
    return platform.processor() or "unknown"
  names = [line.split(":", 1)[1].strip() for line in out.splitlines()
           if line.startswith("Model name")]
  return names[0] if names else "unknown"


def transformers_greedy(checkpoint, prompts, new_tokens, vocab):
  """transformers' greedy `generate` in float32 on the left-padded batch, as in
  sampler_throughput.py; no eos exists, so every row generates new_tokens."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
  width = max(len(p) for p in prompts)
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros((len(prompts), width), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=vocab, pad_token_id=0)
  return out[:, width:].numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--baseline", default="9d0ee69",
                      help="commit whose sampler is the baseline (the last before segments)")
  parser.add_argument("--segments", type=int, default=None,
                      help="the most answer blocks per call (Sampler.decode_segments; its "
                      "default if not given)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt-length", type=int, default=32, help="longest prompt; others vary")
  parser.add_argument("--new-tokens", type=int, nargs="+", default=[512, 64])
  parser.add_argument("--vocab", type=int, default=4096)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--intermediate", type=int, default=768)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--gqa", type=int, default=2, help="query heads per kv head")
  parser.add_argument("--runs", type=int, default=7, help="timed rounds after the warm-up call")
  parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, short output")
  args = parser.parse_args()
  if args.quick:
    args.batch, args.prompt_length, args.new_tokens, args.runs = 4, 12, [160, 16], 1
    args.vocab, args.hidden, args.intermediate, args.layers, args.head_dim = 512, 64, 128, 2, 16

  import jax
  from sqlm_jax.rollout import sampling
  from sqlm_jax.models import load_pretrained
  throughput = load_throughput_module()
  with tempfile.TemporaryDirectory() as tmp:
    baseline = baseline_package(args.baseline, tmp)
    checkpoint = os.path.join(tmp, "checkpoint")
    num_params = throughput.save_checkpoint(checkpoint, args)
    prompts = throughput.make_prompts(args)
    config, params = load_pretrained(checkpoint, dtype="float32", param_dtype="float32")
    params = jax.device_put(params)
    stop = [config.vocab_size]  # Never produced: every row generates all its tokens.
    samplers = {"baseline": baseline.Sampler(config, pad_id=0, stop_ids=stop),
                "segments": sampling.Sampler(config, pad_id=0, stop_ids=stop, **(
                    {} if args.segments is None else {"decode_segments": args.segments}))}
    lengths = [len(p) for p in prompts]
    print(f"machine: {cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable here), load average "
          f"{os.getloadavg()[0]:.2f} at start; python {platform.python_version()}, "
          f"jax {jax.__version__}")
    print(f"model: Qwen2, {num_params / 1e6:.1f}M parameters: vocab {args.vocab}, hidden "
          f"{args.hidden}, mlp {args.intermediate}, {args.layers} layers, "
          f"{args.hidden // args.head_dim} heads / {args.hidden // args.head_dim // args.gqa} kv "
          f"heads of {args.head_dim}, untied head; float32")
    print(f"workload: batch {args.batch}, prompts of {min(lengths)}-{max(lengths)} tokens "
          f"(left-padded to {sampling.bucket(max(lengths))}), greedy, every row generating all "
          f"its new tokens; baseline = the sampler of commit {args.baseline}; one warm-up call "
          f"per side, then {args.runs} interleaved rounds")

    for new_tokens in args.new_tokens:
      call = lambda name, temperature=0.0, key=0: samplers[name](
          params, prompts, jax.random.key(key), max_new_tokens=new_tokens,
          temperature=temperature)
      blocks = sampling.cache_blocks(sampling.bucket(max(lengths)), new_tokens,
                                     samplers["segments"].decode_segments)
      first, times, outs = {}, {name: [] for name in samplers}, {}
      for name in samplers:
        start = time.perf_counter()
        outs[name] = call(name)
        first[name] = time.perf_counter() - start
      for round_ in range(args.runs):
        for name in (list(samplers) if round_ % 2 == 0 else list(samplers)[::-1]):
          start = time.perf_counter()
          out = call(name)
          times[name].append(time.perf_counter() - start)
          if out.lengths.min() != new_tokens or not np.array_equal(out.tokens, outs[name].tokens):
            sys.exit(f"{name}: rows generated {out.lengths.min()}-{out.lengths.max()} tokens, "
                     f"not {new_tokens}, or greedy decoding was not deterministic")
      reference = transformers_greedy(checkpoint, prompts, new_tokens, config.vocab_size)
      sampled = {name: call(name, temperature=1.0, key=1) for name in samplers}
      speed = {name: args.batch * new_tokens / statistics.median(times[name])
               for name in samplers}
      print(f"\n{new_tokens} new tokens; cache blocks {blocks} (the first holding the "
            f"prompt's {sampling.bucket(max(lengths))} slots), one decode loop each:")
      for name in samplers:
        same = (outs[name].tokens == reference).all(axis=1)
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"  {name:>9}: {speed[name]:8.1f} tokens/s (median of {runs} s; first call "
              f"{first[name]:.2f} s with compilation); greedy rows identical to transformers: "
              f"{same.sum()}/{len(same)}")
      a, b = outs["baseline"], outs["segments"]
      ratio = speed["segments"] / speed["baseline"]
      paired = [t0 / t1 for t0, t1 in zip(times["baseline"], times["segments"])]
      greedy_same = np.array_equal(a.tokens, b.tokens)
      sampled_same = np.array_equal(sampled["baseline"].tokens, sampled["segments"].tokens)
      same_sampled = (sampled["baseline"].tokens == sampled["segments"].tokens).mean()
      print(f"  segments / baseline: {statistics.median(paired):.2f}x tokens/s, the median of the "
            f"rounds' ratios ({', '.join(f'{r:.2f}' for r in paired)}); of the median calls "
            f"{ratio:.2f}x, of the best calls "
            f"{min(times['baseline']) / min(times['segments']):.2f}x")
      print(f"  greedy tokens identical: "
            f"{greedy_same} (log-probs differ by at most "
            f"{np.abs(a.logprobs - b.logprobs).max():.1e}); temperature-1 tokens identical: "
            f"{sampled_same} ({same_sampled:.1%})")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")
    print("tokens/s = batch x new tokens / median wall time of a sampler call (prefill, decode "
          "and the copy back to the host); a round times one call of each side, back to back, so "
          "its ratio compares the two under the same load.")


if __name__ == "__main__":
  main()
