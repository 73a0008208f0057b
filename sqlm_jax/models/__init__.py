"""Decoder models (Llama / Qwen2 / Qwen3) and Hugging Face checkpoint I/O."""

from sqlm_jax.models.config import ModelConfig
from sqlm_jax.models.hf import load_pretrained, read_config, save_pretrained
from sqlm_jax.models.transformer import (forward, forward_with_cache, init_cache, init_params,
                                         param_logical_axes, positions_from_mask)
