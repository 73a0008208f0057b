"""Pretrains the tiny char model that stands in for a base LM on a tiny topic.

  python -m sqlm_jax.pretrain_tiny --out runs/tiny_base [--task tiny_arithmetic]

A bundled base (sqlm_jax/assets/<task>) keeps the arguments and dev metrics of the run that
made it in its pretrain_summary.json: `argv` there, plus `--out DIR`, remakes it.

Self-play needs a base that already knows the format and is mediocre at the target skill,
the way an instruct model is at 3-digit multiplication. The corpus is generated here from a
fixed seed and stands in for that prior knowledge:
  - answered problems whose larger number has 1 to 3 digits ("4300+5000=93000" is 34 + 5;
    tiny_arithmetic draws the operation uniformly too),
  - a few answered 4-digit problems (`--four_digit_fraction`), so that the base is mediocre
    at 4 digits (the held-out set, the task's HELDOUT) rather than at 0 or 100 %,
  - unanswered questions after the proposer marker ("?4321+8765"), 1 to 4 digits, so that
    the base can propose.
`--same_size_fraction` and `--question_digits` shape both kinds further. No held-out or dev
problem, nor its paraphrase (tiny addition: b + a), is ever in the corpus; the dev set (the
held-out set's "validation" split, disjoint from its "test" split) is what corpora and steps
are chosen on. The learning rate decays to zero, so
the base is settled: at a constant rate, 4-digit accuracy swings by tens of points between
neighbouring evaluations, and a self-play gain would be hard to tell from that noise.

`--stop_at_dev LO,HI` stops at the first evaluation (every `--eval_every` steps) whose dev
greedy accuracy is in [LO, HI] and keeps that point's weights, e.g. a weak base:
  python -m sqlm_jax.pretrain_tiny --out runs/weak_base --eval_every 10 --stop_at_dev 0.35,0.45
A stopped run is the same run cut short.

When the jump happens is chaotic: the last bit of a float sum moves it by hundreds of steps, so
the same command on another CPU can give a base 30 points better or worse at a fixed step
(tiny_arithmetic, 1,200 steps: 0.21 on one CPU, 0.29 on another, 0.57 with SSE-only code).
`--decay_at_dev ACC` ties the schedule to the jump instead of the step: the decay
(`--decay_steps` long) starts after the first evaluation with dev greedy >= ACC, at the latest
`--decay_steps` before `--steps`. With a `--stop_at_dev` band 3 points wide it gives a base in
that band on any CPU: sqlm_jax/assets/tiny_arithmetic is made so.
A run is deterministic: the corpus comes from Python's `random` seeded by --seed (answered
problems and questions from two streams), the weights and evaluation samples from jax keys of
--seed, and nothing depends on hash or dict order; the same command on the same machine writes
the same bytes.

Writes a Hugging Face checkpoint (config.json, model.safetensors), char_tokenizer.json and
pretrain_summary.json (the arguments and the dev metrics) into --out.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import random
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sqlm_jax.evals import datasets
from sqlm_jax.models import ModelConfig, forward, init_params, save_pretrained
from sqlm_jax.rollout.sampling import Sampler
from sqlm_jax.tasks import tiny_addition, tiny_arithmetic
from sqlm_jax.models.tokenizer import CharTokenizer

# Topics a tiny base can be pretrained on: their modules give the format (CHARS, markers,
# sample_question, format_answer), the Task and the held-out set (HELDOUT).
TOPICS = {"tiny_addition": tiny_addition, "tiny_arithmetic": tiny_arithmetic}


def topic_module(name: str):
  if name not in TOPICS:
    raise ValueError(f"--task {name!r} has no tiny base; choose one of {', '.join(TOPICS)}.")
  return TOPICS[name]


def package_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("sqlm_jax")
  except metadata.PackageNotFoundError:
    return "unknown (sqlm_jax is not installed)"


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """What the base has seen. Sizes are digits of the numbers; every question is 4 wide."""

  answered_digits: tuple[int, ...] = (1, 2, 3)
  # Of all documents: answered 4-digit problems. Dev 4-digit accuracy is steep in this and in
  # the steps, and moves with any change to the corpus stream: learning 4-digit carries is a
  # sudden jump, and where the decay catches it decides the base (0.004 -> 0.22, 0.0055 ->
  # 0.40, 0.006 -> 0.83 in one sweep of 900-step runs).
  four_digit_fraction: float = 0.0055
  question_fraction: float = 0.2  # of all documents: "?" + question, no answer
  question_digits: tuple[int, ...] = (1, 2, 3, 4)
  # Of answered problems: both numbers of the same size, like the held-out 4 + 4 digits.
  same_size_fraction: float = 0.0
  # tiny_arithmetic: the operations problems draw from, uniformly ("+-**": half of them
  # products); "" = the topic's own, each equally often.
  operations: str = ""

  @staticmethod
  def max_length(topic=tiny_addition) -> int:
    """Tokens in the longest document: an answered problem with its eos."""
    return topic.MAX_QUESTION_TOKENS + topic.MAX_ANSWER_TOKENS


def _question(rng: random.Random, topic, digits: int, same_size: bool = False,
              operations: str = "") -> str:
  """A question whose larger number has exactly `digits` digits and the other 1 to `digits`
  (exactly `digits` when `same_size`).

  Mixed sizes (347 + 5) give the proposer's questions variety, and give the model answer
  digits that are plain copies of one operand's, which it can learn before it can add.
  """
  other = digits if same_size else rng.randint(1, digits)
  if operations:
    return topic.sample_question(rng, digits, other, rng.choice(operations))
  return topic.sample_question(rng, digits, other)


def make_document(rng: random.Random, spec: CorpusSpec, excluded: frozenset,
                  question_rng: Optional[random.Random] = None, topic=tiny_addition) -> str:
  """One corpus document (without eos): an answered problem or a proposer-style question.

  excluded: questions the corpus must not answer (held-out ones and their paraphrases).
  question_rng (default: rng) draws the questions, so that changing what questions look like
  leaves the stream of answered problems as it was.
  """
  draw = rng.random()
  if draw < spec.question_fraction:
    question_rng = question_rng or rng
    question = _question(question_rng, topic, question_rng.choice(spec.question_digits),
                         operations=spec.operations)
    return topic.PROPOSER_MARKER + question
  four = draw < spec.question_fraction + spec.four_digit_fraction
  digits = 4 if four else rng.choice(spec.answered_digits)
  same_size = rng.random() < spec.same_size_fraction
  while True:
    question = _question(rng, topic, digits, same_size, spec.operations)
    if question not in excluded:
      answer = int(topic.TASK.true_answer(topic.TASK.parse_proposal(question)))
      return question + topic.ANSWER_MARKER + topic.format_answer(answer)


def encode_documents(tokenizer: CharTokenizer, texts: Sequence[str], length: int,
                     answer_marker: str = tiny_addition.ANSWER_MARKER
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded rows [B, length] with eos appended, their mask, and which targets to score.

  An answered problem scores only its answer and eos: its operands are random digits, whose
  loss cannot fall and only adds noise. A proposer-style question scores every token, since
  writing questions is what it teaches.
  """
  tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
  scored = np.zeros((len(texts), length), bool)
  for row, text in enumerate(texts):
    ids = tokenizer.encode(text) + [tokenizer.eos_id]
    if len(ids) > length:
      raise ValueError(f"document {text!r} has {len(ids)} tokens, more than length={length}.")
    tokens[row, :len(ids)] = ids
    first = text.find(answer_marker) + 1  # 0 for a question: score it all
    scored[row, max(first, 1):len(ids)] = True
  return tokens, tokens != tokenizer.pad_id, scored


def model_config(layers: int, hidden: int, heads: int, vocab_size: int) -> ModelConfig:
  """A Llama-architecture decoder; head_dim = hidden / heads, MLP 3x wide, untied head."""
  if hidden % heads:
    raise ValueError(f"--hidden={hidden} must be a multiple of --heads={heads}.")
  return ModelConfig(model_type="llama", vocab_size=vocab_size, hidden_size=hidden,
                     intermediate_size=3 * hidden, num_layers=layers, num_heads=heads,
                     num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=1e-6,
                     max_position_embeddings=64, eos_token_id=(1,), pad_token_id=0)


def make_train_step(config: ModelConfig, optimizer: optax.GradientTransformation):
  """Jitted next-token cross-entropy step; `scored` [B, T] marks the target tokens to learn."""

  def loss_fn(params, tokens, mask, scored):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = forward(params, config, tokens, positions, mask)[:, :-1]
    targets, weights = tokens[:, 1:], scored[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(nll * weights) / jnp.sum(weights)

  @jax.jit
  def step(params, opt_state, tokens, mask, scored):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens, mask, scored)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_optimizer(lr: float, warmup: int, decay_start: int, decay_steps: int,
                   weight_decay: float, max_grad_norm: float = 1.0):
  """AdamW: linear warm-up, constant until `decay_start`, then a linear decay to zero.

  The rate stays high through the long plateau before addition is learned (a cosine decay
  shrinks it there and delays the jump by hundreds of steps); the final decay settles it.
  """
  warmup = min(warmup, decay_start)
  schedule = optax.join_schedules([
      optax.linear_schedule(0.0, lr, max(warmup, 1)),
      optax.constant_schedule(lr),
      optax.linear_schedule(lr, 0.0, decay_steps)], [warmup, decay_start])
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm else optax.identity()
  adamw = optax.adamw(schedule, weight_decay=weight_decay,
                      mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  return optax.chain(clip, adamw)


# ---- Evaluation -------------------------------------------------------------------------------


def _answers(sampler: Sampler, tokenizer: CharTokenizer, params, questions: Sequence[str],
             key, num_samples: int, temperature: float,
             topic=tiny_addition) -> list[list[Optional[str]]]:
  """answers[q][n]: extracted answers of N samples per question."""
  task = topic.TASK
  prompts = [tokenizer.encode(tokenizer.format_chat(
      task.solver_messages(task.parse_proposal(question)))) for question in questions]
  out = sampler(params, prompts, key, max_new_tokens=topic.MAX_ANSWER_TOKENS,
                num_samples=num_samples, temperature=temperature)
  texts = [tokenizer.decode(row[:length]) for row, length in zip(out.tokens, out.lengths)]
  return [[task.extract_answer(t) for t in texts[q * num_samples:(q + 1) * num_samples]]
          for q in range(len(questions))]


def _vote(answers: Sequence[Optional[str]]) -> Optional[str]:
  """The most frequent parseable answer (ties: the one seen first)."""
  counts = collections.Counter(a for a in answers if a is not None)
  return max(counts, key=counts.get) if counts else None


def accuracy(sampler, tokenizer, params, examples: Sequence[dict], key, num_samples: int = 1,
             temperature: float = 0.0, topic=tiny_addition) -> float:
  """Fraction of examples whose answer (the majority of N samples when N > 1) is right."""
  answers = _answers(sampler, tokenizer, params, [e["question"] for e in examples], key,
                     num_samples, temperature, topic)
  return float(np.mean([_vote(a) == e["answer"] for a, e in zip(answers, examples)]))


def proposal_stats(sampler, tokenizer, params, key, num_samples: int = 256,
                   temperature: float = 1.0, topic=tiny_addition) -> dict:
  """Valid rate and difficulty (digits) histogram of questions sampled from the proposer."""
  task = topic.TASK
  prompt = tokenizer.encode(tokenizer.format_chat(task.proposer_messages(task.default_topic)))
  out = sampler(params, [prompt], key, max_new_tokens=topic.MAX_QUESTION_TOKENS,
                num_samples=num_samples, temperature=temperature)
  proposals = [task.parse_proposal(tokenizer.decode(row[:length]))
               for row, length in zip(out.tokens, out.lengths)]
  digits = collections.Counter(int(task.difficulty(p)) for p in proposals if p.valid)
  return {"valid_rate": float(np.mean([p.valid for p in proposals])),
          "digits": {str(d): digits[d] for d in sorted(digits)},
          "distinct": len({p.question for p in proposals if p.valid})}


# ---- Pretraining ------------------------------------------------------------------------------


def evaluation_sets(topic=tiny_addition) -> tuple[list[dict], list[dict], frozenset]:
  """(held-out test, held-out validation = the dev set, questions the corpus must skip: both
  sets' questions and their paraphrases)."""
  splits = datasets.heldout_splits(topic.HELDOUT)
  heldout, dev = splits["test"], splits["validation"]
  questions = [e["question"] for e in heldout + dev]
  paraphrases = [topic.TASK.paraphrase(topic.TASK.parse_proposal(q)).question for q in questions]
  return heldout, dev, frozenset(questions + paraphrases)


def pretrain(out: str, steps: int = 900, batch_size: int = 128, lr: float = 3e-3,
             warmup: int = 50, weight_decay: float = 0.01, seed: int = 0, layers: int = 4,
             hidden: int = 128, heads: int = 4, spec: CorpusSpec = CorpusSpec(),
             eval_every: int = 0, dev_examples: int = 0, heldout_data_dir: Optional[str] = None,
             log=print, argv: Sequence[str] = (),
             stop_at_dev: Optional[tuple[float, float]] = None,
             task: str = "tiny_addition", decay_steps: int = 0,
             decay_at_dev: Optional[float] = None) -> dict:
  """Trains from scratch, writes the checkpoint folder and returns a summary dict.

  argv: the command-line arguments without --out, kept in pretrain_summary.json: with
  `--out DIR` added they remake the checkpoint.
  stop_at_dev: (lo, hi): stop at the first evaluation with lo <= dev greedy <= hi.
  decay_steps: the length of the final decay (0: 30 % of `steps`).
  decay_at_dev: start the decay after the first evaluation with dev greedy >= this, at the
    latest `decay_steps` before `steps`; the run ends when its decay does.
  """
  if steps < 2:
    raise ValueError(f"--steps={steps}: needs at least 2 steps for the warm-up and decay.")
  decay_steps = decay_steps or max(1, int(steps * 0.3))
  if not 1 <= decay_steps < steps:
    raise ValueError(f"--decay_steps={decay_steps}: needs 1 <= N < --steps ({steps}).")
  if decay_at_dev is not None and eval_every < 1:
    raise ValueError("--decay_at_dev needs --eval_every N (N >= 1): dev accuracy is checked "
                     "at each evaluation.")
  if stop_at_dev is not None:
    lo, hi = stop_at_dev
    if not 0 <= lo <= hi <= 1:
      raise ValueError(f"--stop_at_dev {lo},{hi}: needs 0 <= LO <= HI <= 1.")
    if eval_every < 1:
      raise ValueError("--stop_at_dev needs --eval_every N (N >= 1): the band is checked at "
                       "each evaluation.")
  topic = topic_module(task)
  allowed = getattr(topic, "OPERATIONS", "")
  if spec.operations and (not allowed or set(spec.operations) - set(allowed)):
    raise ValueError(f"--operations {spec.operations!r}: task {task} has "
                     + (f"the operations {allowed!r}." if allowed else "no choice of operation."))
  start = time.time()
  tokenizer = CharTokenizer(topic.CHARS)
  config = model_config(layers, hidden, heads, tokenizer.vocab_size)
  params = init_params(config, jax.random.key(seed))

  def optimizer(decay_start):
    return make_optimizer(lr, warmup, decay_start, decay_steps, weight_decay)

  decay_start = steps - decay_steps  # at the latest; --decay_at_dev may bring it forward
  first_optimizer = optimizer(decay_start)
  opt_state = first_optimizer.init(params)
  train_step = make_train_step(config, first_optimizer)

  _, dev, excluded = evaluation_sets(topic)
  dev = dev[:dev_examples] if dev_examples else dev
  rng, question_rng = random.Random(seed), random.Random(seed + 1)
  sampler = Sampler(config, tokenizer.pad_id, tokenizer.stop_ids)
  eval_key = jax.random.key(seed + 1)

  history, dev_history, stopped_at = [], [], None
  step = 0
  while step < decay_start + decay_steps:
    last = step == decay_start + decay_steps - 1
    texts = [make_document(rng, spec, excluded, question_rng, topic) for _ in range(batch_size)]
    tokens, mask, scored = encode_documents(tokenizer, texts, spec.max_length(topic),
                                            topic.ANSWER_MARKER)
    params, opt_state, loss = train_step(params, opt_state, tokens, mask, scored)
    if step % 50 == 0 or last:
      history.append((step, float(loss)))
      log(f"step {step:5d}  loss {float(loss):.4f}  {time.time() - start:6.1f}s")
    if eval_every and step % eval_every == eval_every - 1 and not last:
      dev_greedy = accuracy(sampler, tokenizer, params, dev, eval_key, topic=topic)
      dev_history.append((step, dev_greedy))
      log(f"step {step:5d}  dev greedy {dev_greedy:.3f}")
      if stop_at_dev is not None and stop_at_dev[0] <= dev_greedy <= stop_at_dev[1]:
        stopped_at = step
        log(f"step {step:5d}  dev greedy in [{stop_at_dev[0]}, {stop_at_dev[1]}]: stopping")
        break
      if decay_at_dev is not None and dev_greedy >= decay_at_dev and step + 1 < decay_start:
        decay_start = step + 1  # Same optimizer state; only the schedule's boundary moves.
        train_step = make_train_step(config, optimizer(decay_start))
        log(f"step {step:5d}  dev greedy >= {decay_at_dev}: the decay starts")
    step += 1
  train_seconds = time.time() - start

  metrics = {"dev_greedy": accuracy(sampler, tokenizer, params, dev, eval_key, topic=topic)}
  if stop_at_dev is not None and stopped_at is None:
    in_band = stop_at_dev[0] <= metrics["dev_greedy"] <= stop_at_dev[1]
    stopped_at = step - 1 if in_band else None
    log(f"dev greedy {metrics['dev_greedy']:.3f} at the end"
        + ("" if in_band else f" never entered [{stop_at_dev[0]}, {stop_at_dev[1]}] at an "
           "evaluation: the final weights are saved; try other --steps or corpus settings"))
  for temperature in (0.5, 0.7, 1.0):
    metrics[f"dev_majority8_t{temperature}"] = accuracy(sampler, tokenizer, params, dev,
                                                        eval_key, 8, temperature, topic)
  metrics["proposals_t1.0"] = proposal_stats(sampler, tokenizer, params, eval_key, topic=topic)
  if heldout_data_dir is not None:  # Reported once for the finished base; never for tuning.
    examples = datasets.load_heldout(topic.HELDOUT, heldout_data_dir)
    metrics["heldout_greedy"] = accuracy(sampler, tokenizer, params, examples, eval_key,
                                         topic=topic)
    for temperature in (0.5, 0.7):
      metrics[f"heldout_majority8_t{temperature}"] = accuracy(
          sampler, tokenizer, params, examples, eval_key, 8, temperature, topic)
  log(json.dumps(metrics))

  save_pretrained(out, config, params)
  tokenizer.save(out)
  summary = {"argv": list(argv), "task": task, "version": package_version(),
             "dev_accuracy": metrics["dev_greedy"], "steps": steps, "batch_size": batch_size,
             "lr": lr, "warmup": warmup,
             "weight_decay": weight_decay, "seed": seed, "corpus": dataclasses.asdict(spec),
             "stop_at_dev": list(stop_at_dev) if stop_at_dev else None,
             "decay_steps": decay_steps, "decay_at_dev": decay_at_dev,
             "decay_started_at_step": decay_start,
             "stopped_at_step": stopped_at, "eval_every": eval_every,
             "num_params": config.num_params(), "train_seconds": round(train_seconds, 1),
             "loss_history": history, "dev_history": dev_history, "metrics": metrics}
  with open(os.path.join(out, "pretrain_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def _digits(text: str) -> tuple[int, ...]:
  return tuple(int(w) for w in text.split(","))


def _band(text: str) -> tuple[float, float]:
  lo, hi = (float(x) for x in text.split(","))
  return lo, hi


def main(argv: Optional[Sequence[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="checkpoint folder to write")
  parser.add_argument("--task", default="tiny_addition", choices=sorted(TOPICS),
                      help="the topic whose format and problems the base learns")
  parser.add_argument("--steps", type=int, default=900)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--warmup", type=int, default=50)
  parser.add_argument("--weight_decay", type=float, default=0.01)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--answered_digits", type=_digits, default=CorpusSpec.answered_digits,
                      help="comma-separated sizes (digits) of answered problems")
  parser.add_argument("--four_digit_fraction", type=float,
                      default=CorpusSpec.four_digit_fraction)
  parser.add_argument("--question_fraction", type=float, default=CorpusSpec.question_fraction)
  parser.add_argument("--question_digits", type=_digits, default=CorpusSpec.question_digits)
  parser.add_argument("--same_size_fraction", type=float,
                      default=CorpusSpec.same_size_fraction)
  parser.add_argument("--operations", default=CorpusSpec.operations,
                      help="tiny_arithmetic: operations drawn uniformly, e.g. '+-**' (half "
                      "products); default: each of the topic's equally often")
  parser.add_argument("--eval_every", type=int, default=0, help="dev greedy accuracy every N steps")
  parser.add_argument("--stop_at_dev", type=_band, default=None, metavar="LO,HI",
                      help="stop when dev greedy accuracy first lies in [LO, HI] (needs "
                      "--eval_every); the stop does not change the schedule")
  parser.add_argument("--decay_steps", type=int, default=0,
                      help="length of the final decay to zero (default: 30%% of --steps)")
  parser.add_argument("--decay_at_dev", type=float, default=None, metavar="ACC",
                      help="start the decay after the first evaluation with dev greedy >= ACC "
                      "(needs --eval_every; at the latest --decay_steps before --steps)")
  parser.add_argument("--dev_examples", type=int, default=0,
                      help="evaluate on this many dev problems (0 = all 300)")
  parser.add_argument("--heldout_data_dir", default=None,
                      help="also report the held-out test accuracy (tfds data dir; '' = the "
                      "default)")
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parser.parse_args(argv)
  spec = CorpusSpec(args.answered_digits, args.four_digit_fraction, args.question_fraction,
                    args.question_digits, args.same_size_fraction, args.operations)
  heldout_dir = args.heldout_data_dir
  if heldout_dir == "":
    heldout_dir = datasets.default_data_dir()
  return pretrain(args.out, args.steps, args.batch_size, args.lr, args.warmup,
                  args.weight_decay, args.seed, args.layers, args.hidden, args.heads, spec,
                  args.eval_every, args.dev_examples, heldout_dir,
                  argv=without_out(argv), stop_at_dev=args.stop_at_dev, task=args.task,
                  decay_steps=args.decay_steps, decay_at_dev=args.decay_at_dev)


def without_out(argv: Sequence[str]) -> list[str]:
  """argv less its --out DIR (or --out=DIR): what remakes the base in any folder."""
  kept, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--out":
      skip = True
    elif not arg.startswith("--out="):
      kept.append(arg)
  return kept


if __name__ == "__main__":
  main()
