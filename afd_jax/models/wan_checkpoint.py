"""Reading Wan2.1 transformer checkpoints in every layout users hold, and the project's own format.

Layouts (detected from ``config.json`` ``_class_name`` or, without one, from the key names):

* original Wan-AI: ``config.json`` (``_class_name: WanModel``) + ``diffusion_pytorch_model*.safetensors``
  (single file, or shards with ``diffusion_pytorch_model.safetensors.index.json``);
* diffusers: ``config.json`` of ``WanTransformer3DModel`` + safetensors (a pipeline root with a
  ``transformer/`` folder works too);
* Self-Forcing / CausVid ``.pt``: a torch pickle with state dicts under ``generator_ema`` /
  ``generator`` (or ``model``), keys prefixed by ``model.`` and FSDP / checkpoint / compile wrappers;
* afd_jax's converted format: ``afd_wan.json`` + an Orbax ``params/`` tree (``save_converted``).

Everything is mapped to original Wan key names, validated (missing, unexpected and mis-shaped keys
are listed together), converted to the NNX layout (linear weights transposed, the patch conv
flattened channel-last, blocks stacked on a leading layer axis) and merged into a ``WanModel``.
``save_diffusers`` writes the way back (a plain diffusers checkpoint, e.g. a merged LoRA export).
The files themselves are read and written by ``weights.py`` (shared with the VAE loader).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from afd_jax import errors
from afd_jax.models import weights
from afd_jax.models.weights import CheckpointError

if TYPE_CHECKING:  # the model imports this module to load itself, never the other way round
  from afd_jax.models import wan

CONVERTED_MARKER = "afd_wan.json"
FORMAT_NAME = "afd_jax.wan"
FORMAT_VERSION = 1
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------
# Key names.

# (original, diffusers) key fragments, applied in this order in either direction; "^" and "$"
# anchor a fragment to the start or end of the key.
_RENAMES = [
    ("^time_embedding.0.", "^condition_embedder.time_embedder.linear_1."),
    ("^time_embedding.2.", "^condition_embedder.time_embedder.linear_2."),
    ("^text_embedding.0.", "^condition_embedder.text_embedder.linear_1."),
    ("^text_embedding.2.", "^condition_embedder.text_embedder.linear_2."),
    ("^time_projection.1.", "^condition_embedder.time_proj."),
    ("^head.modulation$", "^scale_shift_table$"),
    ("^head.head.", "^proj_out."),
    (".modulation$", ".scale_shift_table$"),
    (".ffn.0.", ".ffn.net.0.proj."),
    (".ffn.2.", ".ffn.net.2."),
    (".norm3.", ".norm2."),
    *[(f".{ours}.{p}.", f".{theirs}.{q}.")
      for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for p, q in (("o", "to_out.0"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
                   ("norm_q", "norm_q"), ("norm_k", "norm_k"))],
]


def _rename(key: str, to_diffusers: bool) -> str:
  for original, diffusers in _RENAMES:
    src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
    pattern = (("^" if src[0] == "^" else "") + re.escape(src.strip("^$"))
               + ("$" if src[-1] == "$" else ""))
    key = re.sub(pattern, lambda _, dst=dst: dst.strip("^$"), key)
  return key


def diffusers_to_original(key: str) -> str:
  return _rename(key, to_diffusers=False)


def original_to_diffusers(key: str) -> str:
  return _rename(key, to_diffusers=True)


def strip_wrappers(key: str) -> str:
  for infix in _WRAPPER_INFIXES:
    key = key.replace(infix, "")
  return key[len("model."):] if key.startswith("model.") else key


def _is_diffusers(keys) -> bool:
  return any(k.startswith(("condition_embedder.", "proj_out.")) for k in keys)


# Original key (block keys relative to ``blocks.N.``) -> (NNX path, kind).
_TOP = {
    "patch_embedding.weight": (("patch_embedding", "kernel"), "conv"),
    "patch_embedding.bias": (("patch_embedding", "bias"), "copy"),
    "text_embedding.0.weight": (("text_embedding", "linear_1", "kernel"), "linear"),
    "text_embedding.0.bias": (("text_embedding", "linear_1", "bias"), "copy"),
    "text_embedding.2.weight": (("text_embedding", "linear_2", "kernel"), "linear"),
    "text_embedding.2.bias": (("text_embedding", "linear_2", "bias"), "copy"),
    "time_embedding.0.weight": (("time_embedding", "linear_1", "kernel"), "linear"),
    "time_embedding.0.bias": (("time_embedding", "linear_1", "bias"), "copy"),
    "time_embedding.2.weight": (("time_embedding", "linear_2", "kernel"), "linear"),
    "time_embedding.2.bias": (("time_embedding", "linear_2", "bias"), "copy"),
    "time_projection.1.weight": (("time_projection", "kernel"), "linear"),
    "time_projection.1.bias": (("time_projection", "bias"), "copy"),
    "head.modulation": (("head", "modulation"), "copy"),
    "head.head.weight": (("head", "head", "kernel"), "linear"),
    "head.head.bias": (("head", "head", "bias"), "copy"),
}


def _block_keys(cfg: wan.WanConfig) -> dict[str, tuple[tuple[str, ...], str]]:
  keys = {"modulation": (("modulation",), "copy"),
          "ffn.0.weight": (("ffn_in", "kernel"), "linear"), "ffn.0.bias": (("ffn_in", "bias"), "copy"),
          "ffn.2.weight": (("ffn_out", "kernel"), "linear"), "ffn.2.bias": (("ffn_out", "bias"), "copy")}
  for a in ("self_attn", "cross_attn"):
    for p in "qkvo":
      keys[f"{a}.{p}.weight"] = ((a, p, "kernel"), "linear")
      keys[f"{a}.{p}.bias"] = ((a, p, "bias"), "copy")
    if cfg.qk_norm:
      keys[f"{a}.norm_q.weight"] = ((a, "norm_q", "scale"), "copy")
      keys[f"{a}.norm_k.weight"] = ((a, "norm_k", "scale"), "copy")
  if cfg.cross_attn_norm:
    keys["norm3.weight"] = (("norm3", "scale"), "copy")
    keys["norm3.bias"] = (("norm3", "bias"), "copy")
  return keys


def _transform(arr: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return arr.T
  if kind == "conv":  # [d, C, pt, ph, pw] -> [(pt ph pw C), d], matching the channel-last patchify.
    return arr.transpose(2, 3, 4, 1, 0).reshape(-1, arr.shape[0])
  return arr


def _torch_shape(shape, kind):
  """Expected checkpoint shape for an NNX shape (inverse of ``_transform``)."""
  if kind == "linear":
    return tuple(reversed(shape))
  return tuple(shape)


def state_from_original(sd: dict[str, np.ndarray], cfg: wan.WanConfig, state) -> dict:
  """Validates an original-named state dict against ``cfg`` and the model's abstract ``state``
  and builds the NNX pure-dict state."""
  abstract_flat = {tuple(str(p) for p in path): v.shape for path, v in nnx.to_flat_state(state)}
  plan = {k: (("",) + path, kind) for k, (path, kind) in _TOP.items()}
  block_plan = _block_keys(cfg)
  for i in range(cfg.num_layers):
    for k, (path, kind) in block_plan.items():
      plan[f"blocks.{i}.{k}"] = (("blocks",) + path, kind, i)
  missing = sorted(set(plan) - set(sd), key=_natural)
  unexpected = sorted(set(sd) - set(plan), key=_natural)
  mismatched = []
  for key in sorted(set(plan) & set(sd), key=_natural):
    path, kind = plan[key][0], plan[key][1]
    full = abstract_flat[tuple(p for p in path if p)]
    shape = full[1:] if path[0] == "blocks" else full
    if kind == "conv":
      pt, ph, pw = cfg.patch_size
      want = (cfg.dim, cfg.in_dim, pt, ph, pw)
    else:
      want = _torch_shape(shape, kind)
    if tuple(sd[key].shape) != want:
      mismatched.append(f"{key}: checkpoint {tuple(sd[key].shape)} vs model {want}")
  if missing or unexpected or mismatched:
    raise CheckpointError(
        "checkpoint does not match the Wan config " f"(dim={cfg.dim}, layers={cfg.num_layers}, "
        f"heads={cfg.num_heads}, ffn={cfg.ffn_dim}); "
        + weights.key_problems(missing, unexpected, mismatched) + ".")

  pdt = jnp.dtype(cfg.param_dtype)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  stacks: dict[tuple[str, ...], list] = {}
  for key, entry in plan.items():
    arr = _transform(np.asarray(sd[key]), entry[1]).astype(pdt)
    if len(entry) == 3:
      stacks.setdefault(entry[0], [None] * cfg.num_layers)[entry[2]] = arr
    else:
      flat[tuple(p for p in entry[0] if p)] = arr
  for path, arrs in stacks.items():
    flat[path] = np.stack(arrs)
  return traverse_util.unflatten_dict(flat)


def _untransform(arr: np.ndarray, kind: str, cfg: wan.WanConfig) -> np.ndarray:
  """The checkpoint's layout of an NNX array (inverse of ``_transform``)."""
  if kind == "linear":
    return arr.T
  if kind == "conv":
    pt, ph, pw = cfg.patch_size
    return arr.reshape(pt, ph, pw, cfg.in_dim, cfg.dim).transpose(4, 3, 0, 1, 2)
  return arr


def original_from_state(pure: dict, cfg: wan.WanConfig) -> dict[str, np.ndarray]:
  """Original-named, torch-layout arrays of an NNX pure-dict state (inverse of
  :func:`state_from_original`)."""
  flat = {tuple(map(str, k)): np.asarray(v) for k, v in traverse_util.flatten_dict(pure).items()}
  out = {k: _untransform(flat[path], kind, cfg) for k, (path, kind) in _TOP.items()}
  for i in range(cfg.num_layers):
    for k, (path, kind) in _block_keys(cfg).items():
      out[f"blocks.{i}.{k}"] = _untransform(flat[("blocks",) + path][i], kind, cfg)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def diffusers_config(cfg: wan.WanConfig) -> dict:
  """``config.json`` of diffusers' ``WanTransformer3DModel`` for ``cfg`` (plus ``text_len``,
  which diffusers leaves to its pipeline and ignores here, so the model reads back exactly)."""
  return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
          "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
          "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
          "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
          "cross_attn_norm": cfg.cross_attn_norm,
          "qk_norm": "rms_norm_across_heads" if cfg.qk_norm else None, "eps": cfg.eps,
          "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
          "text_len": cfg.text_len}


def save_diffusers(model: wan.WanModel, dst) -> Path:
  """Writes ``model`` as a plain diffusers checkpoint (``config.json`` and float32
  ``diffusion_pytorch_model.safetensors``): ``WanTransformer3DModel.from_pretrained(dst)`` and
  ``wan.from_pretrained(dst)`` read it. Every host gathers; process 0 writes."""
  import safetensors.numpy
  from jax.experimental import multihost_utils

  dst = Path(dst).absolute()
  if (dst / "config.json").exists():
    raise FileExistsError(f"{dst} already holds a checkpoint; choose another destination.")
  pure = jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True),
                                           np.float32), nnx.to_pure_dict(nnx.state(model)))
  sd = {original_to_diffusers(k): v for k, v in original_from_state(pure, model.config).items()}
  if jax.process_index() == 0:
    dst.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    tmp = dst / "config.json.tmp"   # written last: a folder without it is an interrupted export
    tmp.write_text(json.dumps(diffusers_config(model.config), indent=2))
    os.replace(tmp, dst / "config.json")
  return dst


def _natural(key: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


# ----------------------------------------------------------------------------------------------
# Configs.


def config_from_json(cfg_json: dict, source) -> dict:
  cls = cfg_json.get("_class_name")
  if cls == "WanModel":
    if cfg_json.get("model_type", "t2v") != "t2v":
      raise CheckpointError(f"{source}: model_type {cfg_json['model_type']!r} is not supported; "
                            "afd_jax implements the text-to-video Wan2.1 (model_type t2v).")
    fields = {k: cfg_json[k] for k in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim",
                                       "out_dim", "patch_size", "freq_dim", "text_dim", "text_len",
                                       "eps", "qk_norm", "cross_attn_norm") if k in cfg_json}
    return fields
  if cls == "WanTransformer3DModel":
    if cfg_json.get("image_dim") or cfg_json.get("added_kv_proj_dim"):
      raise CheckpointError(f"{source}: image-conditioned Wan (image_dim / added_kv_proj_dim set) is "
                            "not supported; use a text-to-video checkpoint.")
    heads, head_dim = cfg_json["num_attention_heads"], cfg_json["attention_head_dim"]
    return {"dim": heads * head_dim, "num_heads": heads, "ffn_dim": cfg_json["ffn_dim"],
            "num_layers": cfg_json["num_layers"], "in_dim": cfg_json["in_channels"],
            "out_dim": cfg_json.get("out_channels") or cfg_json["in_channels"],
            "patch_size": tuple(cfg_json["patch_size"]), "freq_dim": cfg_json["freq_dim"],
            "text_dim": cfg_json["text_dim"], "eps": cfg_json.get("eps", 1e-6),
            "qk_norm": cfg_json.get("qk_norm") is not None,
            "cross_attn_norm": cfg_json.get("cross_attn_norm", True),
            **({"text_len": cfg_json["text_len"]} if "text_len" in cfg_json else {})}
  raise CheckpointError(f"{source}: unknown checkpoint layout: config.json has _class_name {cls!r}; "
                        "expected 'WanModel' (original Wan-AI) or 'WanTransformer3DModel' (diffusers).")


def config_from_shapes(sd: dict[str, np.ndarray], num_heads: int | None) -> dict:
  """Infers the architecture from tensor shapes (heads default to Wan's head dim of 128)."""
  try:
    pe = sd["patch_embedding.weight"]
    dim = pe.shape[0]
    layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    cfg = {"dim": dim, "in_dim": pe.shape[1], "patch_size": tuple(pe.shape[2:]),
           "text_dim": sd["text_embedding.0.weight"].shape[1],
           "freq_dim": sd["time_embedding.0.weight"].shape[1],
           "ffn_dim": sd["blocks.0.ffn.0.weight"].shape[0], "num_layers": layers,
           "qk_norm": "blocks.0.self_attn.norm_q.weight" in sd,
           "cross_attn_norm": "blocks.0.norm3.weight" in sd}
    cfg["out_dim"] = sd["head.head.weight"].shape[0] // int(np.prod(cfg["patch_size"]))
  except (KeyError, ValueError, IndexError) as e:
    raise CheckpointError(f"cannot infer a Wan config from the tensor names/shapes (missing {e}); "
                          "is this a Wan2.1 transformer state dict?") from e
  if num_heads is None:
    if dim % 128:
      raise CheckpointError(f"no config.json and dim={dim} is not a multiple of Wan's head dim 128: "
                            "pass num_heads= explicitly.")
    num_heads = dim // 128
  cfg["num_heads"] = num_heads
  return cfg


# ----------------------------------------------------------------------------------------------
# Locating and loading.

def read_state_dict(path, *, pt_key=None, num_heads=None) -> tuple[dict, dict]:
  """Returns ``(original-named state dict, architecture fields)`` for any supported layout."""
  path = Path(path)
  if not path.exists():
    raise errors.MissingInput(f"Wan checkpoint {path} does not exist.")
  cfg_json = None
  if path.is_dir():
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
      path = path / "transformer"
    if (path / "config.json").exists():
      cfg_json = weights.read_json(path / "config.json")
    files = weights.safetensor_files(path)
    if not files:
      raise CheckpointError(
          f"unknown checkpoint layout in {path}: no *.safetensors, {CONVERTED_MARKER} or .pt found. "
          "Expected an original Wan-AI or diffusers folder, a Self-Forcing/CausVid .pt file or a "
          "folder written by `python -m afd_jax.tools.convert_wan`.")
    sd = {}
    for f in files:
      sd.update(weights.read_safetensors(f))
  elif path.suffix == ".safetensors":
    sd = weights.read_safetensors(path)
    if (path.parent / "config.json").exists():
      cfg_json = weights.read_json(path.parent / "config.json")
  elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
    sd = {strip_wrappers(k): v for k, v in weights.read_torch(path, pt_key).items()}
  else:
    raise CheckpointError(f"unknown checkpoint layout: {path} (expected a folder, .safetensors or "
                          ".pt/.pth file).")
  if _is_diffusers(sd):
    sd = {diffusers_to_original(k): v for k, v in sd.items()}
  if cfg_json is not None:
    arch = config_from_json(cfg_json, path)
    if num_heads is not None:
      arch["num_heads"] = num_heads
  else:
    arch = config_from_shapes(sd, num_heads)
  return sd, arch


def locate(path, *, pt_key: str | None = None, num_heads: int | None = None) -> weights.Found:
  """Any supported layout at ``path``: its architecture and a reader of its weights (see
  :func:`afd_jax.models.wan.from_pretrained`). A converted folder's architecture is read from its
  JSON alone; other layouts are read whole here."""
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    path = path.absolute()
    return weights.Found(_converted_meta(path)["config"],
                         lambda cfg, state, shardings: weights.read_orbax_into(
                             path, state, cfg.param_dtype, shardings))
  sd, arch = read_state_dict(path, pt_key=pt_key, num_heads=num_heads)
  return weights.Found(arch, lambda cfg, state, shardings: weights.place(
      weights.check_finite(state_from_original(sd, cfg, state), path), state, shardings))


# ----------------------------------------------------------------------------------------------
# The converted (Orbax) format.


def save_converted(model: wan.WanModel, dst, source: str = "") -> Path:
  """Writes ``model`` as ``dst/params`` (Orbax) plus ``dst/afd_wan.json``."""
  meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source),
          "config": model.config.architecture()}
  return weights.write_orbax(nnx.to_pure_dict(nnx.state(model)), dst, CONVERTED_MARKER, meta)


def _converted_meta(path: Path) -> dict:
  return weights.read_marker(path, CONVERTED_MARKER, FORMAT_NAME, FORMAT_VERSION)
