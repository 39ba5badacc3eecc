"""Weight files as the Wan loaders (transformer and VAE) read and write them: safetensors
(memory-mapped, bf16 included, no torch), torch pickles (torch only when one is read), JSON
configs, the finiteness check every load passes, the project's converted format (an Orbax
``params/`` tree plus a JSON marker written last), and ``Found``, the hand-over from a format
module (which knows files, not models) to a model's ``from_pretrained`` (which knows the model)."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from afd_jax import errors

class CheckpointError(errors.UserError):
  """A weight file that cannot be read; the message says why and what to do."""


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


def key_problems(missing, unexpected, mismatched) -> str:
  """``missing keys: ...; unexpected keys: ...; shape mismatches: ...`` (the non-empty ones, a
  dozen of each shown): what a loader that checks a whole state dict at once reports."""
  parts = []
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
    if items:
      shown = ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
      parts.append(f"{title}: {shown}")
  return "; ".join(parts)


def check_finite(pure: dict, source) -> dict:
  """``pure`` (a nested dict of weights), or an error naming the weights that hold NaN or inf."""
  from afd_jax import checkpoint as ckpt_lib
  bad = ckpt_lib.nonfinite(pure)
  if bad:
    raise CheckpointError(f"{source} holds non-finite weights in {len(bad)} tensor(s), e.g. "
                          f"{', '.join(bad[:3])}; it cannot be trained from.")
  return pure


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


# ----------------------------------------------------------------------------------------------
# From a located checkpoint to a model.


@dataclasses.dataclass(frozen=True)
class Found:
  """A checkpoint located on disk: its architecture fields, and ``read(cfg, state, shardings)``,
  which returns its weights as a pure dict for ``state`` (the abstract NNX state of a model built
  from ``cfg``), placed by ``shardings`` (a callable of that state, or None)."""
  arch: dict
  read: Callable


def check_runtime(runtime: dict, allowed) -> None:
  unknown = set(runtime) - set(allowed)
  if unknown:
    raise TypeError(f"unknown options {sorted(unknown)}; runtime options are {sorted(allowed)}.")


def build(abstract_model, cfg, found: Found, shardings=None):
  """``abstract_model`` (from ``nnx.eval_shape``) with ``found``'s weights in it."""
  graphdef, state = nnx.split(abstract_model)
  nnx.replace_by_pure_dict(state, found.read(cfg, state, shardings))
  return nnx.merge(graphdef, state)


def place(pure: dict, state, shardings) -> dict:
  """Host arrays onto devices, sharded when ``shardings`` (a callable of ``state``) is given."""
  if shardings is None:
    return jax.tree.map(jnp.asarray, pure)
  return jax.tree.map(jax.device_put, pure, shardings(state))


def read_orbax_into(path: Path, state, param_dtype, shardings) -> dict:
  """A converted ``params/`` tree restored straight into ``state``'s shapes (in ``param_dtype``,
  sharded when ``shardings`` is given), checked for finiteness."""
  dtype = jnp.dtype(param_dtype)
  pure = nnx.to_pure_dict(state)
  if shardings is None:
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, dtype), pure)
  else:
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, dtype, sharding=s), pure,
                          shardings(state))
  return check_finite(read_orbax(path, target), path)
