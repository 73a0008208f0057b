"""The tiny addition topic's formats, and the bundled base checkpoint it ships with."""

import os

import sqlm_jax
from sqlm_jax.evals.datasets import addition_examples
from sqlm_jax.models import load_pretrained
from sqlm_jax.tasks import get_task, tiny_addition
from sqlm_jax.tasks.base import Proposal
from sqlm_jax.models.tokenizer import CharTokenizer, load_tokenizer


def test_question_and_answer_formats():
  assert tiny_addition.format_question(1234, 5678) == "4321+8765"
  assert tiny_addition.format_question(12, 7) == "2100+7000"
  assert tiny_addition.format_answer(6912) == "21960"
  assert tiny_addition.operands("4321+8765") == (1234, 5678)
  assert tiny_addition.operands("4321+876") is None


def test_parse_extract_truth_difficulty():
  task = get_task("tiny_addition")
  good = task.parse_proposal("4321+8765")
  assert good.question == "4321+8765"
  for bad in ("4321+87", "4321-8765", "", "4321+8765+1"):
    assert task.parse_proposal(bad).question is None, bad
  assert task.extract_answer("21960") == "6912"
  assert task.extract_answer("2196") == task.extract_answer("21960")  # padding zeros agree
  assert task.extract_answer("21x60") is None and task.extract_answer("") is None
  assert task.true_answer(good) == "6912"
  assert task.true_answer(Proposal(None)) is None
  assert task.difficulty(good) == 4.0 and task.difficulty(Proposal("2100+7000")) == 2.0
  assert CharTokenizer(tiny_addition.CHARS).format_chat(task.solver_messages(good)) == "4321+8765="


def test_heldout_answers_match_the_solver_format():
  task = get_task("tiny_addition")
  for example in addition_examples(50, seed=1):
    a, b = tiny_addition.operands(example["question"])
    assert example["answer"] == str(a + b)
    assert task.extract_answer(tiny_addition.format_answer(a + b)) == example["answer"]


def test_bundled_checkpoint_loads_with_its_tokenizer():
  path = os.path.join(os.path.dirname(sqlm_jax.__file__), "assets", "tiny_addition")
  config, params = load_pretrained(path)
  tokenizer = load_tokenizer(path)
  assert isinstance(tokenizer, CharTokenizer) and tokenizer.vocab_size == config.vocab_size
  assert config.model_type in ("llama", "qwen2") and config.num_params() < 5_000_000


def test_the_weak_config_is_the_default_on_the_weak_base():
  from sqlm_jax.config_base import load_config
  tiny, weak = load_config("tiny"), load_config("tiny_weak")
  assert os.path.basename(weak.model.path) == "tiny_addition_weak"
  config, _ = load_pretrained(weak.model.path)
  assert config.vocab_size == load_tokenizer(weak.model.path).vocab_size
  weak.model.path = tiny.model.path
  assert weak.to_dict() == tiny.to_dict()
