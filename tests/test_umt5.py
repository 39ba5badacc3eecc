"""umT5 encoder (``afd_jax/models/umt5.py``): float32 parity with transformers' UMT5EncoderModel on
random weights (several prompt lengths, padding included), Wan's ``.pth`` names mapping to the
same parameters, the converted format, relative-position buckets, and ``encode_prompts`` in Wan's
convention with a tokenizer folder."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from afd_jax import errors
from afd_jax.models import umt5, umt5_checkpoint
from afd_jax.teachers import physics
from afd_jax.teachers import store as store_lib
from conftest import make_tokenizer, rel_l2

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_HF = dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.UMT5EncoderModel(transformers.UMT5Config(**TINY_HF)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "layer_norm" in name
              else 0.3 * torch.randn_like(p))
  root = tmp_path_factory.mktemp("umt5")
  model.save_pretrained(root / "hf")
  return model, root


def _batch(lengths, total=24, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 512, (len(lengths), total)).astype(np.int32)
  mask = np.arange(total)[None] < np.asarray(lengths)[:, None]
  return np.where(mask, ids, 0), mask


def _hf(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(),
                 attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()


@pytest.mark.parametrize("lengths", [(24, 24), (5, 17), (1, 24, 9)],
                         ids=["full", "padded", "mixed"])
def test_float32_parity_with_transformers(reference, lengths):
  model, root = reference
  ids, mask = _batch(lengths)
  encoder = umt5.from_pretrained(root / "hf", dtype="float32")
  assert encoder.config.architecture() == umt5.preset("tiny").architecture()
  ours = np.asarray(encoder(ids, mask))
  assert rel_l2(ours, _hf(model, ids, mask)) < 1e-4, rel_l2(ours, _hf(model, ids, mask))
  # The default: bf16 matmuls, fp32 norms, softmax and residual stream. These random weights make
  # sharp attention (T5 does not scale the logits), which bf16 rounding moves by a few percent.
  assert rel_l2(umt5.from_pretrained(root / "hf")(ids, mask), ours) < 0.1


def test_wan_pth_and_converted_layouts_load_the_same_parameters(reference, tmp_path):
  model, root = reference
  wan_names = {umt5_checkpoint.hf_to_wan(k): v.detach().clone()
               for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
  assert "blocks.1.ffn.gate.0.weight" in wan_names and "norm.weight" in wan_names
  torch.save(wan_names, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  hf = umt5.from_pretrained(root / "hf")
  wan = umt5.from_pretrained(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
  assert wan.config == hf.config
  pure = lambda m: nnx.to_pure_dict(nnx.state(m))
  jax.tree.map(np.testing.assert_array_equal, pure(wan), pure(hf))
  run = subprocess.run([sys.executable, "-m", "afd_jax.tools.convert_umt5",
                        str(tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"),
                        str(tmp_path / "converted")], capture_output=True, text=True)
  assert run.returncode == 0 and "layers=2 heads=4" in run.stdout, run.stderr[-2000:]
  converted = umt5.from_pretrained(tmp_path / "converted")
  jax.tree.map(np.testing.assert_array_equal, pure(converted), pure(hf))
  shapes = jax.tree.map(lambda x: x.shape, pure(hf))
  assert shapes["blocks"]["attn"]["relative_bias"] == (2, 32, 4)   # one bias per layer


def test_relative_buckets_match_the_reference():
  layer = transformers.models.umt5.modeling_umt5.UMT5Attention(
      transformers.UMT5Config(**TINY_HF), has_relative_attention_bias=True)
  n = 600
  rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
  want = layer._relative_position_bucket(rel).numpy()
  np.testing.assert_array_equal(umt5.relative_buckets(n, 32, 128), want)


def test_bad_checkpoints_are_named(reference, tmp_path):
  _, root = reference
  bad = tmp_path / "t5"
  bad.mkdir()
  cfg = json.loads((root / "hf" / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
  with pytest.raises(errors.UserError, match="not umT5"):
    umt5.from_pretrained(bad)
  torch.save({"token_embedding.weight": torch.zeros(8, 4)}, tmp_path / "broken.pth")
  with pytest.raises(errors.UserError, match="cannot read a umT5 encoder"):
    umt5.from_pretrained(tmp_path / "broken.pth")
  with pytest.raises(errors.MissingInput):
    umt5.from_pretrained(tmp_path / "absent.pth")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  folder = make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
  return folder, umt5.load_tokenizer(folder)


def test_encode_prompts_follows_wans_convention(reference, tokenizer):
  _, root = reference
  _, tokenizer = tokenizer
  encoder = umt5.from_pretrained(root / "hf", dtype="float32")
  prompts = ["a  red\n ball", "a red &amp; ball w1 w2 w3", " ".join(f"w{i}" for i in range(30))]
  ids, mask = umt5.tokenize(tokenizer, prompts, text_len=16)
  assert ids.shape == (3, 16) and mask.sum(1).tolist() == [4, 8, 16]   # end token; truncated
  assert ids[0, :4].tolist() == [43, 44, 45, 1]                        # whitespace cleaned
  # Wan's cleaning, step by step: ftfy repairs mojibake, entities unescape twice, spaces collapse.
  assert umt5.clean(" caf\u00c3\u00a9 &amp;amp;\t ball ") == "caf\u00e9 & ball"
  emb = umt5.encode_prompts(encoder, tokenizer, prompts, text_len=16, batch_size=2)
  assert emb.shape == (3, 16, 64) and emb.dtype == np.float32
  assert not np.any(emb[0, 4:]) and np.all(np.any(emb[0, :4], -1))     # zero past the tokens
  full = np.asarray(encoder(ids, mask))
  np.testing.assert_allclose(emb[mask], full[mask], rtol=1e-5, atol=1e-6)
  with pytest.raises(errors.UserError, match="not a tokenizer folder"):
    umt5.load_tokenizer(root / "nowhere")


def test_stores_embed_their_prompts_with_umt5_and_embed_prompts_resumes(reference, tokenizer,
                                                                         tmp_path):
  _, root = reference
  folder, tok = tokenizer
  prompts = ["a red ball", "w1 w2 w3 w4", "a ball"]
  teacher = physics.PhysicsTeacher(physics.PhysicsWorld(size=16, num_frames=3))
  (tmp_path / "videos").mkdir()
  for i in range(len(prompts)):   # any videos: the prompts here are free text
    np.save(tmp_path / "videos" / f"{i}.npy", teacher(["one red ball dropped, normal gravity, "
                                                       "bouncy"], i)[0])
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n"
                                                  for p in prompts))
  run = lambda module, *args: subprocess.run(
      [sys.executable, "-m", f"afd_jax.tools.{module}", *map(str, args)], capture_output=True,
      text=True, timeout=300)
  built = run("build_teacher_store", "--prompts", tmp_path / "prompts.jsonl", "--videos",
              tmp_path / "videos", "--out", tmp_path / "store", "--text_embeddings", "umt5",
              "--t5", root / "hf", "--tokenizer", folder, "--text_length", 16)
  assert built.returncode == 0, built.stderr[-3000:]
  store = store_lib.TeacherStore(tmp_path / "store")
  assert store.text_shape == (16, 64)
  want = umt5.encode_prompts(umt5.from_pretrained(root / "hf"), tok, prompts, text_len=16)
  np.testing.assert_allclose(np.stack([store.embeddings[i] for i in range(3)]), want, rtol=1e-5,
                             atol=1e-6)
  again = run("embed_prompts", "--prompts", tmp_path / "prompts.jsonl", "--t5", root / "hf",
              "--tokenizer", folder, "--out", tmp_path / "store_text", "--text_len", 16)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "0 prompts embedded, 3 already there" in again.stdout


def test_a_physics_or_online_teachers_prompts_can_be_embedded_with_umt5(reference, tokenizer,
                                                                          tmp_path):
  from afd_jax import methods, teachers
  from afd_jax.models import wan
  from configs import demo
  _, root = reference
  folder, tok = tokenizer
  c = demo.get_config()
  c.data.text_encoder, c.data.t5, c.data.tokenizer = "umt5", str(root / "hf"), str(folder)
  c.data.num_prompts, c.data.num_eval_prompts = 6, 2
  methods.validate(c)
  data = teachers.from_config(c, wan.preset("tiny", text_dim=64, in_dim=12, out_dim=12), tmp_path)
  want = umt5.encode_prompts(umt5.from_pretrained(root / "hf"), tok, data.pool.prompts,
                             text_len=16)
  np.testing.assert_allclose(data.pool.embeddings[np.arange(8)], want, rtol=1e-5, atol=1e-6)
  assert data.pool.embeddings.shape == (8, 16, 64) and len(list(tmp_path.glob("*/*.npy"))) == 8
  c.data.t5 = str(tmp_path / "absent")
  with pytest.raises(errors.UserError, match="text_encoder='umt5' needs config.data.t5"):
    methods.validate(c)
