"""The tokenizer interface over a checkpoint's HF tokenizer and over the char vocabulary."""

import pytest

from sqlm_jax.models.tokenizer import CharTokenizer, encode_chat, load_tokenizer


def test_hf_tokenizer_round_trip_and_chat_template(qwen2_dir):
  tok = load_tokenizer(qwen2_dir)
  text = "Solve 3x + 2 = 11.\n<answer>3</answer>"
  assert tok.decode(tok.encode(text)) == text
  prompt = tok.format_chat([{"role": "user", "content": "hi"}])
  assert prompt.endswith("<|im_start|>assistant\n") and "hi" in prompt
  assert tok.stop_ids == (1,) and tok.pad_id == 0
  ids = encode_chat(tok, [{"role": "user", "content": "hi"}])
  assert ids[0] == 2  # <|im_start|> is one special token, not characters.


def test_char_tokenizer_save_load(tmp_path):
  tok = CharTokenizer("0123456789+=?")
  tok.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, CharTokenizer)
  ids = loaded.encode("12+7=")
  assert ids == [3, 4, 12, 9, 13] and loaded.decode(ids + [loaded.eos_id, 0]) == "12+7="
  assert loaded.format_chat([{"role": "user", "content": "1+1="}]) == "1+1="
  assert loaded.stop_ids == (1,)


def test_char_tokenizer_names_unknown_character():
  with pytest.raises(ValueError, match="'x'"):
    CharTokenizer("0123").encode("1x")


def test_missing_tokenizer_names_the_folder(tmp_path):
  with pytest.raises(ValueError, match=str(tmp_path)):
    load_tokenizer(str(tmp_path))
