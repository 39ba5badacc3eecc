"""Reading umT5 encoder weights in the layouts users hold, and the project's converted format.

* Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (a torch pickle of the encoder's state dict; needs
  torch): ``token_embedding``, ``blocks.N.{norm1, attn.{q,k,v,o}, norm2, ffn.{gate.0, fc1, fc2},
  pos_embedding.embedding}``, ``norm``; the architecture is read from the shapes;
* Hugging Face ``UMT5EncoderModel`` (or a whole ``UMT5Model``, whose decoder is ignored): a
  ``config.json`` and ``model*.safetensors`` (sharded with an index, or one file);
* afd_jax's converted format: ``afd_umt5.json`` + an Orbax ``params/`` tree (``save_converted``).

Both layouts are mapped to Wan's names, checked together (missing, unexpected and mis-shaped keys
in one error), transposed to the NNX layout and stacked on a leading layer axis.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from afd_jax import errors
from afd_jax.models import weights
from afd_jax.models.weights import CheckpointError

if TYPE_CHECKING:  # the encoder imports this module to load itself, never the other way round
  from afd_jax.models import umt5

CONVERTED_MARKER = "afd_umt5.json"
FORMAT_NAME, FORMAT_VERSION = "afd_jax.umt5", 1
CONVERT = "python -m afd_jax.tools.convert_umt5 SRC DST"

# Hugging Face -> Wan names.
_HF_TO_WAN = [
    (r"^(shared|encoder\.embed_tokens)\.weight$", "token_embedding.weight"),
    (r"^encoder\.final_layer_norm\.", "norm."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
]

# Wan name (block names relative to ``blocks.N.``) -> (NNX path, transposed).
_TOP = {"token_embedding.weight": (("token_embedding", "embedding"), False),
        "norm.weight": (("norm", "scale"), False)}
_BLOCK = {"norm1.weight": (("norm1", "scale"), False), "norm2.weight": (("norm2", "scale"), False),
          "pos_embedding.embedding.weight": (("attn", "relative_bias"), False),
          "ffn.gate.0.weight": (("gate", "kernel"), True),
          "ffn.fc1.weight": (("fc1", "kernel"), True), "ffn.fc2.weight": (("fc2", "kernel"), True),
          **{f"attn.{p}.weight": (("attn", p, "kernel"), True) for p in "qkvo"}}


def hf_to_wan(key: str) -> str:
  for pattern, repl in _HF_TO_WAN:
    key = re.sub(pattern, repl, key)
  return key


def config_from_hf(cfg_json: dict, source) -> dict:
  if cfg_json.get("model_type") not in ("umt5", None):
    raise CheckpointError(f"{source}: model_type {cfg_json.get('model_type')!r} is not umT5 (T5 "
                          "shares one position bias across layers; Wan's encoder is umT5).")
  if cfg_json.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
    raise CheckpointError(f"{source}: feed_forward_proj {cfg_json['feed_forward_proj']!r}; umT5 as "
                          "Wan uses it is gated-gelu.")
  return {"vocab_size": cfg_json["vocab_size"], "dim": cfg_json["d_model"],
          "num_heads": cfg_json["num_heads"], "head_dim": cfg_json["d_kv"],
          "ffn_dim": cfg_json["d_ff"], "num_layers": cfg_json["num_layers"],
          "num_buckets": cfg_json.get("relative_attention_num_buckets", 32),
          "max_distance": cfg_json.get("relative_attention_max_distance", 128),
          "eps": cfg_json.get("layer_norm_epsilon", 1e-6)}


def config_from_shapes(sd: dict[str, np.ndarray], source) -> dict:
  try:
    vocab, dim = sd["token_embedding.weight"].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    return {"vocab_size": vocab, "dim": dim, "num_layers": layers, "num_buckets": buckets,
            "num_heads": heads, "head_dim": sd["blocks.0.attn.q.weight"].shape[0] // heads,
            "ffn_dim": sd["blocks.0.ffn.fc1.weight"].shape[0]}
  except (KeyError, ValueError) as e:
    raise CheckpointError(f"{source}: cannot read a umT5 encoder from its tensor names (missing "
                          f"{e}); is this Wan's models_t5_umt5-xxl-enc-bf16.pth?") from e


def read_state_dict(path) -> tuple[dict[str, np.ndarray], dict]:
  """``(state dict with Wan's names, architecture)`` of any supported non-converted layout."""
  path = Path(path)
  if not path.exists():
    raise errors.MissingInput(f"umT5 checkpoint {path} does not exist.")
  if path.is_dir():
    if not (path / "config.json").exists():
      raise CheckpointError(f"{path} has neither {CONVERTED_MARKER} nor a Hugging Face "
                            "config.json; give Wan's .pth file, a UMT5EncoderModel folder or a "
                            "converted folder.")
    arch = config_from_hf(weights.read_json(path / "config.json"), path)
    files = weights.safetensor_files(path)
    if not files:
      raise CheckpointError(f"{path} holds no *.safetensors weights.")
    sd = {}
    for f in files:
      sd.update(weights.read_safetensors(f))
    sd = {hf_to_wan(k): v for k, v in sd.items() if not k.startswith(("decoder.", "lm_head."))}
    return sd, arch
  if path.suffix == ".safetensors":
    sd = weights.read_safetensors(path)
  else:
    sd = weights.read_torch(path, convert=CONVERT)
  sd = {hf_to_wan(k): v for k, v in sd.items()}
  return sd, config_from_shapes(sd, path)


def state_from_wan(sd: dict[str, np.ndarray], cfg: umt5.UMT5Config, state, source) -> dict:
  """Checks a Wan-named state dict against ``cfg`` and the encoder's abstract ``state`` and
  builds the NNX pure dict (stacked)."""
  shapes = {tuple(map(str, p)): v.shape for p, v in nnx.to_flat_state(state)}
  plan = {k: (path, t, None) for k, (path, t) in _TOP.items()}
  for i in range(cfg.num_layers):
    plan.update({f"blocks.{i}.{k}": (("blocks",) + path, t, i) for k, (path, t) in _BLOCK.items()})
  missing = sorted(set(plan) - set(sd))
  unexpected = sorted(set(sd) - set(plan))
  mismatched = []
  for key in sorted(set(plan) & set(sd)):
    path, transposed, layer = plan[key]
    want = shapes[path][1:] if layer is not None else shapes[path]
    want = tuple(reversed(want)) if transposed else tuple(want)
    if tuple(sd[key].shape) != want:
      mismatched.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {want}")
  if missing or unexpected or mismatched:
    raise CheckpointError(f"{source} does not match the umT5 config (dim={cfg.dim}, "
                          f"layers={cfg.num_layers}, heads={cfg.num_heads}); "
                          + weights.key_problems(missing, unexpected, mismatched))
  pdt = jnp.dtype(cfg.param_dtype)
  flat, stacks = {}, {}
  for key, (path, transposed, layer) in plan.items():
    arr = np.asarray(sd[key])
    arr = (arr.T if transposed else arr).astype(pdt)
    if layer is None:
      flat[path] = arr
    else:
      stacks.setdefault(path, [None] * cfg.num_layers)[layer] = arr
  flat.update({path: np.stack(arrs) for path, arrs in stacks.items()})
  return traverse_util.unflatten_dict(flat)


def locate(path) -> weights.Found:
  """Any supported layout at ``path``: its architecture and a reader of its weights (see
  :func:`afd_jax.models.umt5.from_pretrained`)."""
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    path = path.absolute()
    meta = weights.read_marker(path, CONVERTED_MARKER, FORMAT_NAME, FORMAT_VERSION)
    return weights.Found(meta["config"], lambda cfg, state, shardings: weights.read_orbax_into(
        path, state, cfg.param_dtype, shardings))
  sd, arch = read_state_dict(path)
  return weights.Found(arch, lambda cfg, state, shardings: weights.place(
      weights.check_finite(state_from_wan(sd, cfg, state, path), path), state, shardings))


def save_converted(encoder: umt5.UMT5Encoder, dst, source: str = "") -> Path:
  """Writes ``encoder`` as ``dst/params`` (Orbax) plus ``dst/afd_umt5.json``."""
  meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source),
          "config": encoder.config.architecture()}
  return weights.write_orbax(nnx.to_pure_dict(nnx.state(encoder)), dst, CONVERTED_MARKER, meta)
