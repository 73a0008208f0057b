"""The tiny arithmetic topic: formats, truth, generated questions, paraphrases, its held-out set."""

import collections
import json
import os
import random
import re

import pytest

from sqlm_jax.evals import datasets
from sqlm_jax.tasks import get_task, tiny_arithmetic
from sqlm_jax.tasks.base import Proposal
from sqlm_jax.models.tokenizer import CharTokenizer

TASK = get_task("tiny_arithmetic")


def test_question_and_answer_formats():
  assert tiny_arithmetic.format_question(1234, "+", 5678) == "4321+8765"
  assert tiny_arithmetic.format_question(1234, "-", 56) == "4321-6500"
  assert tiny_arithmetic.format_question(1234, "*", 7) == "4321*7000"
  assert tiny_arithmetic.format_question(7, "*", 1234) == "7000*4321"
  assert tiny_arithmetic.format_answer(8638) == "83680"
  assert tiny_arithmetic.parts("4321-6500") == (1234, "-", 56)
  for a, op, b in ((12, "-", 13), (1234, "*", 12), (10000, "+", 1), (1, "/", 2)):
    with pytest.raises(ValueError, match=re.escape(f"{a} {op} {b} is not a question")):
      tiny_arithmetic.format_question(a, op, b)
  with pytest.raises(ValueError, match="answer -1"):
    tiny_arithmetic.format_answer(-1)


def test_parse_extract_truth_difficulty_operation():
  cases = {"4321+8765": ("6912", 4.0, "+"), "4321-6500": ("1178", 4.0, "-"),
           "4321*7000": ("8638", 4.0, "*"), "9000*3000": ("27", 1.0, "*"),
           "2100-7000": ("5", 2.0, "-")}
  for question, (answer, digits, operation) in cases.items():
    proposal = TASK.parse_proposal(f" {question}\n")
    assert proposal.question == question
    assert TASK.true_answer(proposal) == answer
    assert TASK.difficulty(proposal) == digits
    assert tiny_arithmetic.operation(proposal) == operation
  # Negative differences, products of two multi-digit numbers, other lengths and symbols.
  for bad in ("6500-4321", "4321*2100", "4321+876", "4321/7000", "", "4321+8765+1",
              "4321++765", "?4321+8765"):
    assert TASK.parse_proposal(bad).question is None, bad
  assert TASK.true_answer(Proposal(None)) is None and TASK.difficulty(Proposal(None)) is None
  assert tiny_arithmetic.operation(Proposal(None)) is None
  assert TASK.extract_answer("83680") == "8638" == TASK.extract_answer("8368")
  assert TASK.extract_answer("8-368") is None and TASK.extract_answer("") is None
  assert TASK.extract_answer("123456") is None
  solver_prompt = CharTokenizer(tiny_arithmetic.CHARS).format_chat(
      TASK.solver_messages(TASK.parse_proposal("4321*7000")))
  assert solver_prompt == "4321*7000="


def test_generated_questions_are_proposer_questions_of_every_operation_and_size():
  rng = random.Random(0)
  kinds = collections.Counter()
  for _ in range(3000):
    proposal = TASK.generate_question(rng)
    assert proposal == TASK.parse_proposal(proposal.question)
    a, op, b = tiny_arithmetic.parts(proposal.question)
    assert TASK.true_answer(proposal) == str({"+": a + b, "-": a - b, "*": a * b}[op])
    kinds[op, int(TASK.difficulty(proposal))] += 1
  assert set(kinds) == {(op, d) for op in "+-*" for d in range(1, 5)}
  by_operation = collections.Counter(op for op, _ in kinds.elements())
  assert min(by_operation.values()) > 900, by_operation
  assert ([TASK.generate_question(random.Random(5)) for _ in range(3)]
          == [TASK.generate_question(random.Random(5)) for _ in range(3)])


def test_paraphrase_keeps_the_answer_in_another_form():
  assert TASK.paraphrase(Proposal("4321+8765")).question == "8765+4321"
  # A product by an even digit halves it and doubles the other factor (1234 * 6 = 2468 * 3);
  # by 3 or 4 with an even partner, the other way (1234 * 3 = 617 * 6); by 0 or 1 it is its
  # result plus 0; otherwise its factors are swapped.
  assert TASK.paraphrase(Proposal("4321*6000")).question == "8642*3000"
  assert TASK.paraphrase(Proposal("6000*4321")).question == "3000*8642"
  assert TASK.paraphrase(Proposal("4321*3000")).question == "7160*6000"
  assert TASK.paraphrase(Proposal("1000*8765")).question == "8765+0000"  # 5678 + 0
  assert TASK.paraphrase(Proposal("9999*8000")).question == "8000*9999"  # 19998 is too long
  assert TASK.paraphrase(Proposal("5432*7000")).question == "7000*5432"
  # A subtraction moves both operands by the repunit of the first's length, so that every digit
  # changes: 1234 - 56 as 2345 - 1167; down when up does not fit, else by one.
  assert TASK.paraphrase(Proposal("4321-6500")).question == "5432-7611"  # 2345 - 1167
  assert TASK.paraphrase(Proposal("9999-1111")).question == "8888-0000"  # 8888 - 0
  assert TASK.paraphrase(Proposal("5000-3000")).question == "6000-4000"  # 6 - 4
  assert TASK.paraphrase(Proposal("9999-6500")).question == "8999-5500"  # 9998 - 55
  assert TASK.paraphrase(Proposal("9999-0000")).question == "0000+9999"  # 0 + 9999
  rng = random.Random(1)
  for _ in range(500):
    question = TASK.generate_question(rng)
    other = TASK.paraphrase(question)
    a, op, b = tiny_arithmetic.parts(question.question)
    assert other.valid and (other.question != question.question or (op != "-" and a == b))
    assert TASK.true_answer(other) == TASK.true_answer(question)


def test_heldout_set_is_harder_disjoint_balanced_and_right():
  splits = datasets.arithmetic4_splits()
  test, validation = splits["test"], splits["validation"]
  assert len(test) == datasets.NUM_EXAMPLES and len(validation) == 300
  assert not {e["question"] for e in test} & {e["question"] for e in validation}
  for example in test + validation:
    proposal = TASK.parse_proposal(example["question"])
    assert TASK.true_answer(proposal) == example["answer"]
    assert TASK.difficulty(proposal) == 4.0 == example["digits"]
    assert tiny_arithmetic.operation(proposal) == example["operation"]
    a, op, b = tiny_arithmetic.parts(example["question"])
    assert min(a, b) >= 1000 if op != "*" else 2 <= min(a, b) <= 9
  counts = collections.Counter(e["operation"] for e in test)
  assert counts == {"+": 167, "-": 167, "*": 166}
  assert datasets.heldout_splits("arithmetic4") == splits


def test_heldout_set_reads_back_through_tfds(tmp_path):
  examples = datasets.load_heldout("arithmetic4", str(tmp_path))
  validation = datasets.load_heldout("arithmetic4", str(tmp_path), split="validation")
  by_question = lambda examples: sorted(examples, key=lambda e: e["question"])
  splits = datasets.arithmetic4_splits()
  assert by_question(examples) == by_question(splits["test"])
  assert by_question(validation) == by_question(splits["validation"])


def test_heldout_splits_names_the_tiny_sets():
  with pytest.raises(ValueError, match="'multiplication3' is not a tiny topic's; those are "
                     "addition4, arithmetic4"):
    datasets.heldout_splits("multiplication3")


def test_bundled_base_and_config():
  from sqlm_jax.config_base import load_config
  from sqlm_jax.models import load_pretrained
  from sqlm_jax.models.tokenizer import load_tokenizer
  config = load_config("tiny_arithmetic")
  assert os.path.basename(config.model.path) == "tiny_arithmetic"
  assert (config.task.name, config.eval.heldout) == ("tiny_arithmetic", "arithmetic4")
  model_config, params = load_pretrained(config.model.path)
  tokenizer = load_tokenizer(config.model.path)
  assert tokenizer.chars == tiny_arithmetic.CHARS == "0123456789+-*=?"
  assert model_config.vocab_size == tokenizer.vocab_size == 17
  assert params["embed_tokens"].shape[0] == 17 and model_config.num_params() < 5_000_000
  assert config.rollout.max_proposal_tokens == tiny_arithmetic.MAX_QUESTION_TOKENS
  assert config.rollout.max_answer_tokens == tiny_arithmetic.MAX_ANSWER_TOKENS
  assert config.eval.max_new_tokens == tiny_arithmetic.MAX_ANSWER_TOKENS
  with open(os.path.join(config.model.path, "pretrain_summary.json")) as f:
    summary = json.load(f)
  assert summary["task"] == "tiny_arithmetic" and "--out" not in summary["argv"]
  assert 0.0 <= summary["dev_accuracy"] <= 1.0 and summary["version"][0].isdigit()
