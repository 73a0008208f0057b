"""Held-out evaluation sets with ground truth, as tensorflow-datasets builders.

  multiplication3    "What is 487 * 319?": three-digit times three-digit, integer answers.
  linear_equations   one- and two-unknown linear equations with integer coefficients and a
                     unique rational solution, in the style of OMEGA's linear equations.
  addition4          four-digit plus four-digit addition in the tiny_addition topic's
                     compact format ("4321+8765", answer "6912"), for the tiny CPU models.
                     Its "validation" split (300 other problems) is for choosing settings,
                     so that "test" is only ever used to report them.
  arithmetic4        the tiny_arithmetic topic's hardest problems, a third each: 4-digit plus
                     4-digit, 4-digit minus 4-digit (never negative) and 4-digit times one
                     digit (2 to 9), in its compact format ("4321*7000", answer "8638");
                     a "validation" split of 300 other problems, as addition4's.

All are generated, not downloaded: a fixed seed (HELDOUT_SEED) drives Python's
`random.Random`, which nothing in training touches (training randomness is a JAX key derived
from the config's seed), so the sets are identical on every machine and every run. Training
never reads them: self-play learns from its own proposals only, and these sets exist for
`evaluation.py` to measure accuracy against ground truth. Changing what a generator produces
must bump the builder's VERSION, so old prepared copies are not mistaken for new ones.

Prepared as array_record and read with `tfds.data_source`, which needs no TensorFlow.
"""

from __future__ import annotations

import os
import random
from fractions import Fraction
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds

from sqlm_jax.tasks import math_answers, tiny_addition, tiny_arithmetic

# Far from the small integers configs use as seeds; offsets give each set its own stream.
HELDOUT_SEED = 7_340_117
ADDITION4_VALIDATION_SEED = HELDOUT_SEED + 1003
ADDITION4_VALIDATION_SIZE = 300
ARITHMETIC4_VALIDATION_SEED = HELDOUT_SEED + 1004
NUM_EXAMPLES = 500  # the size of the reference evaluation sets
DEFAULT_DATA_DIR = "~/.cache/sqlm_jax/tfds"
DATA_DIR_ENV = "SQLM_JAX_TFDS_DIR"

SINGLE_UNKNOWNS = "xyzkmnpt"
UNKNOWN_PAIRS = (("x", "y"), ("m", "n"), ("p", "q"), ("u", "v"))


def multiplication_examples(num_examples: int, seed: int) -> list[dict]:
  """Distinct "What is a * b?" questions with 100 <= a, b <= 999."""
  rng = random.Random(seed)
  pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set
  while len(pairs) < num_examples:
    pairs.setdefault((rng.randint(100, 999), rng.randint(100, 999)))
  return [{"question": f"What is {a} * {b}?", "answer": str(a * b),
           "answer_digits": len(str(a * b))} for a, b in pairs]


def addition_examples(num_examples: int, seed: int, digits: int = 4) -> list[dict]:
  """Distinct questions a + b with two operands of exactly `digits` digits (no leading zero).

  The question is in the tiny_addition topic's format; the answer is the sum in ordinary
  decimal, which is what tiny_addition.extract_answer returns.
  """
  if not 1 <= digits <= tiny_addition.WIDTH:
    raise ValueError(f"digits={digits}: the tiny_addition format holds 1 to "
                     f"{tiny_addition.WIDTH} digits.")
  rng = random.Random(seed)
  low, high = 10 ** (digits - 1), 10**digits - 1
  pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set
  while len(pairs) < num_examples:
    pairs.setdefault((rng.randint(low, high), rng.randint(low, high)))
  return [{"question": tiny_addition.format_question(a, b), "answer": str(a + b),
           "digits": digits} for a, b in pairs]


def addition4_splits() -> dict[str, list[dict]]:
  """addition4's "test" set and its "validation" set, which shares no problem with it."""
  test = addition_examples(NUM_EXAMPLES, HELDOUT_SEED + 3)
  seen = {e["question"] for e in test}
  candidates = addition_examples(ADDITION4_VALIDATION_SIZE + len(test), ADDITION4_VALIDATION_SEED)
  validation = [e for e in candidates if e["question"] not in seen][:ADDITION4_VALIDATION_SIZE]
  return {"test": test, "validation": validation}


def arithmetic_examples(num_examples: int, seed: int) -> list[dict]:
  """Distinct tiny_arithmetic questions at full width, the operations in turn (+, -, *).

  Sums and differences have two 4-digit operands, a difference's first the larger; a product
  is a 4-digit number times a digit from 2 to 9, in either order. The answer is in ordinary
  decimal, which is what tiny_arithmetic.extract_answer returns.
  """
  rng = random.Random(seed)
  width = tiny_arithmetic.WIDTH
  low, high = 10 ** (width - 1), 10**width - 1
  examples: dict[str, dict] = {}  # insertion-ordered, by question
  while len(examples) < num_examples:
    operation = tiny_arithmetic.OPERATIONS[len(examples) % 3]
    a = rng.randint(low, high)
    b = rng.randint(2, 9) if operation == "*" else rng.randint(low, high)
    if operation == "-" or (operation == "*" and rng.random() < 0.5):
      a, b = max(a, b), min(a, b)
    elif operation == "*":
      a, b = b, a
    question = tiny_arithmetic.format_question(a, operation, b)
    examples.setdefault(question, {"question": question,
                                   "answer": str(tiny_arithmetic.result(a, operation, b)),
                                   "operation": operation, "digits": width})
  return list(examples.values())


def arithmetic4_splits() -> dict[str, list[dict]]:
  """arithmetic4's "test" set and its "validation" set, which shares no problem with it."""
  test = arithmetic_examples(NUM_EXAMPLES, HELDOUT_SEED + 4)
  seen = {e["question"] for e in test}
  candidates = arithmetic_examples(ADDITION4_VALIDATION_SIZE + len(test),
                                   ARITHMETIC4_VALIDATION_SEED)
  validation = [e for e in candidates if e["question"] not in seen][:ADDITION4_VALIDATION_SIZE]
  return {"test": test, "validation": validation}


def heldout_splits(name: str) -> dict[str, list[dict]]:
  """Split name -> examples of a tiny topic's held-out set, generated in memory (no tfds)."""
  makers = {"addition4": addition4_splits, "arithmetic4": arithmetic4_splits}
  if name not in makers:
    raise ValueError(f"held-out set {name!r} is not a tiny topic's; those are "
                     f"{', '.join(makers)}")
  return makers[name]()


def _linear_side(terms: list[tuple[int, str]], constant: int) -> str:
  """Textbook form of a linear expression: [(3, "x"), (-1, "y")], 5 -> "3x - y + 5"."""
  parts = []
  for coefficient, name in terms:
    if coefficient == 0:
      continue
    size = "" if abs(coefficient) == 1 else str(abs(coefficient))
    parts.append(("-" if coefficient < 0 else "+", f"{size}{name}"))
  if constant != 0 or not parts:
    parts.append(("-" if constant < 0 else "+", str(abs(constant))))
  sign, first = parts[0]
  text = ("-" if sign == "-" else "") + first
  return text + "".join(f" {sign} {part}" for sign, part in parts[1:])


def _nonzero(rng: random.Random, bound: int) -> int:
  return rng.choice([value for value in range(-bound, bound + 1) if value != 0])


def _one_unknown(rng: random.Random, integer: bool) -> dict:
  """a*v + b = c*v + d with a != c; c = 0 a third of the time (unknown on one side)."""
  name = rng.choice(SINGLE_UNKNOWNS)
  a = _nonzero(rng, 12)
  c = 0 if rng.random() < 1 / 3 else rng.choice([v for v in range(-12, 13) if v != a])
  b = rng.randint(-30, 30)
  # An integer solution is chosen first and d follows from it; otherwise d is free.
  d = b + (a - c) * rng.randint(-12, 12) if integer else rng.randint(-30, 30)
  value = Fraction(d - b, a - c)
  question = f"Solve for {name}: {_linear_side([(a, name)], b)} = {_linear_side([(c, name)], d)}."
  return {"question": question, "answer": math_answers.format_number(value), "num_unknowns": 1}


def _two_unknowns(rng: random.Random, integer: bool) -> dict:
  """a1*u + b1*v = c1 and a2*u + b2*v = c2 with a non-zero determinant (one solution)."""
  u, v = rng.choice(UNKNOWN_PAIRS)
  while True:
    a1, b1, a2, b2 = (_nonzero(rng, 9) for _ in range(4))
    if a1 * b2 - a2 * b1 != 0:
      break
  if integer:
    u_value, v_value = Fraction(rng.randint(-12, 12)), Fraction(rng.randint(-12, 12))
    c1, c2 = int(a1 * u_value + b1 * v_value), int(a2 * u_value + b2 * v_value)
  else:
    c1, c2 = rng.randint(-30, 30), rng.randint(-30, 30)
    det = a1 * b2 - a2 * b1
    u_value, v_value = Fraction(c1 * b2 - c2 * b1, det), Fraction(a1 * c2 - a2 * c1, det)
  first, second = _linear_side([(a1, u), (b1, v)], 0), _linear_side([(a2, u), (b2, v)], 0)
  question = f"Solve the system of equations for {u} and {v}: {first} = {c1} and {second} = {c2}."
  answer = math_answers.normalize_answer(f"{u}={math_answers.format_number(u_value)}, "
                                         f"{v}={math_answers.format_number(v_value)}")
  return {"question": question, "answer": answer, "num_unknowns": 2}


def linear_equation_examples(num_examples: int, seed: int) -> list[dict]:
  """Distinct linear equations; coin flips pick one or two unknowns and an integer or not."""
  rng = random.Random(seed)
  examples: dict[str, dict] = {}
  while len(examples) < num_examples:
    make = _one_unknown if rng.random() < 0.5 else _two_unknowns
    example = make(rng, integer=rng.random() < 0.5)
    examples.setdefault(example["question"], example)
  return list(examples.values())


class _GeneratedBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder whose splits are generated in Python: nothing to download."""

  SPLITS = ("test",)  # what splits_examples returns, "test" first

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # Only used to look for download checksums, which a generated set has none of. tfds's
    # own lookup imports importlib_resources, which its Python >= 3.9 install doesn't pull in.
    return None

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: enumerate(examples) for name, examples in self.splits_examples().items()}

  def _generate_examples(self):
    raise NotImplementedError  # _split_generators hands tfds each split's examples directly.

  def splits_examples(self) -> dict[str, list[dict]]:
    """Split name -> examples, for each of SPLITS."""
    return {"test": self._examples()}

  def _examples(self) -> list[dict]:
    raise NotImplementedError


class Multiplication3(_GeneratedBuilder):
  """Three-digit by three-digit multiplication with exact integer answers."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "500 distinct products, seed HELDOUT_SEED + 1."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Held-out 3-digit x 3-digit multiplication (generated, never trained on).",
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "answer_digits": np.int32,
        }),
    )

  def _examples(self) -> list[dict]:
    return multiplication_examples(NUM_EXAMPLES, HELDOUT_SEED + 1)


class LinearEquations(_GeneratedBuilder):
  """Linear equations in one or two unknowns; answers canonical as math_answers.normalize_answer."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "500 distinct equations or systems, seed HELDOUT_SEED + 2."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Held-out linear equations with unique rational solutions (generated).",
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "num_unknowns": np.int32,
        }),
    )

  def _examples(self) -> list[dict]:
    return linear_equation_examples(NUM_EXAMPLES, HELDOUT_SEED + 2)


class Addition4(_GeneratedBuilder):
  """Four-digit addition for the tiny CPU models, in the tiny_addition topic's format."""

  SPLITS = ("test", "validation")

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "500 distinct sums of two 4-digit numbers, seed HELDOUT_SEED + 3.",
                   "1.1.0": "A 300-problem validation split, disjoint from test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Held-out 4-digit + 4-digit addition, digits reversed (generated).",
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "digits": np.int32,
        }),
    )

  def splits_examples(self) -> dict[str, list[dict]]:
    return addition4_splits()


class Arithmetic4(_GeneratedBuilder):
  """The tiny_arithmetic topic's 4-digit problems for the tiny CPU models, in its format."""

  SPLITS = ("test", "validation")

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "500 problems (+, -, * by turns), seed HELDOUT_SEED + 4; a "
                            "300-problem validation split, disjoint from test."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Held-out 4-digit addition, subtraction and multiplication by a digit, "
                    "digits reversed (generated).",
        features=tfds.features.FeaturesDict({
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "operation": tfds.features.Text(),
            "digits": np.int32,
        }),
    )

  def splits_examples(self) -> dict[str, list[dict]]:
    return arithmetic4_splits()


HELDOUT_SETS = {"multiplication3": Multiplication3, "linear_equations": LinearEquations,
                "addition4": Addition4, "arithmetic4": Arithmetic4}


def default_data_dir() -> str:
  """$SQLM_JAX_TFDS_DIR if set, else ~/.cache/sqlm_jax/tfds."""
  return os.path.expanduser(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


def split_names(name: str) -> tuple[str, ...]:
  """The splits a held-out set has, "test" first."""
  return HELDOUT_SETS[name].SPLITS


def _plain(value):
  """tfds returns text as bytes and numbers as numpy scalars; evaluation wants str and int."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return value.item() if isinstance(value, np.generic) else value


def load_heldout(name: str, data_dir: Optional[str] = None, split: str = "test") -> list[dict]:
  """All examples of a held-out set as dicts of str/int, preparing it first if needed.

  Preparing takes well under a second and happens once per data_dir. Several processes
  preparing the same data_dir at once may race, so on multi-host runs prepare on one host
  first or give each host its own data_dir.
  """
  if name not in HELDOUT_SETS:
    raise ValueError(f"unknown held-out set {name!r}; valid names are {', '.join(HELDOUT_SETS)}")
  splits = split_names(name)
  if split not in splits:
    raise ValueError(f"held-out set {name!r} has no split {split!r}; its splits are "
                     f"{', '.join(splits)}")
  data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else default_data_dir()
  source = tfds.data_source(name, split=split, data_dir=data_dir,
                            builder_kwargs={"file_format": "array_record"})
  return [{key: _plain(value) for key, value in source[i].items()} for i in range(len(source))]
