"""Wan VAE weights: diffusers and original layouts, the converted format, and refusals."""

import json
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from afd_jax.models import wan_vae, wan_vae_checkpoint as vc

torch = pytest.importorskip("torch")


def _to_original(key: str) -> str:
  """diffusers -> Wan2.1_VAE.pth names for the published topology (2 residual blocks per level),
  written independently of the loader and checked against diffusers' own converter below."""
  for pattern, repl in [
      (r"^(en|de)coder\.conv_in\.", r"\1coder.conv1."), (r"^quant_conv\.", "conv1."),
      (r"^post_quant_conv\.", "conv2."), (r"^(en|de)coder\.norm_out\.", r"\1coder.head.0."),
      (r"^(en|de)coder\.conv_out\.", r"\1coder.head.2."),
      (r"mid_block\.resnets\.0\.", "middle.0."), (r"mid_block\.attentions\.0\.", "middle.1."),
      (r"mid_block\.resnets\.1\.", "middle.2."), (r"^encoder\.down_blocks\.", "encoder.downsamples."),
      (r"up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"upsamples.{4 * int(m[1]) + int(m[2])}."),
      (r"up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"upsamples.{4 * int(m[1]) + 3}.")]:
    key = re.sub(pattern, repl, key)
  if re.search(r"(downsamples|upsamples|middle)\.\d+\.", key):
    for old, new in [("norm1", "residual.0"), ("conv1", "residual.2"), ("norm2", "residual.3"),
                     ("conv2", "residual.6"), ("conv_shortcut", "shortcut")]:
      key = key.replace(f".{old}.", f".{new}.")
  return key


def _params(vae):
  return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(vae)))


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=str(k))


@pytest.fixture(scope="module")
def reference(diffusers_vae):
  model, path = diffusers_vae
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return sd, path, vc.load(path)


def test_diffusers_folder_loads_with_its_architecture(reference):
  sd, path, vae = reference
  cfg = vae.config
  assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (8, 16, (1, 2, 4, 4), 2)
  assert cfg.temporal_downsample == (False, True, True)
  assert cfg.temporal_stride == 4 and cfg.spatial_stride == 8
  params = _params(vae)
  assert len(params) == len(sd)
  np.testing.assert_array_equal(params[("encoder", "conv_in", "kernel")],
                                sd["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(params[("decoder", "up_blocks", 0, "upsamplers", 0, "conv", "kernel")],
                                sd["decoder.up_blocks.0.upsamplers.0.resample.1.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params[("encoder", "mid_block", "attentions", 0, "to_qkv", "kernel")],
                                sd["encoder.mid_block.attentions.0.to_qkv.weight"][:, :, 0, 0].T)
  # the same architecture from shapes alone (a lone .safetensors without config.json)
  lone = path.parent / "lone.safetensors"
  lone.write_bytes((path / "diffusion_pytorch_model.safetensors").read_bytes())
  assert vc.load_config(lone).architecture() == cfg.architecture()


def test_original_pth_loads_the_same_weights(reference, tmp_path):
  from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
  sd, _, vae = reference
  original = {_to_original(k): torch.from_numpy(v.copy()) for k, v in sd.items()}
  assert "encoder.conv1.weight" in original and "decoder.upsamples.4.shortcut.weight" in original
  back = convert_wan_vae_to_diffusers(original)  # diffusers agrees with our naming of the .pth
  assert set(back) == set(sd)
  folder = tmp_path / "Wan2.1-T2V-1.3B"  # the Wan-AI model folder, the VAE beside the DiT
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel"}))
  torch.save(original, folder / vc.ORIGINAL_FILE)
  for src in (folder / vc.ORIGINAL_FILE, folder):
    _assert_same_params(vc.load(src), vae)


def test_convert_cli_writes_what_loads_without_torch(reference, tmp_path):
  _, path, vae = reference
  dst = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "afd_jax.tools.convert_wan_vae", str(path), str(dst)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "base_dim=8 z_dim=16" in proc.stdout
  meta = json.loads((dst / vc.CONVERTED_MARKER).read_text())
  assert meta["format"] == vc.FORMAT_NAME and meta["config"]["base_dim"] == 8
  _assert_same_params(vc.load(dst), vae)
  bf16 = vc.load(dst, param_dtype="bfloat16", dtype="bfloat16")
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {np.dtype("bfloat16")}
  with pytest.raises(FileExistsError, match="already holds a converted checkpoint"):
    vc.save_converted(bf16, dst)


def _safetensors(sd, path):
  from safetensors.numpy import save_file
  path.mkdir(parents=True, exist_ok=True)
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
            path / "diffusion_pytorch_model.safetensors")
  return path


def test_bad_weights_are_refused_with_a_clear_error(reference, tmp_path, monkeypatch):
  sd, path, _ = reference
  config = json.loads((path / "config.json").read_text())
  partial = {k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}
  partial["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :, :1]
  partial["encoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(vc.VAECheckpointError) as e:
    vc.load(_safetensors(partial, tmp_path / "bad"))
  msg = str(e.value)
  assert "missing (1): decoder.conv_out.bias" in msg and "unexpected (1): encoder.extra.weight" in msg
  assert "mis-shaped (1): encoder.conv_in.weight: [8, 3, 1, 3, 3], expected [8, 3, 3, 3, 3]" in msg

  unknown = _safetensors({"model.weight": np.zeros(3, np.float32)}, tmp_path / "unknown")
  with pytest.raises(vc.VAECheckpointError, match="unknown Wan VAE layout.*first keys"):
    vc.load(unknown)
  (tmp_path / "notes.txt").write_text("hi")
  with pytest.raises(vc.VAECheckpointError, match="unknown Wan VAE layout"):
    vc.load(tmp_path / "notes.txt")
  with pytest.raises(vc.VAECheckpointError, match="no Wan2.1_VAE.pth, \\*.safetensors"):
    vc.load(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vc.load(tmp_path / "missing")

  transformer = tmp_path / "transformer"
  transformer.mkdir()
  (transformer / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
  with pytest.raises(vc.VAECheckpointError, match="not the Wan VAE"):
    vc.load(transformer)
  wan22 = _safetensors(sd, tmp_path / "wan22")
  (wan22 / "config.json").write_text(json.dumps({**config, "is_residual": True, "z_dim": 48}))
  with pytest.raises(vc.VAECheckpointError, match="Wan2.2 VAE"):
    vc.load(wan22)

  (tmp_path / "vae.pth").write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs torch.*convert_wan_vae"):
    vc.load(tmp_path / "vae.pth")


def test_original_mapping_follows_the_configured_depth():
  """The original decoder lists num_res_blocks + 1 residual blocks and a resampler per level."""
  m = vc.original_to_diffusers
  assert m("decoder.upsamples.7.resample.1.weight", 2) == \
      "decoder.up_blocks.1.upsamplers.0.resample.1.weight"
  assert m("decoder.upsamples.4.residual.3.gamma", 1) == "decoder.up_blocks.1.resnets.1.norm2.gamma"
  assert m("decoder.upsamples.5.time_conv.bias", 1) == "decoder.up_blocks.1.upsamplers.0.time_conv.bias"
  assert m("conv2.bias", 2) == "post_quant_conv.bias"
  assert wan_vae.VAEConfig().latent_shape(81, 480, 832) == (21, 60, 104)
