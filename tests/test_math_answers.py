"""Answer extraction and canonical forms: what the majority vote treats as the same answer."""

import numpy as np
import pytest

from sqlm_jax.tasks import math_answers
from sqlm_jax.tasks.math_answers import canonical_answer, extract_answer, normalize_answer


@pytest.mark.parametrize("text, expected", [
    ("<think>7*6</think><answer>42</answer>", "42"),
    ("<answer>1</answer> then I changed my mind <answer> 2 </answer>", "2"),
    ("<ANSWER>5</ANSWER>", "5"),
    ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} or rather \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("<answer>7</answer> and \\boxed{8}", "7"),  # tags win over \boxed
    ("<answer>\\boxed{9}</answer>", "\\boxed{9}"),
])
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


@pytest.mark.parametrize("text", [
    "no answer here", "<answer>12", "<answer>  </answer>", "\\boxed{12", "", "<answer></answer>",
])
def test_extract_answer_none(text):
  assert extract_answer(text) is None


@pytest.mark.parametrize("written", [
    "0.5", "1/2", " 1/2 ", "\\frac{1}{2}", "\\dfrac{1}{2}", "\\frac12", "2/4", "+0.50", "x = 1/2",
    "$\\frac{1}{2}$", "\\boxed{0.5}", "(1)/(2)", "0.500.",
])
def test_one_half_in_every_spelling(written):
  assert normalize_answer(written) == "1/2"


@pytest.mark.parametrize("written, expected", [
    ("1,000", "1000"), ("1000", "1000"), ("x = 1,000", "1000"), ("$5$", "5"), ("x = 3", "3"),
    ("3.", "3"), ("-0", "0"), ("-\\frac{3}{6}", "-1/2"), ("\\frac{-1}{2}", "-1/2"),
    ("1/-2", "-1/2"), ("−7", "-7"), ("1e3", "1000"), ("(5)", "5"), ("\\left(5\\right)", "5"),
    ("487 * 319 = 155353", "155353"), ("x = y = 3", "3"), ("0.333", "333/1000"),
    ("50\\%", "50%"), ("Paris", "paris"), ("\\text{ Paris }", "paris"), ("x^2 + 1", "x^2+1"),
])
def test_normalize_answer(written, expected):
  assert normalize_answer(written) == expected


@pytest.mark.parametrize("written", [
    "x=2, y=3", "y = 3, x = 2", "x = 2 and y = 3", "x=2; y=3", "(x, y) = (2, 3)",
    "x = 4/2, y = 3.0", "X=2, Y=3",
])
def test_several_assignments_sorted_by_variable(written):
  assert normalize_answer(written) == "x=2,y=3"


def test_inconsistent_assignments_are_not_collapsed():
  # A repeated variable is not a clean solution; it must not vote with either value.
  assert normalize_answer("x=2, x=3") not in ("2", "3")


@pytest.mark.parametrize("written", [None, "", "   ", "$ $", "x =", "\\boxed{}"])
def test_empty_is_none(written):
  assert normalize_answer(written) is None


def test_huge_exponent_is_not_expanded():
  assert normalize_answer("1e999999") == "1e999999"


def test_canonical_answer_composes():
  assert canonical_answer("<think>...</think><answer>x = 0.25</answer>") == "1/4"
  assert canonical_answer("I give up") is None


def test_answer_ids_first_appearance_per_question():
  ids = math_answers.answer_ids([["1/2", "3", "1/2", None], ["7", None, "8", "8"]])
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, [[0, 1, 0, -1], [0, -1, 1, 1]])


def test_solver_messages_ask_for_tags():
  (message,) = math_answers.solver_messages("What is 2 + 2?")
  assert message["role"] == "user"
  assert message["content"].startswith("What is 2 + 2?")
  assert "<answer>" in message["content"] and "<think>" in message["content"]


# ------------------------------------------------------------ the reference trainer's answer


@pytest.mark.parametrize("text, expected", [
    ("<think>7*6</think> <answer>42</answer>", "42"),
    ("<answer> 042 </answer>", "042"),  # kept as written: "042" and "42" vote apart
    ("<answer>1</answer> then <answer>-7</answer>", "-7"),  # the last one
    ("<answer>5</answer> and <answer>\n6\n</answer>", "5"),  # a tag over lines never matches
])
def test_answer_parser_reference_keeps_the_raw_integer(text, expected):
  assert math_answers.reference_answer(text) == expected


@pytest.mark.parametrize("text", [
    "<answer>3/2</answer>", "<answer>1.5</answer>", "<answer>x=2, y=3</answer>",
    "<answer>\\boxed{5}</answer>", "<answer>1,234</answer>", "\\boxed{5}", "<ANSWER>5</ANSWER>",
    "<answer>5", "<answer>\n5\n</answer>", "",
])
def test_answer_parser_reference_counts_integers_only(text):
  assert math_answers.reference_answer(text) is None


def test_answer_parser_reference_votes_on_raw_strings_where_lenient_merges():
  texts = ["<answer>42</answer>", "<answer>042</answer>", "<answer>42.0</answer>"]
  assert [canonical_answer(t) for t in texts] == ["42", "42", "42"]
  assert [math_answers.reference_answer(t) for t in texts] == ["42", "042", None]
  ids = math_answers.answer_ids([[math_answers.reference_answer(t) for t in texts]])
  np.testing.assert_array_equal(ids, [[0, 1, -1]])
