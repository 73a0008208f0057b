"""Tiny random Hugging Face checkpoints (with a word-level tokenizer and chat template) for tests."""

from __future__ import annotations


TINY_SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)

# Qwen-style chat template, small enough for a tiny vocabulary.
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hf_config(model_type: str, **overrides):
  from transformers import LlamaConfig, Qwen2Config, Qwen3Config
  cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
  kwargs = dict(TINY_SIZES, eos_token_id=1, pad_token_id=0, bos_token_id=None)
  kwargs.update(overrides)
  return cls(**kwargs)


def save_random_checkpoint(path, model_type: str = "qwen2", seed: int = 0, with_tokenizer=True,
                           **overrides) -> str:
  """Saves a transformers model with every weight random (biases and norms too) and a tokenizer."""
  import torch
  from transformers import AutoModelForCausalLM
  torch.manual_seed(seed)
  model = AutoModelForCausalLM.from_config(hf_config(model_type, **overrides))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.2)
  path = str(path)
  model.save_pretrained(path)
  if with_tokenizer:
    save_word_tokenizer(path, model.config.vocab_size)
  return path


def save_word_tokenizer(path: str, vocab_size: int) -> None:
  """A byte-level BPE tokenizer without merges (one token per character), like Qwen's and Llama 3's.

  Byte-level, because transformers picks the tokenizer class from config.json's model_type and
  Qwen2Tokenizer rebuilds a byte-level pre-tokenizer whatever tokenizer.json says.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast
  byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # The 256 printable stand-ins for bytes.
  specials = ["<pad>", "<|im_end|>", "<|im_start|>", "<unk>"]
  text = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;?!+-*/=()<>{}[]_|'\"\\$%^&#@~`"
  mapping = _bytes_to_unicode()
  chars = [mapping[ord(c)] for c in text]
  assert set(chars) <= set(byte_to_char)
  vocab = {tok: i for i, tok in enumerate(specials + chars[:vocab_size - len(specials)])}
  tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                 unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(path)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))
