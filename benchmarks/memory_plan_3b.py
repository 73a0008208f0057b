"""The paper's configs on a Qwen2.5-3B-shaped model against the TPU VMs and GPU hosts people have.

  python benchmarks/memory_plan_3b.py [--configs arithmetic,algebra,coding] [--chips v5e-8,v4-8]
      [--out results/memory_plan_3b.txt]

Writes a Qwen2.5-3B-Instruct-shaped folder (its config.json, and the tests' small byte-level
tokenizer standing in for Qwen's: nothing is downloaded, no weights exist), then, per (config,
chip), runs `python -m sqlm_jax.main --dry_run` with that chip's device count as fake CPU
devices and `--config.mesh.device_memory_gib` set to its memory: the plan compiles the real
prefill, decode and update programs on abstract shapes and chooses rollout.rows_per_call. A
config that does not fit with its defaults is tried with the next settings of SETTINGS, in
order. Per-phase bytes come from XLA:CPU's analysis of the compiled programs: an accelerator's
compiler schedules differently, so treat them as a guide.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                 max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
                 rms_norm_eps=1e-6, torch_dtype="bfloat16", eos_token_id=151645,
                 bos_token_id=151643, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
CHIPS = {"v4-8": (4, 32), "v5e-8": (8, 16), "v6e-8": (8, 32), "v5p-8": (4, 95),
         "8xH100": (8, 80)}
# Tried in order until the plan fits: the defaults, then the knobs the plan names, cumulatively.
SETTINGS = [(), ("--config.rl.micro_batch_size=8",),
            ("--config.rl.micro_batch_size=8", "--config.model.param_dtype=bfloat16")]


def make_folder(path: str) -> str:
  from tests.tiny import save_word_tokenizer
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(QWEN25_3B, f, indent=2)
  save_word_tokenizer(path, 128)
  return path


def plan(folder: str, config: str, devices: int, memory_gib: float, extra=()) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", "--config", f"configs/{config}.py",
         f"--config.model.path={folder}", "--dry_run", f"--workdir={workdir}",
         f"--config.mesh.device_memory_gib={memory_gib}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(result.stderr[-3000:])
    return json.load(open(os.path.join(workdir, "memory_plan.json")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="arithmetic,algebra,coding")
  parser.add_argument("--chips", default=",".join(CHIPS))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  gib = lambda b: f"{b / 2**30:6.2f}"
  lines = ["config      chip     mesh (d x f x t)  settings beyond the config's        "
           "rows/call  params  optim  ref  rollout  kv     prefill  decode  train   peak   fits"]
  print(lines[0], flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    folder = make_folder(os.path.join(tmp, "qwen2.5-3b-shaped"))
    for config in args.configs.split(","):
      for chip in args.chips.split(","):
        devices, memory = CHIPS[chip]
        for extra in SETTINGS:
          p = plan(folder, config, devices, memory, extra)
          if p["fits"]:
            break
        b, ph, mesh = p["bytes_per_device"], p["phases"], p["mesh"]
        settings = " ".join(e.replace("--config.", "") for e in extra) or "(defaults)"
        lines.append(
            f"{config:<11} {chip:<8} {'%d x %d x %d' % tuple(mesh.values()):<17} {settings:<36}"
            f" {p['rows_per_call'] or 'all':>9} {gib(b['params'])} {gib(b['optimizer'])} "
            f"{gib(b['reference'])} {gib(b['rollout_copy'])} {gib(b['kv_cache'])} "
            f"{gib(ph['prefill'])} {gib(ph['decode'])} {gib(ph['train'])} "
            f"{gib(p['peak_bytes'])} {'yes' if p['fits'] else 'NO'}")
        print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
