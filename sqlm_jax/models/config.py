"""The decoder's hyper-parameters, read from (and written back to) a Hugging Face config.json."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the forward pass needs. Frozen and hashable, so it can be a static jit argument."""

  model_type: str = "qwen2"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  # RoPE scaling as a sorted tuple of (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
  rope_scaling: tuple = ()
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2: biases on q/k/v projections.
  o_bias: bool = False  # Llama with attention_bias=True: bias on o_proj too.
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE.
  bos_token_id: Optional[int] = None
  eos_token_id: tuple = ()
  pad_token_id: Optional[int] = None
  # Numerics: parameters are stored in param_dtype, matmuls run in dtype; norms/softmax in float32.
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False  # Recompute each layer's activations in the backward pass (saves memory).

  @property
  def rope_type(self) -> str:
    return dict(self.rope_scaling).get("rope_type", "default")

  def replace(self, **kwargs) -> "ModelConfig":
    return dataclasses.replace(self, **kwargs)

  def num_params(self) -> int:
    e, f, l = self.hidden_size, self.intermediate_size, self.num_layers
    h, k, d = self.num_heads, self.num_kv_heads, self.head_dim
    attn = e * d * (2 * h + 2 * k)
    per_layer = attn + 3 * e * f + 2 * e + (2 * d if self.qk_norm else 0)
    per_layer += (h + 2 * k) * d if self.qkv_bias else 0
    embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
    return l * per_layer + embed + e

  # ---- Hugging Face config.json <-> ModelConfig -------------------------------------------------

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str = "config.json", **overrides) -> "ModelConfig":
    """Builds a config from a Hugging Face config dict; errors name the file and field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"{source}: model_type={model_type!r} is not supported; sqlm_jax supports "
          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama, Qwen2/2.5, Qwen3 checkpoints).")

    def field(name, default=dataclasses.MISSING):
      if name in hf and hf[name] is not None:
        return hf[name]
      if default is dataclasses.MISSING:
        raise ValueError(f"{source}: required field {name!r} is missing.")
      return default

    hidden = int(field("hidden_size"))
    heads = int(field("num_attention_heads"))
    head_dim = int(field("head_dim", hidden // heads))
    # transformers >= 5 writes rope_parameters (with rope_theta inside); older files rope_theta + rope_scaling.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    if "type" in rope and "rope_type" not in rope:
      rope["rope_type"] = rope.pop("type")
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
      raise ValueError(f"{source}: rope type {rope_type!r} (rope_scaling/rope_parameters) is not "
                       f"supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}.")
    if rope_type == "default":
      rope = {}
    if hf.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not supported; set it to false "
                       "(Qwen2 checkpoints train and sample with full attention).")
    eos = hf.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    attention_bias = bool(hf.get("attention_bias", False))
    values = dict(
        model_type=model_type,
        vocab_size=int(field("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(field("intermediate_size")),
        num_layers=int(field("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(field("num_key_value_heads", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(field("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=tuple(sorted(rope.items())),
        max_position_embeddings=int(field("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=hf.get("pad_token_id"),
    )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r} is not supported; only 'silu' (SwiGLU) is.")
    if heads % values["num_kv_heads"]:
      raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of "
                       f"num_key_value_heads={values['num_kv_heads']}.")
    values.update(overrides)
    return cls(**values)

  @classmethod
  def from_pretrained(cls, path: str, **overrides) -> "ModelConfig":
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{file} not found: a checkpoint folder needs a Hugging Face "
                              "config.json next to its model*.safetensors files.")
    with open(file) as f:
      return cls.from_hf_dict(json.load(f), source=file, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    rope = {"rope_type": "default", **dict(self.rope_scaling), "rope_theta": self.rope_theta}
    hf = {
        "architectures": [_ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": None if self.rope_type == "default" else {k: v for k, v in rope.items()
                                                                   if k != "rope_theta"},
        "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
        "pad_token_id": self.pad_token_id,
        "torch_dtype": self.param_dtype,
    }
    if self.model_type == "llama":
      hf["attention_bias"] = self.qkv_bias
      hf["mlp_bias"] = self.mlp_bias
    if self.model_type == "qwen3":
      hf["attention_bias"] = self.qkv_bias
    if self.model_type in ("qwen2", "qwen3"):
      hf["use_sliding_window"] = False
    return hf
