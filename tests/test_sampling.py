"""The sampler: greedy parity with transformers, stopping, reproducibility, no recompiles,
chunked calls, segmented decoding and the lowering hook."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sqlm_jax.rollout import sampling
from sqlm_jax.models import load_pretrained
from sqlm_jax.models.tokenizer import encode_chat, load_tokenizer
from tests import tiny

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20]]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen3"])
def loaded(request, tmp_path_factory):
  path = tiny.save_random_checkpoint(tmp_path_factory.mktemp(request.param), request.param,
                                     with_tokenizer=False)
  config, params = load_pretrained(path)
  return path, config, params


def test_greedy_matches_transformers_generate(loaded):
  path, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  out = sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=10, temperature=0.0)
  model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  for row, prompt in enumerate(PROMPTS):  # One prompt at a time: no padding on the torch side.
    with torch.no_grad():
      ref = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                           eos_token_id=1, pad_token_id=0)[0, len(prompt):].numpy()
    n = out.lengths[row]
    np.testing.assert_array_equal(out.tokens[row, :n], ref[:n])
    assert n == len(ref) or ref[n - 1] == 1


def test_stops_at_stop_token_and_pads_after(loaded):
  _, config, params = loaded
  probe = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  free = probe(params, PROMPTS, jax.random.key(3), max_new_tokens=12, temperature=1.0)
  stop = int(free.tokens[0, 2])  # Make the third token of row 0 a stop token.
  out = sampling.Sampler(config, pad_id=0, stop_ids=[stop])(
      params, PROMPTS, jax.random.key(3), max_new_tokens=12, temperature=1.0)
  assert out.lengths[0] <= 3 and out.tokens[0, out.lengths[0] - 1] == stop
  assert (out.tokens[0, out.lengths[0]:] == 0).all() and (out.logprobs[0, out.lengths[0]:] == 0).all()
  assert (out.lengths <= 12).all()


def test_reproducible_for_a_key_and_different_across_keys(loaded):
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  a = sampler(params, PROMPTS, jax.random.key(7), max_new_tokens=8, num_samples=3)
  b = sampler(params, PROMPTS, jax.random.key(7), max_new_tokens=8, num_samples=3)
  c = sampler(params, PROMPTS, jax.random.key(8), max_new_tokens=8, num_samples=3)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert not np.array_equal(a.tokens, c.tokens)
  assert a.tokens.shape == (len(PROMPTS) * 3, 8)


def test_num_samples_share_prefill_and_match_single_prompt_logprobs(loaded):
  """Greedy with N samples gives N identical copies of the single-sample completion."""
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  one = sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=6, temperature=0.0)
  many = sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=6, temperature=0.0,
                 num_samples=4)
  np.testing.assert_array_equal(np.repeat(one.tokens, 4, axis=0), many.tokens)
  np.testing.assert_allclose(np.repeat(one.logprobs, 4, axis=0), many.logprobs, atol=1e-5)


def test_logprobs_are_those_of_the_sampling_distribution(loaded):
  """Sampled-token log-probs equal log_softmax(logits / T) of a full forward at that position."""
  from sqlm_jax.models import forward
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  temperature = 0.7
  out = sampler(params, PROMPTS[:2], jax.random.key(1), max_new_tokens=5, temperature=temperature)
  for row, prompt in enumerate(PROMPTS[:2]):
    seq = np.array([prompt + list(out.tokens[row, :out.lengths[row]])])
    mask = np.ones_like(seq)
    logits = np.asarray(forward(params, config, seq, np.arange(seq.shape[1])[None], mask))[0]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    expected = [logp[len(prompt) - 1 + t, seq[0, len(prompt) + t]] for t in range(out.lengths[row])]
    np.testing.assert_allclose(out.logprobs[row, :out.lengths[row]], expected, atol=1e-4)


def test_top_k_one_and_tiny_top_p_are_greedy(loaded):
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  greedy = sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=6, temperature=0.0)
  top1 = sampler(params, PROMPTS, jax.random.key(5), max_new_tokens=6, temperature=1.0, top_k=1)
  nucleus = sampler(params, PROMPTS, jax.random.key(5), max_new_tokens=6, temperature=1.0,
                    top_p=1e-6)
  np.testing.assert_array_equal(greedy.tokens, top1.tokens)
  np.testing.assert_array_equal(greedy.tokens, nucleus.tokens)
  np.testing.assert_allclose(top1.logprobs[top1.tokens != 0], 0.0, atol=1e-6)


def test_filter_logits_keeps_top_k_and_nucleus():
  logits = jax.numpy.log(jax.numpy.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda k, p: np.isfinite(np.asarray(sampling.filter_logits(logits, k, p)))[0].tolist()
  assert kept(2, 1.0) == [True, True, False, False, False]
  assert kept(0, 0.6) == [True, True, False, False, False]  # 0.5 < 0.6, 0.5 + 0.2 >= 0.6
  assert kept(0, 0.5) == [True, False, False, False, False]
  assert kept(0, 1.0) == [True] * 5
  assert kept(3, 0.99) == [True, True, True, False, False]


def test_changing_temperature_top_k_top_p_does_not_recompile(loaded):
  """Nor does first_row (a chunk's place in a bigger call): its noise is drawn for the call's
  own rows at a traced offset, with no static size that grows with it."""
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=5, num_samples=2)
  before = (sampler._prefill._cache_size(), sampler._decode._cache_size())
  assert before == (1, 1)
  for t, k, p, first_row in [(0.0, 0, 1.0, 0), (0.3, 5, 0.9, 3), (1.3, 1, 0.5, 1000),
                             (1.0, 0, 0.95, 2 ** 20), (1.0, 0, 1.0, 2 ** 31 - 1)]:
    sampler(params, PROMPTS, jax.random.key(1), max_new_tokens=5, num_samples=2, temperature=t,
            top_k=k, top_p=p, first_row=first_row)
  # Prompts of other lengths in the same bucket, and fewer prompts in the same batch bucket.
  sampler(params, [[3, 4], [5, 6, 7], [8]], jax.random.key(2), max_new_tokens=5, num_samples=2)
  assert (sampler._prefill._cache_size(), sampler._decode._cache_size()) == before


def test_sampler_with_tokenizer_from_the_same_folder(qwen2_dir):
  config, params = load_pretrained(qwen2_dir)
  tokenizer = load_tokenizer(qwen2_dir)
  prompt = encode_chat(tokenizer, [{"role": "user", "content": "What is 2+3?"}])
  sampler = sampling.Sampler(config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
  out = sampler(params, [prompt], jax.random.key(0), max_new_tokens=8, num_samples=2)
  text = tokenizer.decode(out.tokens[0, :out.lengths[0]])
  assert isinstance(text, str) and out.tokens.shape == (2, 8)


def test_bucket():
  assert [sampling.bucket(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  assert sampling.bucket(3, minimum=1) == 4


# ---- Chunked calls, segmented decoding and the lowering hook (used by sqlm_jax/rollout/decoding.py) ----


def test_rollout_noise_is_jax_gumbel_at_any_first_row():
  """gumbel_rows draws rows first_row.. of jax.random.gumbel(key, (R, V)) for any R, and first
  row 0 samples exactly what jax.random.categorical does (bit for bit)."""
  key = jax.random.fold_in(jax.random.key(3), 7)
  for rows_total, vocab, first, rows in [(8, 128, 0, 8), (64, 1000, 13, 7), (5, 151936, 2, 3)]:
    expected = jax.random.gumbel(key, (rows_total, vocab))[first:first + rows]
    got = jax.jit(sampling.gumbel_rows, static_argnums=(2, 3))(key, first, rows, vocab)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  logits = 3.0 * jax.random.normal(jax.random.key(1), (16, 1000))
  for temperature in (1.0, 0.7):
    token, _ = sampling.sample_token(logits, key, temperature, 0, 1.0)
    want = jax.random.categorical(key, logits / temperature)
    np.testing.assert_array_equal(np.asarray(token), np.asarray(want))
  # The 64-bit index of row * vocab past 2**32: (40000 * 151936) has a high word.
  high, low = sampling._times_wide(jax.numpy.uint32(40000), 151936)
  assert int(high) * 2 ** 32 + int(low) == 40000 * 151936 and int(high) > 0


def test_rollout_noise_costs_the_calls_rows_only():
  """The draws of a call far into a big one (first_row traced) need no more temporary memory
  than jax.random.categorical over the call's own rows: nothing of R x V is materialised."""
  rows, vocab = 8, 8192
  logits = jax.ShapeDtypeStruct((rows, vocab), jax.numpy.float32)
  key = jax.random.key(0)
  ours = jax.jit(lambda l, k, f: sampling.sample_token(l, k, 1.0, 0, 1.0, f)[0]).lower(
      logits, key, np.int32(1 << 20)).compile().memory_analysis().temp_size_in_bytes
  plain = jax.jit(lambda l, k: jax.random.categorical(k, l)).lower(
      logits, key).compile().memory_analysis().temp_size_in_bytes
  assert ours <= plain + rows * vocab * 4, (ours, plain)


def test_rollout_chunked_calls_sample_the_rows_of_one_call(qwen2_dir):
  """Prompt groups and one prompt's samples split, each call with its first_row: the tokens of
  one call, and its log-probs up to float rounding (XLA:CPU's matmuls round a row differently
  in a batch of another size)."""
  config, params = load_pretrained(qwen2_dir)
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  kwargs = dict(max_new_tokens=10, temperature=1.0, prompt_length=16)
  whole = sampler(params, PROMPTS, jax.random.key(4), num_samples=4, **kwargs)
  groups = [sampler(params, PROMPTS[i:i + 2], jax.random.key(4), num_samples=4, first_row=4 * i,
                    **kwargs) for i in (0, 2)]
  split = [sampler(params, [PROMPTS[1]], jax.random.key(4), num_samples=2, first_row=4 + s,
                   **kwargs) for s in (0, 2)]
  for outs, rows in [(groups, slice(0, 16)), (split, slice(4, 8))]:
    np.testing.assert_array_equal(np.concatenate([o.tokens for o in outs]), whole.tokens[rows])
    np.testing.assert_array_equal(np.concatenate([o.lengths for o in outs]), whole.lengths[rows])
    np.testing.assert_allclose(np.concatenate([o.logprobs for o in outs]), whole.logprobs[rows],
                               atol=1e-4)
  # Rows really draw their own noise: the samples of a prompt differ, and a shifted first_row
  # samples other tokens.
  assert len({tuple(t) for t in whole.tokens[4:8]}) > 1
  shifted = sampler(params, PROMPTS, jax.random.key(4), num_samples=4, first_row=1, **kwargs)
  assert not np.array_equal(shifted.tokens, whole.tokens)


@pytest.mark.slow  # Five cache layouts compiled: CI's slow step.
def test_rollout_segmented_decoding_matches_one_block(qwen2_dir):
  """Answers of 256 tokens in four blocks (four decode loops) give the tokens, lengths and
  log-probs of one loop over one block, rows stopping in different blocks."""
  config, params = load_pretrained(qwen2_dir)
  assert sampling.cache_blocks(16, 256, 4) == (16 + 64, 64, 64, 64)
  assert sampling.cache_blocks(16, 64, 4) == (16 + 64,)  # One block: one loop.
  segments = sampling.Sampler(config, pad_id=0, stop_ids=[1, 2, 3])
  one = sampling.Sampler(config, pad_id=0, stop_ids=[1, 2, 3], decode_segments=1)
  for temperature, samples in [(0.0, 1), (1.0, 3)]:
    a = segments(params, PROMPTS, jax.random.key(5), max_new_tokens=256, num_samples=samples,
                 temperature=temperature)
    b = one(params, PROMPTS, jax.random.key(5), max_new_tokens=256, num_samples=samples,
            temperature=temperature)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
  assert (a.lengths < 64).any() and (a.lengths > 64).any()  # Stops in the first block and later.


def test_rollout_prefill_and_decode_attend_over_written_slots_only(qwen2_dir, monkeypatch):
  """Prefill attends over the prompt's 16 slots, and each decode loop over the prompt and the
  answer blocks up to its own (16 + 64, ..., 16 + 256), not over all 16 + 256 slots."""
  from sqlm_jax.models import transformer
  config, params = load_pretrained(qwen2_dir)
  attended = set()
  attend = transformer._attend

  def spy(q, keys, values, key_mask, dtype):
    attended.add((q.shape[1], sum(k.shape[2] for k in keys)))
    return attend(q, keys, values, key_mask, dtype)

  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  monkeypatch.setattr(transformer, "_attend", spy)  # Traced from here: prefill and decode.
  sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=256, temperature=0.0)
  assert attended == {(16, 16), (1, 80), (1, 144), (1, 208), (1, 272)}


def test_rollout_lowering_on_8_devices_has_no_gathers_in_the_decode_loops():
  """Sampler.lower on 8 fake CPU devices (a subprocess, as tests/mesh/ runs): see
  `check_lowering_on_8_devices`."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  code = "from tests.test_sampling import check_lowering_on_8_devices as c; c()"
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert "checked 2 layouts" in result.stdout


def _loop_computations(hlo: str) -> tuple[int, list[str]]:
  """(the number of while loops the HLO module's entry runs, the text of every computation
  their bodies run: the bodies and all they call, branch to or fuse, nested loops included)."""
  computations = {}
  for block in re.split(r"\n(?=\S)", hlo):
    name = re.match(r"(?:ENTRY )?%?([\w.\-]+) ", block)
    if name:
      computations[name.group(1)] = block
  entry = next(b for b in computations.values() if b.startswith("ENTRY"))
  loops = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", entry)
  seen, todo = set(), list(loops)
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    refs = re.findall(r"(?:calls|to_apply|body|condition|true_computation|false_computation)="
                      r"%?([\w.\-]+)", computations[name])
    for branches in re.findall(r"branch_computations=\{([^}]*)\}", computations[name]):
      refs += [b.strip().lstrip("%") for b in branches.split(",")]
    todo += refs
  return len(loops), [computations[name] for name in seen]


def check_lowering_on_8_devices():
  """The memory plan's use of Sampler.lower: abstract per-layer params replicated over a
  (data=8, fsdp=1, tensor=1) mesh, rows split; every program compiles and has a memory
  analysis, the decode program runs one loop per cache block, and nothing those loops run
  all-gathers. On an FSDP mesh (1, 8, 1) the loops do gather the weights (so the check sees
  all-gathers where there are some)."""
  from sqlm_jax.scale import sharding
  from sqlm_jax.models import transformer
  from sqlm_jax.models.config import ModelConfig
  assert jax.device_count() == 8
  config = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
  for mesh, per_layer in [((8, 1, 1), True), ((1, 8, 1), False)]:
    layout = sharding.Layout(sharding.make_mesh(*mesh))
    shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
    if per_layer:
      shapes = jax.eval_shape(lambda p: transformer.split_layers(p, config.num_layers), shapes)
    shardings = sharding.param_shardings(layout, config, per_layer=per_layer)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    sampler = sampling.Sampler(config, 0, [1], layout=layout, per_layer_params=per_layer)
    lowered = sampler.lower(params, num_prompts=16, prompt_length=16, max_new_tokens=256,
                            num_samples=4)
    assert sorted(lowered) == ["decode", "prefill"], sorted(lowered)
    texts = {}
    for name, program in lowered.items():
      compiled = program.compile()
      assert compiled.memory_analysis().temp_size_in_bytes > 0
      texts[name] = compiled.as_text()
    loops, computations = _loop_computations(texts["decode"])
    assert loops == len(sampling.cache_blocks(16, 256, 4)) == 4, f"{loops} decode loops"
    gathers = [c.split("\n")[0][:80] for c in computations if "all-gather" in c]
    if per_layer:
      assert not gathers, f"decode loop computations that all-gather: {gathers}"
    else:
      assert gathers, "FSDP-sharded weights, yet no decode loop all-gathers them"
  print("checked 2 layouts")
