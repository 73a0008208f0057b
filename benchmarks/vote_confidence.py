"""Which label-free signal tells a right majority from a wrong one? The tiny base, N = 8.

  python benchmarks/vote_confidence.py [--questions 512] [--model DIR]

Samples N answers at the tiny config's temperature for addition questions with 3- and 4-digit
operands (where the base's votes split), and scores each signal by how well it ranks the
questions whose majority is right above those whose majority is wrong (AUC; 0.5 = no
information): k, the vote margin (rewards.vote_margin), split-half agreement
(rewards.split_half_agreement), agreement of the greedy answer with the majority (one extra
decode per question), and agreement of the majority with the majority of the question re-asked
with its operands swapped ("b+a" for "a+b": a paraphrase with the same answer; N extra
samples). Then P(majority right) among the questions the sqlm band (1 < k < N)
pays, for each minimum margin, and the share of those questions each keeps. The truth is read
only here, to judge the signals.
"""

import argparse
import random

import jax
import numpy as np

from sqlm_jax.evals import evaluation
from sqlm_jax.reward import rewards
from sqlm_jax.config_base import load_config
from sqlm_jax.models import load_pretrained
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.tasks import tiny_addition
from sqlm_jax.tasks.math_answers import answer_ids
from sqlm_jax.models.tokenizer import load_tokenizer


def auc(score, right):
  """P(score of a right-majority question > a wrong one's), ties counting one half."""
  score = np.asarray(score, float)
  pos, neg = score[right], score[~right]
  if not len(pos) or not len(neg):
    return float("nan")
  return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--questions", type=int, default=512)
  parser.add_argument("--model", default="", help="checkpoint folder (default: the tiny base)")
  args = parser.parse_args()
  c = load_config("tiny")
  path = args.model or c.model.path
  model_config, params = load_pretrained(path, dtype="float32")
  tokenizer = load_tokenizer(path)
  task = tiny_addition.TASK
  sampler = Sampler(model_config, pad_id=tokenizer.pad_id, stop_ids=tokenizer.stop_ids)
  rng = random.Random(123)
  questions = [tiny_addition.parse_proposal(tiny_addition.format_question(
      rng.randrange(100, 10**4), rng.randrange(100, 10**4))) for _ in range(args.questions)]
  texts = [p.question for p in questions]
  n = c.rollout.answers_per_question
  sampled = evaluation.solve(params, sampler, tokenizer, task, texts, jax.random.key(0),
                             num_samples=n, temperature=c.rollout.temperature,
                             max_new_tokens=c.rollout.max_answer_tokens, batch_size=64)
  greedy = evaluation.solve(params, sampler, tokenizer, task, texts, jax.random.key(1),
                            num_samples=1, temperature=0.0,
                            max_new_tokens=c.rollout.max_answer_tokens, batch_size=512)
  swapped_texts = [task.paraphrase(p).question for p in questions]
  swapped = evaluation.solve(params, sampler, tokenizer, task, swapped_texts, jax.random.key(2),
                             num_samples=n, temperature=c.rollout.temperature,
                             max_new_tokens=c.rollout.max_answer_tokens, batch_size=64)
  ids = answer_ids(sampled)
  majority = evaluation.majority_answers(sampled)
  right = np.array([m is not None and m == task.true_answer(p)
                    for m, p in zip(majority, questions)])
  k = np.asarray(rewards.majority_vote(ids)[1])
  margin = np.asarray(rewards.vote_margin(ids))
  signals = {"k": k, "margin": margin,
             "split_half": np.asarray(rewards.split_half_agreement(ids)),
             "greedy_agrees": np.array([g[0] is not None and g[0] == m
                                        for g, m in zip(greedy, majority)]),
             "swap_agrees": np.array([m is not None and m == s for m, s in
                                      zip(majority, evaluation.majority_answers(swapped))])}
  band = (k > 1) & (k < n)
  print(f"{args.questions} questions, N = {n}, T = {c.rollout.temperature}: majority right "
        f"{right.mean():.3f}; in the band 1 < k < N: {band.mean():.3f}")
  for name, score in signals.items():
    print(f"AUC {name:14s} all {auc(score, right):.3f}  in the band {auc(score[band], right[band]):.3f}")
  print("k: questions, P(majority right)")
  for v in range(n + 1):
    if (k == v).any():
      print(f"  k={v}: {(k == v).sum():4d}  {right[k == v].mean():.3f}")
  print("in the band, margin >= m: share of the band kept, P(majority right)")
  for m in range(6):
    kept = band & (margin >= m)
    print(f"  m={m}: {kept.sum() / max(band.sum(), 1):.2f}  {right[kept].mean():.3f}")
  for name in ("split_half", "greedy_agrees", "swap_agrees"):
    kept = band & signals[name]
    print(f"  band and {name}: {kept.sum() / max(band.sum(), 1):.2f}  {right[kept].mean():.3f}")
  unanimous = k == n  # Out of the band: no margin tells a wrong unanimous vote from a right one.
  kept = unanimous & signals["swap_agrees"]
  print(f"unanimous (k = N): {unanimous.sum()} questions, P(majority right) "
        f"{right[unanimous].mean():.3f}; those whose swap agrees: "
        f"{kept.sum() / max(unanimous.sum(), 1):.2f} kept, {right[kept].mean():.3f}")


if __name__ == "__main__":
  main()
