"""Held-out sets: deterministic, the promised size, answers right, readable without TensorFlow."""

import re

import pytest
import sympy
import tensorflow_datasets as tfds

from sqlm_jax.evals import datasets
from sqlm_jax.tasks import algebra
from sqlm_jax.tasks.base import Proposal


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Both sets prepared twice, into two separate directories."""
  dirs = [tmp_path_factory.mktemp("tfds_a"), tmp_path_factory.mktemp("tfds_b")]
  sets = {name: [datasets.load_heldout(name, str(d)) for d in dirs]
          for name in datasets.HELDOUT_SETS}
  return sets, dirs


@pytest.mark.parametrize("name", sorted(datasets.HELDOUT_SETS))
def test_deterministic_and_sized(prepared, name):
  sets, _ = prepared
  first, second = sets[name]
  assert first == second
  assert len(first) == datasets.NUM_EXAMPLES == 500
  assert len({example["question"] for example in first}) == 500  # no repeated question
  assert all(isinstance(example["answer"], str) for example in first)


def test_multiplication_answers_recomputed(prepared):
  sets, _ = prepared
  for example in sets["multiplication3"][0]:
    a, b = map(int, re.fullmatch(r"What is (\d{3}) \* (\d{3})\?", example["question"]).groups())
    assert example["answer"] == str(a * b)
    assert example["answer_digits"] == len(str(a * b))


def test_linear_equation_answers_recomputed(prepared):
  sets, _ = prepared
  examples = sets["linear_equations"][0]
  # The algebra topic's sympy solver recomputes every answer from the question text.
  for example in examples:
    assert algebra.true_answer(Proposal(question=example["question"])) == example["answer"]
  unknowns = [example["num_unknowns"] for example in examples]
  assert 150 < unknowns.count(1) < 350 and unknowns.count(1) + unknowns.count(2) == 500
  fractional = sum("/" in example["answer"] for example in examples)
  assert 100 < fractional < 400  # both integer and fractional solutions


def test_linear_equation_answers_satisfy_the_equations(prepared):
  """Independent of the algebra topic's parser: substitute the answer and compare both sides."""
  sets, _ = prepared
  for example in sets["linear_equations"][0]:
    answer = example["answer"]
    pairs = [pair.split("=") for pair in answer.split(",")] if "=" in answer else None
    equations = example["question"].split(": ", 1)[1].rstrip(".").split(" and ")
    for equation in equations:
      if pairs is None:  # one unknown: "Solve for t: ..."
        pairs = [[example["question"][len("Solve for ")], answer]]
      text = re.sub(r"(\d)([a-z])", r"\1*\2", equation)
      for name, value in pairs:
        text = re.sub(rf"\b{name}\b", f"({value})", text)
      lhs, rhs = (sympy.sympify(side) for side in text.split(" = "))
      assert lhs == rhs, (example, text)


def test_readable_with_tfds_data_source(prepared):
  _, dirs = prepared
  source = tfds.data_source("multiplication3", split="test", data_dir=str(dirs[0]),
                            download=False)
  assert len(source) == 500
  assert source[0]["question"].decode().startswith("What is ")
  files = list((dirs[0] / "multiplication3").rglob("*.array_record*"))
  assert files, "expected array_record files"


def test_seed_is_not_a_training_seed():
  assert datasets.HELDOUT_SEED > 1_000_000


def test_unknown_set_and_split():
  with pytest.raises(ValueError, match="multiplication3, linear_equations"):
    datasets.load_heldout("gsm8k", "/nonexistent")
  with pytest.raises(ValueError, match="no split 'train'; its splits are test$"):
    datasets.load_heldout("multiplication3", "/nonexistent", split="train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    datasets.load_heldout("linear_equations", "/nonexistent", split="validation")


def test_addition4_validation_split_is_disjoint_from_test(prepared):
  sets, dirs = prepared
  validation = datasets.load_heldout("addition4", str(dirs[0]), split="validation")
  by_question = lambda examples: sorted(examples, key=lambda e: e["question"])
  assert by_question(validation) == by_question(datasets.addition4_splits()["validation"])
  assert len(validation) == datasets.ADDITION4_VALIDATION_SIZE == 300
  assert not {e["question"] for e in validation} & {e["question"] for e in sets["addition4"][0]}
