"""Checkpoint layouts, float32 parity with diffusers' WanTransformer3DModel, conversion, errors.

The PyTorch reference is diffusers 0.42.1 with random weights. The test writes it in the
diffusers layout (``save_pretrained``) and, through the documented rename table of
``wan_reference.md`` section 7.2, in the original Wan-AI layout (sharded, with an index) and as a
Self-Forcing ``.pt``.
"""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import PartitionSpec as P

from afd_jax import mesh as mesh_lib
from afd_jax.models import attention as attn_lib
from afd_jax.models import wan, wan_checkpoint
from conftest import jitted, rel_l2

TINY_DIFFUSERS = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16,
                      in_channels=16, out_channels=16, text_dim=32, freq_dim=32, ffn_dim=128,
                      num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
                      rope_max_seq_len=1024)
TINY_ORIGINAL = {"_class_name": "WanModel", "model_type": "t2v", "dim": 64, "ffn_dim": 128,
                 "freq_dim": 32, "in_dim": 16, "out_dim": 16, "num_heads": 4, "num_layers": 2,
                 "patch_size": [1, 2, 2], "text_len": 512, "text_dim": 32, "eps": 1e-6,
                 "qk_norm": True, "cross_attn_norm": True}

# wan_reference.md section 7.2: original -> diffusers, substring replacement in this order.
RENAME = [("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
          ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
          ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
          ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
          ("time_projection.1", "condition_embedder.time_proj"),
          ("head.modulation", "scale_shift_table"), ("head.head", "proj_out"),
          ("modulation", "scale_shift_table"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
          ("norm2", "__placeholder__"), ("norm3", "norm2"), ("__placeholder__", "norm3")]
for _a, _b in (("self_attn", "attn1"), ("cross_attn", "attn2")):
  RENAME += [(f"{_a}.q", f"{_b}.to_q"), (f"{_a}.k", f"{_b}.to_k"), (f"{_a}.v", f"{_b}.to_v"),
             (f"{_a}.o", f"{_b}.to_out.0"), (f"{_a}.norm_q", f"{_b}.norm_q"),
             (f"{_a}.norm_k", f"{_b}.norm_k")]


def original_keys(num_layers):
  keys = ["patch_embedding.weight", "patch_embedding.bias", "head.modulation", "head.head.weight",
          "head.head.bias"]
  for m in ("text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
            "time_projection.1"):
    keys += [f"{m}.weight", f"{m}.bias"]
  block = ["modulation", "norm3.weight", "norm3.bias", "ffn.0.weight", "ffn.0.bias", "ffn.2.weight",
           "ffn.2.bias"]
  for a in ("self_attn", "cross_attn"):
    block += [f"{a}.{p}.{w}" for p in "qkvo" for w in ("weight", "bias")]
    block += [f"{a}.norm_q.weight", f"{a}.norm_k.weight"]
  return keys + [f"blocks.{i}.{k}" for i in range(num_layers) for k in block]


def to_diffusers_name(key):
  for a, b in RENAME:
    key = key.replace(a, b)
  return key


def original_state_numpy(seed=0):
  """A random original-named state dict of the tiny model, without torch."""
  d, f = 64, 128
  linear = {"text_embedding.0": (d, 32), "text_embedding.2": (d, d), "time_embedding.0": (d, 32),
            "time_embedding.2": (d, d), "time_projection.1": (6 * d, d), "head.head": (64, d),
            "ffn.0": (f, d), "ffn.2": (d, f)}

  def shape(key):
    if key == "patch_embedding.weight":
      return (d, 16, 1, 2, 2)
    if key.endswith("modulation"):
      return (1, 2 if key.startswith("head") else 6, d)
    stem, kind = key.rsplit(".", 1)
    stem = re.sub(r"^blocks\.\d+\.", "", stem)
    if "norm" in stem:
      return (d,)
    out_in = linear.get(stem, (d, d))
    return out_in if kind == "weight" else out_in[:1]

  rng = np.random.default_rng(seed)
  return {k: (0.2 * rng.standard_normal(shape(k))).astype(np.float32) for k in original_keys(2)}


def write_original(sd, directory, shards=1):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(TINY_ORIGINAL))
  keys = sorted(sd)
  if shards == 1:
    safetensors.numpy.save_file(dict(sd), directory / "diffusion_pytorch_model.safetensors")
    return directory
  weight_map = {}
  for i in range(shards):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
    part = {k: np.ascontiguousarray(sd[k]) for k in keys[i::shards]}
    safetensors.numpy.save_file(part, directory / name)
    weight_map.update({k: name for k in part})
  (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


def test_original_and_diffusers_names_map_both_ways():
  """The export's renames (``save_diffusers``) are the documented table, and invert the reader's."""
  for key in original_keys(2):
    name = wan_checkpoint.original_to_diffusers(key)
    assert name == to_diffusers_name(key), key
    assert wan_checkpoint.diffusers_to_original(name) == key


# ----------------------------------------------------------------------------------------------
# PyTorch reference (diffusers).


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch = pytest.importorskip("torch")
  transformer_wan = pytest.importorskip("diffusers.models.transformers.transformer_wan")
  torch.manual_seed(0)
  model = transformer_wan.WanTransformer3DModel(**TINY_DIFFUSERS).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("wan_ckpts")
  model.save_pretrained(root / "diffusers")
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  original = {k: sd[to_diffusers_name(k)] for k in original_keys(2)}
  assert len(original) == len(sd), "the documented rename table must cover every diffusers key"
  write_original(original, root / "original", shards=2)
  torch.save({"generator": {f"model._fsdp_wrapped_module.{k}": torch.zeros(v.shape)
                            for k, v in original.items()},
              "generator_ema": {f"model.{k}": torch.from_numpy(v) for k, v in original.items()}},
             root / "self_forcing.pt")
  return model, root


def _wan_padded(context, text_len=TINY_ORIGINAL["text_len"]):
  """Wan's text convention, which diffusers leaves to its pipeline: zero rows up to text_len."""
  context = np.asarray(context)
  return np.pad(context, ((0, 0), (0, text_len - context.shape[1]), (0, 0)))


def torch_forward(model, latents, t, context, mask=None):
  """diffusers forward on channel-last latents; per-frame ``t`` is expanded to per-token."""
  import torch
  from diffusers.models.transformers.transformer_wan import WanAttnProcessor

  class MaskedProcessor(WanAttnProcessor):
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
      return super().__call__(attn, hidden_states, encoder_hidden_states,
                              torch.from_numpy(mask), rotary_emb)

  b, f, h, w, _ = latents.shape
  t = np.asarray(t, np.float32)
  if t.ndim == 2:
    t = np.repeat(t, (h // 2) * (w // 2), axis=1)
  for block in model.blocks:
    block.attn1.set_processor(MaskedProcessor() if mask is not None else WanAttnProcessor())
  with torch.no_grad():
    out = model(torch.from_numpy(np.asarray(latents)).permute(0, 4, 1, 2, 3),
                timestep=torch.from_numpy(t),
                encoder_hidden_states=torch.from_numpy(_wan_padded(context))).sample
  return out.permute(0, 2, 3, 4, 1).numpy()


@pytest.fixture(scope="module")
def parity_inputs():
  rng = np.random.default_rng(1)
  latents = rng.standard_normal((2, 6, 4, 6, 16)).astype(np.float32)
  context = rng.standard_normal((2, 9, 32)).astype(np.float32)
  t_batch = np.array([937.5, 250.0], np.float32)
  t_frame = rng.uniform(0, 1000, (2, 6)).astype(np.float32)
  return latents, context, t_batch, t_frame


@pytest.mark.parametrize("layout", ["diffusers", "original"])
@pytest.mark.parametrize("timesteps", ["batch", "frame"])
@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_float32_parity_with_diffusers(reference, parity_inputs, layout, timesteps, attention):
  torch_model, root = reference
  latents, context, t_batch, t_frame = parity_inputs
  t = t_batch if timesteps == "batch" else t_frame
  model = wan.from_pretrained(root / layout, attention_kernel="dense")
  mask = None
  kwargs = {}
  if attention == "block_causal":
    mask = attn_lib.block_causal_mask(6 * 6, 3 * 6)
    kwargs = dict(attention="block_causal", chunk_frames=3)
  ours = jitted(model)(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(context), **kwargs)
  ref = torch_forward(torch_model, latents, t, context, mask)
  assert rel_l2(ours, ref) < 1e-4, rel_l2(ours, ref)


def test_self_forcing_pt_picks_ema_and_strips_wrappers(reference, parity_inputs):
  _, root = reference
  ema = wan.from_pretrained(root / "self_forcing.pt", num_heads=4)
  original = wan.from_pretrained(root / "original")
  for a, b in zip(jax.tree.leaves(nnx.state(ema)), jax.tree.leaves(nnx.state(original))):
    np.testing.assert_array_equal(a, b)
  generator = wan.from_pretrained(root / "self_forcing.pt", pt_key="generator", num_heads=4)
  assert float(jnp.abs(generator.blocks.ffn_in.kernel[...]).max()) == 0.0


def test_bfloat16_safetensors_load_exactly(tmp_path):
  torch = pytest.importorskip("torch")
  import safetensors.torch
  sd = original_state_numpy()
  write_original(sd, tmp_path / "fp32")
  (tmp_path / "bf16").mkdir()
  (tmp_path / "bf16" / "config.json").write_text(json.dumps(TINY_ORIGINAL))
  safetensors.torch.save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()},
                              tmp_path / "bf16" / "diffusion_pytorch_model.safetensors")
  bf16 = nnx.state(wan.from_pretrained(tmp_path / "bf16"))
  fp32 = nnx.state(wan.from_pretrained(tmp_path / "fp32"))
  for a, b in zip(jax.tree.leaves(bf16), jax.tree.leaves(fp32)):
    np.testing.assert_array_equal(a, np.asarray(jnp.asarray(b).astype(jnp.bfloat16), np.float32))


def test_convert_tool_round_trip_and_sharded_load(reference, tmp_path):
  _, root = reference
  dst = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "afd_jax.tools.convert_wan",
                         str(root / "self_forcing.pt"), str(dst), "--num_heads=4"],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (dst / wan_checkpoint.CONVERTED_MARKER).exists()
  source = nnx.state(wan.from_pretrained(root / "original"))
  converted = wan.from_pretrained(dst)
  for a, b in zip(jax.tree.leaves(nnx.state(converted)), jax.tree.leaves(source)):
    np.testing.assert_array_equal(a, b)

  mesh = mesh_lib.make_mesh(8, data=2, fsdp=4)
  shard_embed = lambda state: mesh_lib.param_shardings(state, mesh, (("embed", "fsdp"),))
  for path in (dst, root / "original"):  # the converted and the original layout, placed as loaded
    kernel = wan.from_pretrained(path, shardings=shard_embed).blocks.ffn_in.kernel[...]
    assert kernel.sharding.spec == P(None, "fsdp", None)
    np.testing.assert_array_equal(kernel, source["blocks"]["ffn_in"]["kernel"][...])
  with pytest.raises(FileExistsError):
    wan_checkpoint.save_converted(converted, dst)


# ----------------------------------------------------------------------------------------------
# Layout detection and bad input (no torch needed).


def test_single_file_safetensors_infers_config(tmp_path):
  sd = original_state_numpy()
  safetensors.numpy.save_file(sd, tmp_path / "model.safetensors")
  model = wan.from_pretrained(tmp_path / "model.safetensors", num_heads=4)
  assert (model.config.dim, model.config.num_layers, model.config.ffn_dim) == (64, 2, 128)
  with pytest.raises(wan_checkpoint.CheckpointError, match="pass num_heads"):
    wan.from_pretrained(tmp_path / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_listed(tmp_path):
  sd = original_state_numpy()
  del sd["blocks.1.ffn.0.bias"]
  sd["blocks.0.img_emb.weight"] = np.zeros((3,), np.float32)
  sd["head.head.weight"] = np.zeros((64, 32), np.float32)
  write_original(sd, tmp_path)
  with pytest.raises(wan_checkpoint.CheckpointError) as err:
    wan.from_pretrained(tmp_path)
  msg = str(err.value)
  assert "missing keys: blocks.1.ffn.0.bias" in msg
  assert "unexpected keys: blocks.0.img_emb.weight" in msg
  assert "head.head.weight: checkpoint (64, 32) vs model (64, 64)" in msg


def test_unknown_layouts_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    wan.from_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(wan_checkpoint.CheckpointError, match="unknown checkpoint layout"):
    wan.from_pretrained(tmp_path / "empty")
  other = write_original(original_state_numpy(), tmp_path / "other")
  (other / "config.json").write_text(json.dumps({"_class_name": "UNet3DConditionModel"}))
  with pytest.raises(wan_checkpoint.CheckpointError, match="unknown checkpoint layout"):
    wan.from_pretrained(other)
  (tmp_path / "weights.onnx").write_bytes(b"x")
  with pytest.raises(wan_checkpoint.CheckpointError, match="unknown checkpoint layout"):
    wan.from_pretrained(tmp_path / "weights.onnx")
  i2v = dict(TINY_ORIGINAL, model_type="i2v")
  (other / "config.json").write_text(json.dumps(i2v))
  with pytest.raises(wan_checkpoint.CheckpointError, match="text-to-video"):
    wan.from_pretrained(other)


def test_corrupt_and_incomplete_files_are_reported(tmp_path):
  d = write_original(original_state_numpy(), tmp_path / "trunc")
  f = d / "diffusion_pytorch_model.safetensors"
  f.write_bytes(f.read_bytes()[:5000])
  with pytest.raises(wan_checkpoint.CheckpointError, match="truncated or corrupt"):
    wan.from_pretrained(d)
  sharded = write_original(original_state_numpy(), tmp_path / "sharded", shards=2)
  next(sharded.glob("*-00002-of-00002.safetensors")).unlink()
  with pytest.raises(wan_checkpoint.CheckpointError, match="missing"):
    wan.from_pretrained(sharded)


def test_malformed_json_and_nonfinite_weights_are_named(tmp_path):
  bad_json = write_original(original_state_numpy(), tmp_path / "bad_json")
  (bad_json / "config.json").write_text('{"_class_name": "WanModel", "dim": ')
  with pytest.raises(wan_checkpoint.CheckpointError, match=r"bad_json/config.json is not readable"):
    wan.from_pretrained(bad_json)

  sd = original_state_numpy()
  sd["blocks.1.ffn.0.bias"][3] = np.nan
  with pytest.raises(wan_checkpoint.CheckpointError,
                     match=r"/nan holds non-finite weights in 1 tensor.*\['blocks'\]\['ffn_in'\]"):
    wan.from_pretrained(write_original(sd, tmp_path / "nan"))
  model = wan.from_pretrained(write_original(original_state_numpy(), tmp_path / "ok"))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.ndim else x, state)
  dst = wan_checkpoint.save_converted(nnx.merge(graphdef, state), tmp_path / "inf")
  with pytest.raises(wan_checkpoint.CheckpointError, match="inf holds non-finite weights"):
    wan.from_pretrained(dst)
  (dst / wan_checkpoint.CONVERTED_MARKER).write_text("not json")
  with pytest.raises(wan_checkpoint.CheckpointError, match="afd_wan.json is not readable JSON"):
    wan.from_pretrained(dst)


def test_pt_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)
  (tmp_path / "student.pt").write_bytes(b"not read")
  with pytest.raises(ImportError, match=r"pip install 'afd_jax\[torch\]'"):
    wan.from_pretrained(tmp_path / "student.pt")


def test_unknown_runtime_option_is_refused(tmp_path):
  with pytest.raises(TypeError, match="unknown options"):
    wan.from_pretrained(tmp_path, dim=3)


def test_no_module_of_the_package_imports_itself_back():
  """Formats never import the models that load them (``wan`` -> ``wan_checkpoint``, not back):
  the module-level import graph of ``afd_jax`` has no cycle."""
  import ast
  import pathlib

  import afd_jax
  root = pathlib.Path(afd_jax.__file__).parent
  graph = {}
  for f in root.rglob("*.py"):
    name = ".".join(("afd_jax",) + f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    deps = set()
    for node in ast.parse(f.read_text()).body:   # module level only; TYPE_CHECKING blocks are ifs
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("afd_jax"):
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          deps.add(sub if (root.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
      elif isinstance(node, ast.Import):
        deps.update(a.name for a in node.names if a.name.startswith("afd_jax"))
    graph[name] = deps
  done, path = set(), []

  def visit(module):
    assert module not in path, "import cycle: " + " -> ".join(path[path.index(module):] + [module])
    if module in done:
      return
    path.append(module)
    for dep in sorted(graph.get(module, ())):
      visit(dep)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)
  assert "afd_jax.models.wan_checkpoint" in graph["afd_jax.models.wan"]
