"""Per-device memory plans of the paper's configs on a Qwen2.5-3B-shaped model, on several meshes.

  python benchmarks/memory_plan_3b.py [--configs arithmetic,coding] [--out results/memory_plan_3b.txt]

Writes a Qwen2.5-3B-Instruct-shaped folder (its config.json, and the tests' small byte-level
tokenizer standing in for Qwen's: nothing is downloaded, no weights exist), then runs
`python -m sqlm_jax.main --dry_run` once per (config, device count, mesh) with that many fake
CPU devices, and tabulates each plan against the chips' memory: TPU v4-8 (4 chips x 32 GiB),
v5e-8 (8 x 16 GiB), v5p-8 (4 x 95 GiB) and 8 x H100 (80 GiB). Activations come from the
compiled train step's memory analysis (XLA:CPU); an accelerator's compiler schedules
differently, so treat that column as a guide.
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
CHIPS = {"v4-8": (4, 32), "v5e-8": (8, 16), "v5p-8": (4, 95), "8xH100": (8, 80)}
MESHES = {4: [(1, 4, 1), (4, 1, 1), (1, 2, 2)],
          8: [(1, 8, 1), (8, 1, 1), (2, 4, 1), (1, 4, 2)]}


def make_folder(path: str) -> str:
  from tests.tiny import save_word_tokenizer
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(QWEN25_3B, f, indent=2)
  save_word_tokenizer(path, 128)
  return path


def plan(folder: str, config: str, devices: int, mesh, extra=()) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    data, fsdp, tensor = mesh
    result = subprocess.run(
        [sys.executable, "-m", "sqlm_jax.main", "--config", f"configs/{config}.py",
         f"--config.model.path={folder}", "--dry_run", f"--workdir={workdir}",
         f"--config.mesh.data={data}", f"--config.mesh.fsdp={fsdp}",
         f"--config.mesh.tensor={tensor}", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(result.stderr[-3000:])
    return json.load(open(os.path.join(workdir, "memory_plan.json")))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default="arithmetic,coding")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  gib = lambda b: b / 2**30
  lines = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = make_folder(os.path.join(tmp, "qwen2.5-3b-shaped"))
    for config in args.configs.split(","):
      lines.append(f"\nconfigs/{config}.py on Qwen2.5-3B (3.09B parameters), GiB per device:")
      lines.append("devices  mesh (data x fsdp x tensor)  params  optimizer  reference  "
                   "kv_cache  activations   total   fits on")
      for devices, meshes in MESHES.items():
        for mesh in meshes:
          p = plan(folder, config, devices, mesh)
          b = p["bytes_per_device"]
          fits = [chip for chip, (n, mem) in CHIPS.items()
                  if n == devices and gib(b["total"]) <= mem]
          lines.append(f"{devices:>7}  {'%d x %d x %d' % mesh:<28} {gib(b['params']):6.2f}  "
                       f"{gib(b['optimizer']):9.2f}  {gib(b['reference']):9.2f}  "
                       f"{gib(b['kv_cache']):8.2f}  {gib(b['activations']):11.2f}  "
                       f"{gib(b['total']):6.2f}   {', '.join(fits) or '-'}")
          print(lines[-1], flush=True)
  text = "\n".join(lines) + "\n"
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
