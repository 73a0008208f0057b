"""Held-out accuracy of the solver: greedy and majority-of-N, on sets with ground truth.

Used every K steps by the self-play loop and standalone by `python -m sqlm_jax.evaluate`. The
held-out sets (sqlm_jax/evals/datasets.py) are generated from their own seed and never read by
training.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from sqlm_jax.reward import rewards
from sqlm_jax.evals.datasets import HELDOUT_SETS, load_heldout
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.tasks.base import Proposal, Task
from sqlm_jax.tasks.math_answers import answer_ids
from sqlm_jax.models.tokenizer import Tokenizer, encode_chat


def decode_rows(tokenizer: Tokenizer, out) -> list[str]:
  """The text of every completion row of a SampleOutput (up to its length)."""
  return [tokenizer.decode(row[:n]) for row, n in zip(out.tokens, out.lengths)]


def solve(params, sampler: Sampler, tokenizer: Tokenizer, task: Task, questions: Sequence[str],
          key: jax.Array, *, num_samples: int, temperature: float, max_new_tokens: int,
          batch_size: int, top_k: int = 0, top_p: float = 1.0) -> list[list[Optional[str]]]:
  """[Q][num_samples] canonical answers (None = no parseable answer)."""
  answers = []
  for start in range(0, len(questions), batch_size):
    chunk = questions[start:start + batch_size]
    prompts = [encode_chat(tokenizer, task.solver_messages(Proposal(q))) for q in chunk]
    out = sampler(params, prompts, jax.random.fold_in(key, start), max_new_tokens=max_new_tokens,
                  num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p)
    texts = decode_rows(tokenizer, out)
    answers += [[task.extract_answer(t) for t in texts[i:i + num_samples]]
                for i in range(0, len(texts), num_samples)]
  return answers


def majority_answers(answers: Sequence[Sequence[Optional[str]]]) -> list[Optional[str]]:
  """The majority answer of each question, with rewards.majority_vote's tie rule."""
  ids = answer_ids(answers)
  majority_id, _, has_majority = jax.device_get(rewards.majority_vote(ids))
  return [row[list(id_row).index(m)] if ok else None
          for row, id_row, m, ok in zip(answers, ids, majority_id, has_majority)]


def evaluate(params, sampler: Sampler, tokenizer: Tokenizer, task: Task, examples: Sequence[dict],
             key: jax.Array, *, num_samples: int = 4, temperature: float = 1.0,
             max_new_tokens: int = 1024, batch_size: int = 64) -> dict[str, float]:
  """Greedy accuracy and majority-of-N accuracy on examples [{"question", "answer"}, ...].

  An example's answer is canonicalised with the task's own extraction, so "0.5" and "1/2"
  agree exactly as they do in the vote.
  """
  questions = [e["question"] for e in examples]
  truth = [canonical_truth(task, e["answer"]) for e in examples]
  greedy = solve(params, sampler, tokenizer, task, questions, key, num_samples=1, temperature=0.0,
                 max_new_tokens=max_new_tokens, batch_size=batch_size)
  metrics = {"greedy_accuracy": float(np.mean([a[0] == t for a, t in zip(greedy, truth)])),
             "num_examples": len(examples)}
  if num_samples > 1:
    sampled = solve(params, sampler, tokenizer, task, questions, jax.random.fold_in(key, 1),
                    num_samples=num_samples, temperature=temperature,
                    max_new_tokens=max_new_tokens, batch_size=max(1, batch_size // num_samples))
    majority = majority_answers(sampled)
    metrics["majority_accuracy"] = float(np.mean([m == t for m, t in zip(majority, truth)]))
    metrics["sample_accuracy"] = float(np.mean([[a == t for a in row]
                                                for row, t in zip(sampled, truth)]))
  return metrics


def canonical_truth(task: Task, answer) -> str:
  """A held-out answer in the same canonical form as the task's extracted answers."""
  if task.canonical_answer is not None:
    return task.canonical_answer(str(answer))
  return str(answer)


# ---- HumanEval (coding topics) ------------------------------------------------------------------

HUMANEVAL_PROMPT = """Complete the following Python function. Reply with the whole function \
(and any imports it needs) in a single ```python code block.

```python
{prompt}```"""


def evaluate_humaneval(params, sampler: Sampler, tokenizer: Tokenizer, task: Task,
                       problems: Sequence[dict], key: jax.Array, pool, *, num_samples: int = 1,
                       temperature: float = 1.0, max_new_tokens: int = 512,
                       batch_size: int = 64) -> dict[str, float]:
  """pass@1 (greedy) and pass@k (k = num_samples, sampled) of the solver, run in the sandbox."""
  from sqlm_jax.evals import humaneval

  def completions(n, temp, sample_key):
    out = []
    for start in range(0, len(problems), batch_size):
      chunk = problems[start:start + batch_size]
      prompts = [encode_chat(tokenizer, [{"role": "user", "content": HUMANEVAL_PROMPT.format(
          prompt=p["prompt"])}]) for p in chunk]
      result = sampler(params, prompts, jax.random.fold_in(sample_key, start),
                       max_new_tokens=max_new_tokens, num_samples=n, temperature=temp)
      texts = decode_rows(tokenizer, result)
      out += [[task.extract_answer(t) for t in texts[i:i + n]] for i in range(0, len(texts), n)]
    return out

  greedy = humaneval.score(problems, completions(1, 0.0, key), pool, ks=(1,))
  metrics = {"greedy_pass@1": greedy["pass@1"], "num_examples": len(problems)}
  if num_samples > 1:
    sampled = humaneval.score(problems, completions(num_samples, temperature,
                                                    jax.random.fold_in(key, 1)),
                              pool, ks=(1, num_samples))
    metrics.update({f"sampled_{name}": value for name, value in sampled.items()
                    if name.startswith("pass@")})
  return metrics


HELDOUT_NAMES = tuple(HELDOUT_SETS) + ("humaneval",)


def load_examples(name: str, num_examples: int = 0, data_dir: Optional[str] = None,
                  split: str = "test") -> list[dict]:
  """A held-out set by name: the tfds sets of sqlm_jax/evals/datasets.py, or HumanEval's problems."""
  if name == "humaneval":
    if split != "test":
      raise ValueError(f"humaneval has only a 'test' split, got split={split!r}")
    from sqlm_jax.evals import humaneval
    examples = humaneval.load_problems()
  else:
    examples = load_heldout(name, data_dir or None, split)
  return examples[:num_examples] if num_examples else examples


def run_heldout(eval_config, params, sampler: Sampler, tokenizer: Tokenizer, task: Task,
                examples: Sequence[dict], key: jax.Array, pool=None) -> dict[str, float]:
  """The evaluation the config asks for; metric names carry a "heldout/" prefix.

  `accuracy` is the headline number: greedy accuracy, or greedy pass@1 for HumanEval.
  """
  e = eval_config
  common = dict(num_samples=e.num_samples, temperature=e.temperature,
                max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
  if e.heldout == "humaneval":
    result = evaluate_humaneval(params, sampler, tokenizer, task, examples, key, pool, **common)
    result["greedy_accuracy"] = result["greedy_pass@1"]
  else:
    result = evaluate(params, sampler, tokenizer, task, examples, key, **common)
  return {f"heldout/{name}": value for name, value in result.items()}
