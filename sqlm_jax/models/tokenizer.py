"""One small tokenizer interface over a checkpoint's Hugging Face tokenizer or a character vocabulary.

`load_tokenizer(path)` picks the character tokenizer when `char_tokenizer.json` sits in the
checkpoint folder (the tiny CPU models), else the checkpoint's own tokenizer and chat template
through transformers.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  stop_ids: tuple[int, ...]  # Generation stops at any of these (eos, end-of-turn).

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def format_chat(self, messages: list[dict]) -> str:
    """Messages -> prompt text, ending where the assistant's reply begins."""


class HFTokenizer:
  """The checkpoint's own tokenizer and chat template, loaded from its folder."""

  def __init__(self, path: str):
    from transformers import AutoTokenizer  # Imported here: slow, and unused by char models.
    try:
      self._tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types; say which folder and what it needs.
      raise ValueError(f"Could not load a Hugging Face tokenizer from {path!r} ({e}). The folder "
                       "needs tokenizer.json (or the files of its tokenizer class) and "
                       f"tokenizer_config.json, or a {CHAR_TOKENIZER_FILE} for a char model.") from e
    stops = set()
    for token_id in (self._tok.eos_token_id, self._tok.convert_tokens_to_ids("<|im_end|>"),
                     self._tok.convert_tokens_to_ids("<|eot_id|>"),
                     self._tok.convert_tokens_to_ids("<|endoftext|>")):
      if isinstance(token_id, int) and token_id != self._tok.unk_token_id and token_id >= 0:
        stops.add(token_id)
    generation_config = os.path.join(path, "generation_config.json")
    if os.path.isfile(generation_config):
      with open(generation_config) as f:
        eos = json.load(f).get("eos_token_id")
      stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if not stops:
      raise ValueError(f"The tokenizer in {path!r} has no eos token; set eos_token in "
                       "tokenizer_config.json so generation knows where to stop.")
    self.stop_ids = tuple(sorted(stops))
    pad = self._tok.pad_token_id
    self.pad_id = int(pad if pad is not None else self.stop_ids[0])
    self.vocab_size = len(self._tok)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def format_chat(self, messages: list[dict]) -> str:
    if self._tok.chat_template:
      return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: plain text, roles dropped.
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


class CharTokenizer:
  """Character-level vocabulary for tiny CPU models: <pad>=0, <eos>=1, then one id per char."""

  PAD, EOS = "<pad>", "<eos>"

  def __init__(self, chars: str):
    if len(set(chars)) != len(chars):
      raise ValueError(f"CharTokenizer: duplicate characters in {chars!r}.")
    self.chars = chars
    self._ids = {c: i + 2 for i, c in enumerate(chars)}
    self.pad_id, self.eos_id = 0, 1
    self.stop_ids = (self.eos_id,)
    self.vocab_size = len(chars) + 2

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[c] for c in text]
    except KeyError as e:
      raise ValueError(f"Character {e.args[0]!r} is not in this char vocabulary "
                       f"{self.chars!r}.") from None

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[i - 2] for i in ids if i >= 2)

  def format_chat(self, messages: list[dict]) -> str:
    # Tiny models are pretrained on raw task text: the prompt is the messages' text itself.
    return "".join(m["content"] for m in messages)

  def save(self, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CHAR_TOKENIZER_FILE), "w") as f:
      json.dump({"chars": self.chars}, f)


def load_tokenizer(path: str) -> "Tokenizer":
  char_file = os.path.join(path, CHAR_TOKENIZER_FILE)
  if os.path.isfile(char_file):
    with open(char_file) as f:
      return CharTokenizer(json.load(f)["chars"])
  return HFTokenizer(path)


def encode_chat(tokenizer: "Tokenizer", messages: list[dict]) -> list[int]:
  """Chat messages -> prompt token ids through the tokenizer's chat format."""
  return tokenizer.encode(tokenizer.format_chat(messages))
