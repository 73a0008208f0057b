"""Hugging Face checkpoints (config.json + safetensors) <-> (ModelConfig, parameter pytree).

No torch: safetensors files are memory-mapped and read tensor by tensor, each converted into
its slot of the stacked (scanned) layer arrays. Loaded onto a mesh, each device's shard is read
on its own, so no host holds more than a shard of a large model at a time.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_dtypes
import numpy as np

from sqlm_jax.models import transformer
from sqlm_jax.models.config import ModelConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}

# HF tensor name -> (our path, how to convert HF's [out, in] layout into ours).
# Per-layer names carry {i}; `None` conversion means copy as is.
_LAYER = "model.layers.{i}."


def _hf_table(config: ModelConfig) -> dict[str, tuple[tuple[str, ...], str]]:
  a = ("layers", "self_attn")
  table = {
      "model.embed_tokens.weight": (("embed_tokens",), "copy"),
      "model.norm.weight": (("norm", "scale"), "copy"),
      _LAYER + "input_layernorm.weight": (("layers", "input_layernorm", "scale"), "copy"),
      _LAYER + "post_attention_layernorm.weight": (("layers", "post_attention_layernorm", "scale"), "copy"),
      _LAYER + "self_attn.q_proj.weight": (a + ("q_proj",), "in_heads"),
      _LAYER + "self_attn.k_proj.weight": (a + ("k_proj",), "in_heads"),
      _LAYER + "self_attn.v_proj.weight": (a + ("v_proj",), "in_heads"),
      _LAYER + "self_attn.o_proj.weight": (a + ("o_proj",), "heads_out"),
      _LAYER + "mlp.gate_proj.weight": (("layers", "mlp", "gate_proj"), "transpose"),
      _LAYER + "mlp.up_proj.weight": (("layers", "mlp", "up_proj"), "transpose"),
      _LAYER + "mlp.down_proj.weight": (("layers", "mlp", "down_proj"), "transpose"),
  }
  if not config.tie_word_embeddings:
    table["lm_head.weight"] = (("lm_head",), "transpose")
  if config.qkv_bias:
    for n in "qkv":
      table[_LAYER + f"self_attn.{n}_proj.bias"] = (a + (f"{n}_bias",), "reshape")
  if config.o_bias:
    table[_LAYER + "self_attn.o_proj.bias"] = (a + ("o_bias",), "copy")
  if config.qk_norm:
    table[_LAYER + "self_attn.q_norm.weight"] = (a + ("q_norm", "scale"), "copy")
    table[_LAYER + "self_attn.k_norm.weight"] = (a + ("k_norm", "scale"), "copy")
  if config.mlp_bias:
    for n in ("gate", "up", "down"):
      table[_LAYER + f"mlp.{n}_proj.bias"] = (("layers", "mlp", f"{n}_bias"), "copy")
  return table


def _to_ours(hf: np.ndarray, how: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if how == "in_heads":  # [H*D, E] -> [E, H, D]
    return hf.T.reshape(target_shape)
  if how == "heads_out":  # [E, H*D] -> [H, D, E]
    return hf.T.reshape(target_shape)
  if how == "transpose":
    return hf.T
  return hf.reshape(target_shape)


def _to_hf(ours: np.ndarray, how: str) -> np.ndarray:
  if how == "in_heads":  # [E, H, D] -> [H*D, E]
    return ours.reshape(ours.shape[0], -1).T
  if how == "heads_out":  # [H, D, E] -> [E, H*D]
    return ours.reshape(-1, ours.shape[-1]).T
  if how == "transpose":
    return ours.T
  if how == "reshape":
    return ours.reshape(-1)
  return ours


# ---- safetensors, memory-mapped -------------------------------------------------------------------


def _read_safetensors_index(path: str) -> dict[str, str]:
  """Maps every tensor name to the file that holds it (single file or sharded with an index)."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    return {name: single for name in _safetensors_header(single)[0]}
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {name: os.path.join(path, file) for name, file in weight_map.items()}
    for file in set(files.values()):
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} is listed in {index} but does not exist.")
    return files
  raise FileNotFoundError(
      f"No weights in {path}: expected model.safetensors or model.safetensors.index.json with "
      "its model-0000x-of-0000y.safetensors shards (PyTorch .bin checkpoints are not read; "
      "convert them with transformers' save_pretrained(..., safe_serialization=True)).")


def _safetensors_header(file: str) -> tuple[dict[str, Any], int]:
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return header, 8 + n


def _mmap_tensor(maps: dict, file: str, info: dict, offset: int) -> np.ndarray:
  """One tensor of a safetensors file, memory-mapped: nothing is read until it is sliced."""
  if file not in maps:
    maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
  start, end = info["data_offsets"]
  return maps[file][offset + start:offset + end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def load_pretrained(path: str, dtype: str | None = None, param_dtype: str | None = None,
                    shardings=None, **config_overrides) -> tuple[ModelConfig, dict]:
  """Reads a Hugging Face checkpoint folder into (config, params).

  Without `shardings`, params are numpy arrays. With a tree of NamedShardings (see
  `sharding.param_shardings`), each leaf is built by `jax.make_array_from_callback`: every
  device's shard is read straight from the memory-mapped files, so no host or device ever
  holds a whole unsharded copy. param_dtype defaults to the checkpoint's torch_dtype (float32
  when absent); dtype (compute) defaults to param_dtype.
  """
  config = read_config(path, dtype, param_dtype, **config_overrides)
  sources = _tensor_sources(path, config)
  shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  target_dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
  maps = {}  # file -> np.memmap, for this load only

  def leaf(key_path, shape, sharding=None):
    entries = sources[tuple(k.key for k in key_path)]
    read = lambda index: _read(maps, entries, shape.shape, index, target_dtype)
    if sharding is None:
      return read((slice(None),) * len(shape.shape))
    return jax.make_array_from_callback(shape.shape, sharding, read, dtype=target_dtype)

  if shardings is None:
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
  else:
    params = jax.tree_util.tree_map_with_path(leaf, shapes, shardings)
  maps.clear()
  return config, params


def read_config(path: str, dtype: str | None = None, param_dtype: str | None = None,
                **config_overrides) -> ModelConfig:
  """The ModelConfig of a checkpoint folder (only its config.json is read)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Checkpoint folder {path!r} does not exist.")
  config_file = os.path.join(path, "config.json")
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file} not found: a checkpoint folder needs a Hugging Face "
                            "config.json next to its model*.safetensors files.")
  with open(config_file) as f:
    hf_config = json.load(f)
  stored = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
  param_dtype = param_dtype or (stored if stored in ("float32", "bfloat16") else "float32")
  return ModelConfig.from_hf_dict(hf_config, source=config_file, param_dtype=param_dtype,
                                  dtype=dtype or param_dtype, **config_overrides)


def _tensor_sources(path: str, config: ModelConfig) -> dict:
  """Our leaf path -> [(file, name, header entry, data offset, conversion)] per layer (one entry
  for unstacked leaves), checked against the safetensors headers before any data is read."""
  shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  leaf_shapes = {tuple(k.key for k in p): s.shape
                 for p, s in jax.tree_util.tree_leaves_with_path(shapes)}
  sources = {target: [None] * (config.num_layers if target[0] == "layers" else 1)
             for target in leaf_shapes}
  patterns = {re.compile(re.escape(name).replace(r"\{i\}", r"(\d+)") + "$"): spec
              for name, spec in _hf_table(config).items()}
  files = _read_safetensors_index(path)
  for file in sorted(set(files.values())):
    header, offset = _safetensors_header(file)
    for name, info in header.items():
      for pattern, (target, how) in patterns.items():
        match = pattern.match(name)
        if match:
          break
      else:
        if name == "lm_head.weight" and config.tie_word_embeddings:
          continue  # Some tied checkpoints store the head anyway; it equals the embedding.
        if re.search(r"rotary_emb\.inv_freq$", name):
          continue
        raise ValueError(f"{file}: unexpected tensor {name!r} for model_type={config.model_type!r} "
                         "(is config.json from the same checkpoint?).")
      if info["dtype"] not in _DTYPES:
        raise ValueError(f"{file}: tensor {name} has dtype {info['dtype']}, which is not supported.")
      slot = 0
      slot_shape = leaf_shapes[target]
      if match.groups():
        slot = int(match.group(1))
        if slot >= config.num_layers:
          raise ValueError(f"{file}: tensor {name} is for layer {slot} but config.json has "
                           f"num_hidden_layers={config.num_layers}.")
        slot_shape = slot_shape[1:]
      expected = _to_hf(np.empty(slot_shape, np.uint8), how).shape
      if tuple(info["shape"]) != tuple(expected):
        raise ValueError(f"{file}: tensor {name} has shape {tuple(info['shape'])} but config.json "
                         f"implies {tuple(expected)}; check hidden_size / num_attention_heads / "
                         "num_key_value_heads / head_dim / intermediate_size / vocab_size.")
      sources[target][slot] = (file, name, info, offset, how, slot_shape)
  missing = ["['" + "']['".join(t) + "']" for t, entries in sources.items()
             if any(e is None for e in entries)]
  if missing:
    raise ValueError(f"{path}: the safetensors files lack weights for {', '.join(missing)} "
                     f"(model_type={config.model_type}, num_hidden_layers={config.num_layers}).")
  return sources


def _read(maps, entries, shape, index, dtype) -> np.ndarray:
  """The block `index` of one of our leaves, read from its memory-mapped HF tensors."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))

  def one(entry, rest):
    file, name, info, offset, how, slot_shape = entry
    return _to_ours(_mmap_tensor(maps, file, info, offset), how, slot_shape)[rest].astype(dtype)

  if len(entries) == 1 and len(shape) == len(entries[0][5]):  # Not stacked over layers.
    return one(entries[0], index)
  layers = range(*index[0].indices(shape[0]))
  return np.stack([one(entries[i], index[1:]) for i in layers])


def save_pretrained(path: str, config: ModelConfig, params: dict, dtype: str | None = None) -> None:
  """Writes config.json + model.safetensors that transformers' AutoModelForCausalLM loads."""
  os.makedirs(path, exist_ok=True)
  out_dtype = np.dtype(jax.numpy.dtype(dtype or config.param_dtype))
  tensors = {}
  for template, (target, how) in _hf_table(config).items():
    leaf = params
    for key in target:
      leaf = leaf[key]
    leaf = np.asarray(jax.device_get(leaf)).astype(out_dtype)
    if "{i}" in template:
      for i in range(config.num_layers):
        tensors[template.format(i=i)] = np.ascontiguousarray(_to_hf(leaf[i], how))
    else:
      tensors[template] = np.ascontiguousarray(_to_hf(leaf, how))
  hf_config = config.to_hf_dict()
  hf_config["torch_dtype"] = str(out_dtype) if out_dtype != ml_dtypes.bfloat16 else "bfloat16"
  _write_safetensors(os.path.join(path, "model.safetensors"), tensors)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)


def _write_safetensors(file: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for name, t in tensors.items():
    header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                    "data_offsets": [offset, offset + t.nbytes]}
    offset += t.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Keeps tensor data 8-byte aligned, as safetensors does.
  tmp = file + ".tmp"
  with open(tmp, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for t in tensors.values():
      f.write(t.tobytes())
  os.replace(tmp, file)  # Never leaves a half-written checkpoint behind.
