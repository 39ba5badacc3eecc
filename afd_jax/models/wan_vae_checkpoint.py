"""Reading the Wan2.1 VAE's weights in the layouts users hold, and the project's own format.

Layouts:

* original Wan-AI ``Wan2.1_VAE.pth`` (a torch pickle; needs torch), given as the file or as the
  model folder that holds it;
* diffusers ``AutoencoderKLWan``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (a
  pipeline root with a ``vae/`` folder works too), or a lone ``.safetensors`` in either naming;
* afd_jax's converted format: ``afd_wan_vae.json`` + an Orbax ``params/`` tree
  (``python -m afd_jax.tools.convert_wan_vae``), read without torch.

Original names are mapped to diffusers' (whose module names ``wan_vae`` shares), every expected
tensor is checked (missing, unexpected and mis-shaped keys are listed together), and the torch
layouts are turned channel-last (conv kernels ``[O, I, t, h, w] -> [t, h, w, I, O]``).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from afd_jax import errors
from afd_jax.models import weights
from afd_jax.models import wan_vae

CONVERTED_MARKER = "afd_wan_vae.json"
FORMAT_NAME = "afd_jax.wan_vae"
FORMAT_VERSION = 1
ORIGINAL_FILE = "Wan2.1_VAE.pth"
CONVERT = "python -m afd_jax.tools.convert_wan_vae SRC DST"


class VAECheckpointError(weights.CheckpointError):
  """Weights that cannot be read as the Wan2.1 VAE; the message says why and what to do."""


# ----------------------------------------------------------------------------------------------
# Names.

_RESIDUAL = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.",
             "residual.6.": "conv2.", "shortcut.": "conv_shortcut."}
_FIXED = [("encoder.conv1.", "encoder.conv_in."), ("decoder.conv1.", "decoder.conv_in."),
          ("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."),
          ("encoder.head.0.", "encoder.norm_out."), ("encoder.head.2.", "encoder.conv_out."),
          ("decoder.head.0.", "decoder.norm_out."), ("decoder.head.2.", "decoder.conv_out."),
          ("encoder.middle.0.", "encoder.mid_block.resnets.0."),
          ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
          ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
          ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
          ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
          ("decoder.middle.2.", "decoder.mid_block.resnets.1.")]


def original_to_diffusers(key: str, num_res_blocks: int) -> str:
  """``Wan2.1_VAE.pth`` name -> diffusers ``AutoencoderKLWan`` name. The original decoder lists
  its blocks flat (``num_res_blocks + 1`` residual blocks, then a resampler, per level)."""
  for old, new in _FIXED:
    if key.startswith(old):
      key = new + key[len(old):]
      break
  else:
    if key.startswith("encoder.downsamples."):
      key = "encoder.down_blocks." + key[len("encoder.downsamples."):]
    elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
      level, j = divmod(int(m.group(1)), num_res_blocks + 2)
      inner = f"resnets.{j}" if j <= num_res_blocks else "upsamplers.0"
      key = f"decoder.up_blocks.{level}.{inner}.{m.group(2)}"
  for old, new in _RESIDUAL.items():
    key = key.replace("." + old, "." + new)
  return key


def _torch_key(path: tuple) -> str:
  """NNX parameter path -> diffusers name (``Resample.conv`` is diffusers' ``resample.1``)."""
  parts = ["resample.1" if p == "conv" else str(p) for p in path[:-1]]
  return ".".join(parts + [{"kernel": "weight"}.get(str(path[-1]), str(path[-1]))])


def _to_nnx(arr: np.ndarray, target_ndim: int) -> np.ndarray:
  if arr.ndim == 5:                        # Conv3d [O, I, t, h, w] -> [t, h, w, I, O]
    return arr.transpose(2, 3, 4, 1, 0)
  if arr.ndim == 4 and target_ndim == 4:   # Conv2d [O, I, h, w] -> [h, w, I, O]
    return arr.transpose(2, 3, 1, 0)
  if arr.ndim == 4 and target_ndim == 2 and arr.shape[2:] == (1, 1):  # 1x1 Conv2d -> Linear
    return arr[:, :, 0, 0].T
  return arr.reshape(-1) if target_ndim == 1 else arr  # biases; gammas [C, 1, 1(, 1)]


def _torch_shape(shape: tuple, key: str) -> tuple:
  """The torch shape a parameter of NNX ``shape`` has (for messages)."""
  if len(shape) == 5:
    return (shape[4], shape[3], *shape[:3])
  if len(shape) == 4:
    return (shape[3], shape[2], *shape[:2])
  if len(shape) == 2:
    return (shape[1], shape[0], 1, 1)
  if key.endswith("gamma"):
    return (shape[0], 1, 1) if ".attentions." in key else (shape[0], 1, 1, 1)
  return shape


def state_from_diffusers(sd: dict[str, np.ndarray], cfg: wan_vae.VAEConfig, source) -> dict:
  """A diffusers-named state dict -> the NNX pure dict of ``WanVAE(cfg)``, every key checked."""
  target = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(wan_vae.abstract(cfg))))
  out, missing, bad = {}, [], []
  for path, leaf in target.items():
    key = _torch_key(path)
    if key not in sd:
      missing.append(key)
      continue
    arr = _to_nnx(np.asarray(sd[key]), len(leaf.shape))
    if arr.shape != tuple(leaf.shape):
      bad.append(f"{key}: {list(np.shape(sd[key]))}, expected "
                 f"{list(_torch_shape(tuple(leaf.shape), key))}")
      continue
    out[path] = arr
  unexpected = sorted(set(sd) - {_torch_key(p) for p in target})
  if missing or unexpected or bad:
    parts = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
             for name, keys in (("missing", missing), ("unexpected", unexpected),
                                ("mis-shaped", bad)) if keys]
    raise VAECheckpointError(
        f"{source} does not match the Wan2.1 VAE it describes (base_dim={cfg.base_dim}, "
        f"z_dim={cfg.z_dim}, dim_mult={list(cfg.dim_mult)}, num_res_blocks={cfg.num_res_blocks})"
        f": {'; '.join(parts)}. The file is incomplete, or not a Wan2.1 VAE.")
  return traverse_util.unflatten_dict(out)


# ----------------------------------------------------------------------------------------------
# Configs.


def config_from_json(cfg_json: dict, source) -> dict:
  cls = cfg_json.get("_class_name")
  if cls != "AutoencoderKLWan":
    raise VAECheckpointError(
        f"{source}: config.json describes a {cls!r}, not the Wan VAE (AutoencoderKLWan). Point at "
        f"the VAE: the pipeline's vae/ folder, {ORIGINAL_FILE}, or a convert_wan_vae folder.")
  unsupported = {k: cfg_json[k] for k, ok in (
      ("is_residual", False), ("patch_size", None), ("attn_scales", []), ("in_channels", 3),
      ("out_channels", 3)) if cfg_json.get(k, ok) != ok}
  dec = cfg_json.get("decoder_base_dim")
  if dec not in (None, cfg_json.get("base_dim", 96)):
    unsupported["decoder_base_dim"] = dec
  if unsupported:
    raise VAECheckpointError(f"{source}: {unsupported} is not the Wan2.1 VAE (the Wan2.2 VAE and "
                             "other variants are not supported).")
  fields = {"base_dim": "base_dim", "z_dim": "z_dim", "dim_mult": "dim_mult",
            "num_res_blocks": "num_res_blocks", "temperal_downsample": "temporal_downsample",
            "latents_mean": "latents_mean", "latents_std": "latents_std"}
  return {ours: cfg_json[theirs] for theirs, ours in fields.items() if theirs in cfg_json}


def config_from_shapes(sd: dict[str, np.ndarray], source) -> dict:
  """The architecture from diffusers-named tensor shapes (no config.json)."""
  if any(k.startswith("encoder.down_blocks.0.resnets.") for k in sd):
    raise VAECheckpointError(f"{source} has residual down blocks: that is the Wan2.2 VAE, which "
                             "is not supported (the Wan2.1 student uses the Wan2.1 VAE).")
  try:
    base = sd["encoder.conv_in.weight"].shape[0]
    z_dim = sd["post_quant_conv.weight"].shape[0]
    levels = 1 + max(int(m.group(1)) for k in sd
                     if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k)))
    nrb = max(int(m.group(1)) for k in sd
              if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", k)))
    per = nrb + 1  # encoder blocks per level: residual blocks and a resampler
    mult = [sd[f"encoder.down_blocks.{i * per}.conv1.weight"].shape[0] // base
            for i in range(levels)]
  except (KeyError, ValueError) as e:
    raise VAECheckpointError(f"cannot read a Wan VAE architecture from {source}'s tensor names "
                             f"and shapes (missing {e}); is this a Wan2.1 VAE?") from e
  return {"base_dim": base, "z_dim": z_dim, "dim_mult": mult, "num_res_blocks": nrb,
          "temporal_downsample": [f"encoder.down_blocks.{i * per + nrb}.time_conv.weight" in sd
                                  for i in range(levels - 1)]}


# ----------------------------------------------------------------------------------------------
# Locating and loading.


def _original_res_blocks(sd) -> int:
  """Residual blocks per level of an original state dict: those before the first resampler."""
  for i in range(len(sd)):
    if f"encoder.downsamples.{i}.resample.1.weight" in sd:
      return i
  raise VAECheckpointError("the original-layout state dict has no encoder resampler "
                           "(encoder.downsamples.N.resample.1.weight); is it a Wan2.1 VAE?")


def read_state_dict(path) -> tuple[dict[str, np.ndarray], dict]:
  """``(diffusers-named state dict, architecture fields)`` for any supported layout."""
  path = Path(path)
  if not path.exists():
    raise errors.MissingInput(f"Wan VAE checkpoint {path} does not exist; download {ORIGINAL_FILE} "
                            "(Wan-AI/Wan2.1-T2V-1.3B) or a diffusers pipeline's vae/ folder.")
  cfg_json, source = None, path
  if path.is_dir():
    if not (path / "config.json").exists() and (path / "vae" / "config.json").exists():
      path = path / "vae"
    if (path / ORIGINAL_FILE).exists():
      return read_state_dict(path / ORIGINAL_FILE)
    if (path / "config.json").exists():
      cfg_json = weights.read_json(path / "config.json")
      config_from_json(cfg_json, path)  # refuse a non-VAE folder before reading its weights
    files = weights.safetensor_files(path)
    if not files:
      raise VAECheckpointError(
          f"unknown Wan VAE layout in {path}: no {ORIGINAL_FILE}, *.safetensors or "
          f"{CONVERTED_MARKER} found. Expected a diffusers AutoencoderKLWan folder, the original "
          f"{ORIGINAL_FILE} or a folder written by `{CONVERT}`.")
    sd = {}
    for f in files:
      sd.update(weights.read_safetensors(f))
  elif path.suffix == ".safetensors":
    sd = weights.read_safetensors(path)
    if (path.parent / "config.json").exists():
      cfg_json = weights.read_json(path.parent / "config.json")
  elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
    sd = weights.read_torch(path, convert=CONVERT)
  else:
    raise VAECheckpointError(f"unknown Wan VAE layout: {path} (expected {ORIGINAL_FILE}, a "
                             ".safetensors file or a folder).")
  if "encoder.conv1.weight" in sd:
    nrb = _original_res_blocks(sd)
    sd = {original_to_diffusers(k, nrb): v for k, v in sd.items()}
  elif "encoder.conv_in.weight" not in sd:
    raise VAECheckpointError(
        f"unknown Wan VAE layout in {source}: neither original (encoder.conv1.weight) nor diffusers "
        f"(encoder.conv_in.weight) names; first keys: {sorted(sd)[:6]}.")
  arch = config_from_json(cfg_json, source) if cfg_json else config_from_shapes(sd, source)
  return sd, arch


def _runtime_config(arch: dict, runtime: dict) -> wan_vae.VAEConfig:
  unknown = set(runtime) - set(wan_vae.VAEConfig.RUNTIME_FIELDS)
  if unknown:
    raise TypeError(f"unknown options {sorted(unknown)}; runtime options are "
                    f"{list(wan_vae.VAEConfig.RUNTIME_FIELDS)}.")
  return wan_vae.VAEConfig(**arch, **runtime)


def _merge(cfg: wan_vae.VAEConfig, pure: dict) -> wan_vae.WanVAE:
  graphdef, state = nnx.split(wan_vae.abstract(cfg))
  pdt = jnp.dtype(cfg.param_dtype)
  nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {k: jnp.asarray(v, pdt) for k, v in traverse_util.flatten_dict(pure).items()}))
  return nnx.merge(graphdef, state)


def load(path, **runtime) -> wan_vae.WanVAE:
  """The Wan VAE from any supported layout; ``runtime``: ``dtype`` / ``param_dtype``."""
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    return load_converted(path, **runtime)
  sd, arch = read_state_dict(path)
  cfg = _runtime_config(arch, runtime)
  return _merge(cfg, state_from_diffusers(sd, cfg, path))


def load_config(path, **runtime) -> wan_vae.VAEConfig:
  """The architecture of a checkpoint; a converted one's is read from its JSON alone."""
  path = Path(path)
  if path.is_dir() and (path / CONVERTED_MARKER).exists():
    meta = weights.read_marker(path, CONVERTED_MARKER, FORMAT_NAME, FORMAT_VERSION)
    return _runtime_config(meta["config"], runtime)
  return _runtime_config(read_state_dict(path)[1], runtime)


def save_converted(vae: wan_vae.WanVAE, dst, source: str = "") -> Path:
  """Writes ``vae`` as ``dst/params`` (Orbax) plus ``dst/afd_wan_vae.json``."""
  meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "source": str(source),
          "config": vae.config.architecture()}
  return weights.write_orbax(nnx.to_pure_dict(nnx.state(vae)), dst, CONVERTED_MARKER, meta)


def load_converted(path, **runtime) -> wan_vae.WanVAE:
  path = Path(path).absolute()
  meta = weights.read_marker(path, CONVERTED_MARKER, FORMAT_NAME, FORMAT_VERSION)
  cfg = _runtime_config(meta["config"], runtime)
  graphdef, state = nnx.split(wan_vae.abstract(cfg))
  pdt = jnp.dtype(cfg.param_dtype)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, pdt), nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, weights.read_orbax(path, target))
  return nnx.merge(graphdef, state)

