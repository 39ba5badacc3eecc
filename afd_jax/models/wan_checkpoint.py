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
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util

from afd_jax import errors
from afd_jax.models import wan

CONVERTED_MARKER = "afd_wan.json"
FORMAT_NAME = "afd_jax.wan"
FORMAT_VERSION = 1
_WRAPPER_INFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


class CheckpointError(errors.UserError):
  """A checkpoint that cannot be read as a Wan2.1 transformer; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Raw tensor readers.

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Memory-maps a ``.safetensors`` file (bf16 included, no torch needed)."""
  path = Path(path)
  size = path.stat().st_size
  try:
    with open(path, "rb") as fh:
      (n,) = struct.unpack("<Q", fh.read(8))
      if n <= 0 or 8 + n > size:
        raise errors.UserError(f"header length {n} does not fit a {size}-byte file")
      header = json.loads(fh.read(n))
  except (struct.error, ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not a valid safetensors file ({e}); it may be truncated or "
                          "corrupt: download or write it again.") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    start, end = info.get("data_offsets", (0, -1))
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
    if end > data.size or end - start != np.dtype(dtype).itemsize * int(np.prod(info["shape"])):
      raise CheckpointError(f"{path}: tensor {name!r} points outside the file or has the wrong byte "
                            "size; the file is truncated or corrupt.")
    out[name] = data[start:end].view(dtype).reshape(info["shape"])
  return out


def read_torch(path, pt_key: str | None = None,
               convert: str = "python -m afd_jax.tools.convert_wan SRC DST") -> dict[str, np.ndarray]:
  """Reads a torch pickle of tensors (a Self-Forcing / CausVid ``.pt``, ``Wan2.1_VAE.pth``; needs
  torch) into numpy arrays; ``convert`` is the command the missing-torch error suggests."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"{path} is a PyTorch checkpoint and reading it needs torch, which is not installed. "
        "Install it with `pip install 'afd_jax[torch]'`, or convert the file once on a machine "
        f"with torch: `{convert}`.") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:  # torch raises many types for damaged pickles
    raise CheckpointError(f"could not unpickle {path}: {e}. The file may be truncated or not a "
                          "torch checkpoint.") from e
  if not isinstance(obj, dict):
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict of state dicts.")
  keys = [pt_key] if pt_key else ["generator_ema", "generator", "model", "state_dict"]
  state = next((obj[k] for k in keys if k in obj and isinstance(obj[k], dict)), None)
  if state is None:
    if pt_key or not all(hasattr(v, "shape") for v in obj.values()):
      raise CheckpointError(f"{path} has no state dict under {keys}; top-level keys: "
                            f"{sorted(obj)[:20]}. Pass pt_key= to pick one.")
    state = obj
  out = {}
  for k, t in state.items():
    t = t.detach().cpu().contiguous()
    out[k] = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
              else t.numpy())
  return out


# ----------------------------------------------------------------------------------------------
# Key names.

_DIFFUSERS_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
]


def diffusers_to_original(key: str) -> str:
  for pattern, repl in _DIFFUSERS_TO_ORIGINAL:
    key = re.sub(pattern, repl, key)
  return key


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


def state_from_original(sd: dict[str, np.ndarray], cfg: wan.WanConfig) -> dict:
  """Validates an original-named state dict against ``cfg`` and builds the NNX pure-dict state."""
  abstract_flat = {tuple(str(p) for p in path): v.shape
                   for path, v in nnx.to_flat_state(nnx.state(wan.abstract(cfg)))}
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
    parts = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts.append(f"{title}: {shown}")
    raise CheckpointError(
        "checkpoint does not match the Wan config " f"(dim={cfg.dim}, layers={cfg.num_layers}, "
        f"heads={cfg.num_heads}, ffn={cfg.ffn_dim}); " + "; ".join(parts) + ".")

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
            "cross_attn_norm": cfg_json.get("cross_attn_norm", True)}
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

_RUNTIME = set(wan.WanConfig.RUNTIME_FIELDS)


def safetensor_files(directory: Path) -> list[Path]:
  for index_name in ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json"):
    index = directory / index_name
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = [directory / f for f in sorted(set(weight_map.values()))]
      absent = [f.name for f in files if not f.exists()]
      if absent:
        raise CheckpointError(f"{index} lists shards that are missing: {absent}.")
      return files
  return sorted(directory.glob("*.safetensors"))


def read_json(path: Path) -> dict:
  """A checkpoint's JSON (``config.json``, the converted marker), or one line naming the file."""
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not readable JSON ({e}); restore it from the source "
                          "checkpoint.") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object.")
  return value


def check_finite(pure: dict, source) -> dict:
  """``pure`` (a nested dict of weights), or an error naming the weights that hold NaN or inf."""
  from afd_jax import checkpoint as ckpt_lib
  bad = ckpt_lib.nonfinite(pure)
  if bad:
    raise CheckpointError(f"{source} holds non-finite weights in {len(bad)} tensor(s), e.g. "
                          f"{', '.join(bad[:3])}; it cannot be trained from.")
  return pure


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
      cfg_json = read_json(path / "config.json")
    files = safetensor_files(path)
    if not files:
      raise CheckpointError(
          f"unknown checkpoint layout in {path}: no *.safetensors, {CONVERTED_MARKER} or .pt found. "
          "Expected an original Wan-AI or diffusers folder, a Self-Forcing/CausVid .pt file or a "
          "folder written by `python -m afd_jax.tools.convert_wan`.")
    sd = {}
    for f in files:
      sd.update(read_safetensors(f))
  elif path.suffix == ".safetensors":
    sd = read_safetensors(path)
    if (path.parent / "config.json").exists():
      cfg_json = read_json(path.parent / "config.json")
  elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
    sd = {strip_wrappers(k): v for k, v in read_torch(path, pt_key).items()}
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


def load(path, *, pt_key: str | None = None, num_heads: int | None = None, shardings=None,
         **runtime) -> wan.WanModel:
  """See :func:`afd_jax.models.wan.from_pretrained`. ``shardings``: optional callable mapping the
  abstract NNX state to a pure dict of shardings (e.g. ``afd_jax.mesh.param_shardings``), used to
  place the weights as they load."""
  unknown = set(runtime) - _RUNTIME
  if unknown:
    raise TypeError(f"unknown options {sorted(unknown)}; runtime options are {sorted(_RUNTIME)}.")
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    return load_converted(path, shardings=shardings, **runtime)
  sd, arch = read_state_dict(path, pt_key=pt_key, num_heads=num_heads)
  cfg = wan.WanConfig(**arch, **runtime)
  return _merge(cfg, check_finite(state_from_original(sd, cfg), path), shardings)


def load_config(path, *, pt_key: str | None = None, num_heads: int | None = None,
                **runtime) -> wan.WanConfig:
  """The architecture of a checkpoint; a converted one's is read from its JSON alone."""
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    return wan.WanConfig(**_converted_meta(path)["config"], **runtime)
  return wan.WanConfig(**read_state_dict(path, pt_key=pt_key, num_heads=num_heads)[1], **runtime)


def _merge(cfg: wan.WanConfig, pure: dict, shardings=None) -> wan.WanModel:
  graphdef, state = nnx.split(wan.abstract(cfg))
  if shardings is not None:
    pure = jax.tree.map(jax.device_put, pure, shardings(state))
  else:
    pure = jax.tree.map(jnp.asarray, pure)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------------------
# The converted (Orbax) format.


def write_orbax(pure: dict, dst, marker: str, meta: dict) -> Path:
  """Writes ``pure`` as ``dst/params`` (Orbax) plus the JSON ``dst/marker`` (written last, so a
  folder without it is an interrupted conversion)."""
  import orbax.checkpoint as ocp

  dst = Path(dst).absolute()
  if (dst / marker).exists() or (dst / "params").exists():
    raise FileExistsError(f"{dst} already holds a converted checkpoint; choose another destination.")
  dst.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(dst / "params", pure)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:  # multi-host: every host saved its shards above, one writes this
    tmp = dst / (marker + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, dst / marker)
  return dst


def read_marker(path: Path, marker: str, format_name: str, version: int) -> dict:
  """The JSON beside a converted ``params/`` tree, checked for format and completeness."""
  meta = read_json(path / marker)
  if meta.get("format") != format_name or meta.get("version") != version:
    raise CheckpointError(f"{path / marker} is format {meta.get('format')!r} v"
                          f"{meta.get('version')}; this afd_jax reads {format_name} v{version}.")
  if not (path / "params").exists():
    raise CheckpointError(f"{path} has {marker} but no params/ folder; convert again.")
  return meta


def read_orbax(path: Path, target):
  """Restores ``path/params`` into ``target`` (a tree of ShapeDtypeStructs, with shardings or not)."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    try:
      return ckptr.restore(path / "params", target)
    except Exception as e:  # orbax raises a variety of errors for damaged trees
      raise CheckpointError(f"could not restore {path / 'params'}: {e}") from e


def save_converted(model: wan.WanModel, dst, source: str = "") -> Path:
  """Writes ``model`` as ``dst/params`` (Orbax) plus ``dst/afd_wan.json``."""
  meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source),
          "config": model.config.architecture()}
  return write_orbax(nnx.to_pure_dict(nnx.state(model)), dst, CONVERTED_MARKER, meta)


def _converted_meta(path: Path) -> dict:
  return read_marker(path, CONVERTED_MARKER, FORMAT_NAME, FORMAT_VERSION)


def load_converted(path, shardings=None, **runtime) -> wan.WanModel:
  path = Path(path).absolute()
  cfg = wan.WanConfig(**_converted_meta(path)["config"], **runtime)
  graphdef, state = nnx.split(wan.abstract(cfg))
  pdt = jnp.dtype(cfg.param_dtype)
  if shardings is not None:
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, pdt, sharding=s),
                          nnx.to_pure_dict(state), shardings(state))
  else:
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, pdt), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, check_finite(read_orbax(path, target), path))
  return nnx.merge(graphdef, state)
