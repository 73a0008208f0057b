"""Real-size check on a GPU: logits parity, sampler throughput against transformers, RL step speed.

  python benchmarks/gpu_check.py [--layers 24] [--batch 64] [--new-tokens 256]

Builds a random Qwen2.5-0.5B-shaped checkpoint (nothing downloaded), then in one run:
  1. float32 logits of sqlm_jax vs transformers' PyTorch model on a left-padded batch;
  2. greedy generation tokens/s in bfloat16: our Sampler vs transformers' generate;
  3. one RL update (micro-batched GRPO loss + AdamW) in bfloat16 compute: time and tokens/s.
"""

import argparse
import functools
import tempfile
import time

import numpy as np


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument("--train-len", type=int, default=512)
  parser.add_argument("--micro", type=int, default=16)
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  import torch
  from transformers import AutoModelForCausalLM, Qwen2Config

  from sqlm_jax import rl
  from sqlm_jax.models import forward, load_pretrained
  from sqlm_jax.rollout.sampling import Sampler

  print("jax devices:", jax.devices(), "torch:", torch.__version__, torch.cuda.get_device_name())
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=args.layers, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                    eos_token_id=151645, pad_token_id=151643)
  torch.manual_seed(0)
  model = AutoModelForCausalLM.from_config(cfg)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" not in name:
        p.normal_(0, 0.02)
  path = tempfile.mkdtemp()
  model.save_pretrained(path)
  n_params = sum(p.numel() for p in model.parameters())
  print(f"model: Qwen2-shaped, {n_params / 1e6:.0f}M parameters, {args.layers} layers")

  # 1. Parity in float32.
  config, params = load_pretrained(path, dtype="float32", param_dtype="float32")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 150000, (4, 48))
  mask = np.ones_like(tokens)
  mask[1, :10] = 0
  mask[3, :40] = 0
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  model = model.cuda().float().eval()
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(tokens).cuda(), attention_mask=torch.tensor(mask).cuda(),
                position_ids=torch.tensor(positions).cuda()).logits.float().cpu().numpy()
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(forward(params, config, tokens, positions, mask))
  print(f"parity float32: max |logit diff| = {np.abs(ours - ref)[mask.astype(bool)].max():.2e} "
        f"(logit scale {np.abs(ref).max():.2f})")
  del params

  # 2. Greedy generation throughput, bfloat16 on both sides, all rows generate new_tokens.
  config16, params16 = load_pretrained(path, dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.device_put(params16)
  prompts = [list(rng.integers(0, 150000, rng.integers(args.prompt // 2, args.prompt + 1)))
             for _ in range(args.batch)]
  sampler = Sampler(config16, pad_id=151643, stop_ids=[151936 - 1])  # never produced greedily
  t0 = time.perf_counter()
  out = sampler(params16, prompts, jax.random.key(0), max_new_tokens=args.new_tokens,
                temperature=0.0)
  first = time.perf_counter() - t0
  times = []
  for i in range(3):
    t0 = time.perf_counter()
    out = sampler(params16, prompts, jax.random.key(i), max_new_tokens=args.new_tokens,
                  temperature=0.0)
    times.append(time.perf_counter() - t0)
  ours_tps = args.batch * args.new_tokens / np.median(times)
  print(f"sqlm_jax sampler bf16: {ours_tps:,.0f} tokens/s (median of 3; compile+first "
        f"{first:.1f}s; generated {int(out.lengths.min())}..{int(out.lengths.max())} tokens/row)")

  model = model.to(torch.bfloat16)
  width = max(len(p) for p in prompts)
  ids = torch.full((args.batch, width), 151643, dtype=torch.long)
  am = torch.zeros((args.batch, width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    am[i, width - len(p):] = 1
  ids, am = ids.cuda(), am.cuda()
  gen = functools.partial(model.generate, input_ids=ids, attention_mask=am,
                          max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                          do_sample=False, pad_token_id=151643)
  with torch.no_grad():
    gen()
    torch.cuda.synchronize()
    ttimes = []
    for _ in range(3):
      t0 = time.perf_counter()
      gen()
      torch.cuda.synchronize()
      ttimes.append(time.perf_counter() - t0)
  hf_tps = args.batch * args.new_tokens / np.median(ttimes)
  print(f"transformers generate bf16: {hf_tps:,.0f} tokens/s (median of 3)")
  print(f"ratio sqlm_jax / transformers: {ours_tps / hf_tps:.2f}x")
  del model
  torch.cuda.empty_cache()

  # 3. One RL update at real size.
  cfg_rl = rl.default_config()
  cfg_rl.learning_rate = 1e-6
  apply_fn = lambda p, t, pos, m: forward(p, config16, t, pos, m)
  _, params32 = load_pretrained(path, dtype="bfloat16", param_dtype="float32")
  config_train = config16.replace(param_dtype="float32", remat=True)
  apply_fn = lambda p, t, pos, m: forward(p, config_train, t, pos, m)
  optimizer = rl.make_optimizer(cfg_rl)
  params32 = jax.device_put(params32)
  opt_state = optimizer.init(params32)
  update = rl.make_update_fn(apply_fn, optimizer, cfg_rl, args.micro)
  b, t = args.train_batch, args.train_len
  batch = {"tokens": jnp.asarray(rng.integers(0, 150000, (b, t))),
           "attention_mask": jnp.ones((b, t), jnp.int32),
           "loss_mask": jnp.asarray((np.arange(t) >= t // 4)[None].repeat(b, 0), jnp.float32),
           "old_logprobs": jnp.full((b, t), -11.0), "advantages": jnp.asarray(rng.normal(size=b)),
           "sample_weight": jnp.ones((b,))}
  t0 = time.perf_counter()
  params32, opt_state, metrics = update(params32, opt_state, batch)
  jax.block_until_ready(params32)
  first = time.perf_counter() - t0
  steps = []
  for _ in range(3):
    t0 = time.perf_counter()
    params32, opt_state, metrics = update(params32, opt_state, batch)
    jax.block_until_ready(params32)
    steps.append(time.perf_counter() - t0)
  print(f"RL update: batch {b} x {t} tokens, micro-batch {args.micro}, remat: "
        f"{np.median(steps):.2f}s/update ({b * t / np.median(steps):,.0f} tokens/s; compile+first "
        f"{first:.1f}s; grad_norm {float(metrics['grad_norm']):.3f}, loss {float(metrics['loss']):.4f})")
  print("peak GPU memory (jax):", jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) / 2**30,
        "GiB")


if __name__ == "__main__":
  main()
