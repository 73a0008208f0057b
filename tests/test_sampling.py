"""The sampler: greedy parity with transformers, stopping, reproducibility, no recompiles."""

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sqlm_jax import sampling
from sqlm_jax.models import load_pretrained
from sqlm_jax.tokenizer import encode_chat, load_tokenizer
from tests import tiny

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [20]]


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
  _, config, params = loaded
  sampler = sampling.Sampler(config, pad_id=0, stop_ids=[1])
  sampler(params, PROMPTS, jax.random.key(0), max_new_tokens=5, num_samples=2)
  before = (sampler._prefill._cache_size(), sampler._decode._cache_size())
  for t, k, p in [(0.0, 0, 1.0), (0.3, 5, 0.9), (1.3, 1, 0.5), (1.0, 0, 0.95)]:
    sampler(params, PROMPTS, jax.random.key(1), max_new_tokens=5, num_samples=2, temperature=t,
            top_k=k, top_p=p)
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
