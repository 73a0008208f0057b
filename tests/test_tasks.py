"""Topic files: proposal parsing, ground truth on hand-worked questions, hostile input, get_task."""

import time

import pytest

from sqlm_jax.tasks import algebra, arithmetic, generic, get_task
from sqlm_jax.tasks.base import Proposal


def _question(text):
  return Proposal(question=text)


# --- arithmetic --------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("<question>What is 487 * 319?</question>", "What is 487 * 319?"),
    ("Sure!\n<question>  583 - 207 + 96  </question>", "583 - 207 + 96"),
    ("<question>old</question> <question>What is 12 + 3?</question>", "What is 12 + 3?"),
])
def test_arithmetic_parse_proposal(text, expected):
  assert arithmetic.parse_proposal(text) == Proposal(question=expected)


@pytest.mark.parametrize("text", [
    "What is 487 * 319?",  # no tags
    "<question>   </question>",
    "<question>What is 2 + 2",  # never closed
    "<question>What is 3 + 4 = 7</question>",  # gives the answer away
    "<question>What is 3 + 4? <answer>7</answer></question>",
    "<question>" + "1 + " * 200 + "1</question>",  # over-long
])
def test_arithmetic_unparseable_is_masked(text):
  proposal = arithmetic.parse_proposal(text)
  assert proposal.question is None and not proposal.valid


@pytest.mark.parametrize("question, expected", [
    ("What is 487 * 319?", "155353"),
    ("Compute: (12 + 345) × 7 - 89.", "2410"),
    ("487 x 319 = ?", "155353"),
    ("$487 \\times 319$", "155353"),
    ("What is 12 plus 34 times 2?", "80"),
    ("Calculate 1,234 / 2", "617"),
    ("What is 583 ÷ 11?", "53"),
    ("What is 100 / 8?", "25/2"),
    ("What is -5 - -3?", "-2"),
    ("What is 0.1 + 0.2?", "3/10"),  # exact, not 0.30000000000000004
    ("What is 2^10?", "1024"),
    ("evaluate (7 - 2) * (3 + 4)", "35"),
])
def test_arithmetic_true_answer(question, expected):
  assert arithmetic.true_answer(_question(question)) == expected


@pytest.mark.parametrize("question", [
    "Tom has 3 apples and buys 5 more. How many does he have?",  # word problem
    "What is the square of 12 + 3?",  # prefix changes the meaning: not a bare expression
    "What is 7 / 0?",
    "What is 3(4 + 5)?",  # implicit product would be a call in Python
    "What is 5 + ?",
])
def test_arithmetic_true_answer_none(question):
  assert arithmetic.true_answer(_question(question)) is None
  assert arithmetic.true_answer(Proposal(question=None)) is None


@pytest.mark.parametrize("expression", [
    "__import__('os')", "__import__('os').system('true')", "(1).__class__", "open('x')",
    "2**999999", "9**9**9", "10**12**2", "[1]*10**9", "lambda: 1", "1 if 1 else 2",
    "9" * 60 + " * 9", "-" * 150 + "1", "(" * 99 + "1" + ")" * 99 + " ** 100",
])
def test_safe_eval_rejects_unsafe(expression):
  start = time.perf_counter()
  assert arithmetic.safe_eval(expression) is None
  assert time.perf_counter() - start < 0.1


def test_safe_eval_allows_small_powers():
  assert str(arithmetic.safe_eval("2 ** 12 - 1")) == "4095"


def test_arithmetic_difficulty_is_longest_operand():
  assert arithmetic.difficulty(_question("What is 487 * 31?")) == 3.0
  assert arithmetic.difficulty(_question("What is 1,234 + 5?")) == 4.0
  assert arithmetic.difficulty(_question("What is two plus two?")) is None


def test_arithmetic_prompt_uses_topic():
  (message,) = arithmetic.proposer_messages("Two-digit subtraction")
  assert message["role"] == "user"
  assert "Two-digit subtraction" in message["content"] and "<question>" in message["content"]
  assert arithmetic.DEFAULT_TOPIC in arithmetic.proposer_messages("")[0]["content"]


# --- algebra -----------------------------------------------------------------------------


def test_algebra_selects_the_last_question():
  text = ("1. Ann is twice as old as Bo...\n2. A train...\n"
          "3. <question>Solve 3x + 2y = 12 and x - y = 1.</question>")
  assert algebra.parse_proposal(text).question == "Solve 3x + 2y = 12 and x - y = 1."
  marked = "1. first\n2. second\nSelected question: Solve 2x = 4\n\nSolution: x = 2"
  assert algebra.parse_proposal(marked).question == "Solve 2x = 4"
  assert algebra.parse_proposal("1. a\n2. b\n3. c").question is None


@pytest.mark.parametrize("question, expected", [
    ("Solve for x: 2x + 3 = 7.", "2"),
    ("If 2(x + 1) = 3x - 4, find x.", "6"),
    ("Solve 3x + 2y = 12 and x - y = 1.", "x=14/5,y=9/5"),
    ("3x + 2y = 12, x - y = 1. What is x?", "14/5"),  # asks for one unknown only
    ("Solve $\\frac{x}{3} + 1 = 2$.", "3"),
    ("Solve 0.5x = 3", "6"),
    ("The price p satisfies 5p − 3 = 2p + 9. What is p?", "4"),
    ("Solve 4m - 2n = 7 and 2m + 3n = -1 for m and n.", "m=19/16,n=-9/8"),
])
def test_algebra_true_answer(question, expected):
  assert algebra.true_answer(_question(question)) == expected


@pytest.mark.parametrize("question", [
    "Solve x + y = 2 and 2x + 2y = 4.",  # infinitely many solutions
    "Solve x + y = 2 and x + y = 3.",  # no solution
    "Solve 2x = 2x + 1.",  # no solution, one unknown
    "Solve 3x + 2y = 12.",  # one equation, two unknowns
    "Solve x^2 = 4.",  # not linear
    "Solve x*y = 4 and x = 1.",  # not linear
    "Solve 2xy = 4 and x = 1.",  # "xy" is prose to the tokenizer: the equation is cut
    "Let x = number of apples. Find x.",
    "x > 3 and x = 2",
    "Sam has twice as many apples as Kim; together they have 12. How many does Kim have?",
    "Solve __import__('os').system('true') = 1 for x",
    "Solve x + lambda = 1",
    "Solve x = 1, y = 2, z = 3, w = 4.",  # more unknowns than the bound
])
def test_algebra_true_answer_none(question):
  assert algebra.true_answer(_question(question)) is None


@pytest.mark.parametrize("equations", [
    ["__import__('os') = 1"], ["x.__class__ = 1"], ["exec(x) = 1"], ["x_1 = 1"],
    ["importx = 1"], ["(" * 200 + "x" + ")" * 200 + " = 1"],
])
def test_solve_linear_rejects_unsafe(equations):
  assert algebra.solve_linear(equations) is None


def test_algebra_difficulty_is_number_of_unknowns():
  assert algebra.difficulty(_question("Solve 2x + 3 = 7")) == 1.0
  assert algebra.difficulty(_question("Solve 3x + 2y = 12 and x - y = 1")) == 2.0
  assert algebra.difficulty(_question("No equations here.")) is None


# --- generic and get_task ----------------------------------------------------------------


def test_generic_task_uses_its_topic():
  task = generic.make_task("Probability puzzles")
  assert task.default_topic == "Probability puzzles"
  assert "Probability puzzles" in task.proposer_messages("")[0]["content"]
  assert "Dice" in task.proposer_messages("Dice")[0]["content"]
  assert task.parse_proposal("<question>Roll two dice...</question>").question == "Roll two dice..."
  assert task.parse_proposal("Roll two dice").question is None
  assert task.extract_answer("<answer>0.25</answer>") == "1/4"
  assert task.true_answer(Proposal(question="anything")) is None
  with pytest.raises(ValueError, match="topic"):
    generic.make_task("  ")


@pytest.mark.parametrize("name", ["arithmetic", "algebra", "generic"])
def test_get_task(name):
  task = get_task(name)
  assert task.name == name and task.reward_kind == "vote"
  proposal = task.parse_proposal("<question>What is 2 + 2?</question>")
  messages = task.solver_messages(proposal)
  assert messages[-1]["role"] == "user" and "What is 2 + 2?" in messages[-1]["content"]
  assert task.extract_answer("<think>2+2</think><answer>4</answer>") == "4"
  assert task.extract_answer("four") is None


def test_get_task_unknown_name_lists_valid_ones():
  with pytest.raises(ValueError, match="arithmetic, algebra, generic, coding"):
    get_task("geometry")


# --- generated questions (the no-proposer baseline) ---------------------------------------


def test_tiny_addition_generated_questions_are_proposer_questions_of_every_size():
  import collections
  import random
  from sqlm_jax.tasks import tiny_addition
  task = get_task("tiny_addition")
  rng = random.Random(0)
  proposals = [task.generate_question(rng) for _ in range(4000)]
  sizes = collections.Counter()
  for proposal in proposals:
    assert proposal == task.parse_proposal(proposal.question)  # what proposer output parses to
    a, b = tiny_addition.operands(proposal.question)
    assert task.true_answer(proposal) == str(a + b)
    assert task.solver_messages(proposal)[-1]["content"] == proposal.question + "="
    sizes[len(str(a)), len(str(b))] += 1
  # Each operand's size is uniform over 1..4 digits: 16 size pairs, ~250 of each.
  assert set(sizes) == {(i, j) for i in range(1, 5) for j in range(1, 5)}
  assert min(sizes.values()) > 180 and max(sizes.values()) < 320, sizes
  assert ([task.generate_question(random.Random(5)) for _ in range(3)]
          == [task.generate_question(random.Random(5)) for _ in range(3)])


def test_arithmetic_generated_questions_parse_and_solve_like_proposals():
  import collections
  import random
  task = get_task("arithmetic")
  rng = random.Random(1)
  operators = collections.Counter()
  for _ in range(600):
    proposal = task.generate_question(rng)
    assert proposal == task.parse_proposal(f"<question>{proposal.question}</question>")
    a, operator, b = proposal.question.removeprefix("What is ").removesuffix("?").split()
    assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
    expected = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[operator]
    assert task.true_answer(proposal) == str(expected)
    assert task.difficulty(proposal) == 3.0
    assert proposal.question in task.solver_messages(proposal)[-1]["content"]
    operators[operator] += 1
  assert set(operators) == {"+", "-", "*"} and min(operators.values()) > 150


def test_tasks_without_a_generator_say_so():
  assert get_task("algebra").generate_question is None
  assert get_task("generic").generate_question is None


def test_tiny_addition_paraphrase_swaps_the_operands_and_keeps_the_answer():
  import random
  from sqlm_jax.tasks import tiny_addition
  task = get_task("tiny_addition")
  rng = random.Random(0)
  for _ in range(200):
    question = task.generate_question(rng)
    swapped = task.paraphrase(question)
    a, b = tiny_addition.operands(question.question)
    assert swapped.valid and tiny_addition.operands(swapped.question) == (b, a)
    assert task.true_answer(swapped) == task.true_answer(question)
  assert get_task("generic").paraphrase is None


# --------------------------------------------------- the paraphrase guard on the paper's topics


@pytest.mark.parametrize("name, task", [("multiplication3", arithmetic),
                                        ("linear_equations", algebra)])
def test_paraphrase_keeps_the_true_answer_on_the_heldout_questions(name, task):
  from sqlm_jax.evals import datasets
  examples = datasets.load_heldout(name)
  changed = 0
  for example in examples:
    proposal = Proposal(example["question"])
    reasked = task.paraphrase(proposal)
    assert task.true_answer(reasked) == task.true_answer(proposal) is not None, example
    changed += reasked.question != proposal.question
  # Only "What is 166 * 166?" reads the same with its operands swapped.
  assert changed >= len(examples) - 1, (changed, len(examples))


@pytest.mark.parametrize("question, reasked", [
    ("What is 487 * 319?", "What is 319 * 487?"),
    ("What is 500 - 123?", "What is -(123 - 500)?"),
    ("Compute 84 / 7.", "What is -84 / -7?"),
    ("What is 10 - 3 + 2?", "What is 2 + (10 - 3)?"),  # precedence kept: the top "+" swapped
    ("Calculate 2 ** 10", "Calculate 2 ** 10"),  # no commutative top operation: asked again
    ("A shop sells 12 pens a day. How many in 31 days?",
     "A shop sells 12 pens a day. How many in 31 days?"),  # a word problem: asked again
])
def test_arithmetic_paraphrase_forms(question, reasked):
  assert arithmetic.paraphrase(Proposal(question)).question == reasked
  assert arithmetic.true_answer(Proposal(reasked)) == arithmetic.true_answer(Proposal(question))


def test_algebra_paraphrase_swaps_every_written_equation():
  question = "Solve the system of equations for x and y: 3x + 2y = 12 and x - y = -1."
  reasked = algebra.paraphrase(Proposal(question)).question
  assert reasked == "Solve the system of equations for x and y: 12 = 3x + 2y and -1 = x - y."
  assert algebra.true_answer(Proposal(reasked)) == "x=2,y=3"
  word = "Ann is twice as old as Bo. Together they are 36. How old is Bo?"
  assert algebra.paraphrase(Proposal(word)).question == word


# ------------------------------------------------------------ the reference's proposal format


def test_reference_format_malformed_never_happens_in_arithmetic():
  task = get_task("arithmetic", "reference")
  assert task.parse_proposal("  What is 12 * 34?\n").question == "What is 12 * 34?"
  assert task.parse_proposal("Sure! Here is one: 12 * 34").question == "Sure! Here is one: 12 * 34"
  content = task.solver_messages(Proposal("What is 12 * 34?"))[0]["content"]
  assert content.startswith("Reason step by step") and content.endswith("What is 12 * 34?")
  assert "<think>" in content and "<answer>" in content


def test_reference_format_algebra_takes_the_text_after_the_last_marker():
  task = get_task("algebra", "reference")
  text = "1. A\n2. B\n3. C\nSelected Question: Solve 2x + 1 = 7."
  assert task.parse_proposal(text).question == "Solve 2x + 1 = 7."
  assert task.parse_proposal("Selected Question: A. Selected Question: B").question == "B"
  # No marker (the reference's malformed case, trained on): the whole reply is the question.
  assert task.parse_proposal("Solve 3y = 9.").question == "Solve 3y = 9."
  assert task.parse_proposal("selected question: lower case").question == \
      "selected question: lower case"  # case-sensitive, as the reference's split
  with pytest.raises(ValueError, match="task 'generic' has no reference proposal format"):
    get_task("generic", "reference")
