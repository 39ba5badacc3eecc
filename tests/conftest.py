"""CPU test setup: 8 fake devices (set before jax is imported), tiny models, shared helpers."""

import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared by the xdist workers and their
# subprocess runs: the trainer tests compile the same programs many times.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(),
    "afd_jax_jit_cache_" + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
# 8 fake CPU devices; LLVM's cheap optimisation level and XLA:CPU's older loop emitters, as
# compiling dominates a test's time (about 30% and a further 15% less CPU; results stay
# IEEE-exact, no fast math, though two programs computing the same values may round apart).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true"
                           " --xla_cpu_use_fusion_emitters=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from afd_jax.models import wan  # noqa: E402


def randomize(model: wan.WanModel, seed: int = 0, scale: float = 0.05) -> wan.WanModel:
  """Perturbs every parameter (zero head, unit norms, zero biases included) so that every term
  of the network shows up in the output and parity tests cannot pass by accident."""
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), state)
  return nnx.merge(graphdef, state)


_STATIC = ("attention", "chunk_frames", "window_frames", "sink_frames")
_STATIC_POS = {"context_kv": (1,), "forward_with_context": (3,)}


def jitted(model, method: str = "__call__"):
  """``model.method`` as one jitted program (eager NNX dispatch is slow on 2 CPU cores)."""
  graphdef, state = nnx.split(model)
  static = tuple(i + 1 for i in _STATIC_POS.get(method, ()))  # +1: the state comes first
  fn = jax.jit(lambda s, *a, **kw: getattr(nnx.merge(graphdef, s), method)(*a, **kw),
               static_argnums=static, static_argnames=_STATIC)
  return lambda *a, **kw: fn(state, *a, **kw)


def rel_l2(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def tiny_cfg():
  return wan.preset("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
  return randomize(wan.init(tiny_cfg, seed=0))


@pytest.fixture(scope="session")
def inputs(tiny_cfg):
  """Latents [2, 6, 4, 6, 16] (two 3-frame chunks of 6 tokens per frame) and a text context."""
  rng = np.random.default_rng(42)
  latents = jnp.asarray(rng.standard_normal((2, 6, 4, 6, tiny_cfg.in_dim)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 7, tiny_cfg.text_dim)), jnp.float32)
  return latents, context


def assert_same_run(reference, state, config):
  """Two training states of the same run computed on different devices or process layouts.

  Adam (b1 = 0) scales each gradient element to about +-lr, so an element whose gradient is at
  the float-noise level (e.g. the discriminator's logit bias, invisible to the BT loss) may differ
  by up to 2 lr per step; all others agree tightly."""
  bound = 2 * 2 * max(config.optim.disc.lr, config.optim.student.lr)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(reference))[0],
                          jax.tree.leaves(jax.device_get(state))):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    where = jax.tree_util.keystr(path)
    assert diff.max() <= bound, where
    assert np.sum(diff > 2e-5 + 2e-4 * np.abs(a)) <= max(1, a.size // 1000), where


_SLOW_MODULES = ("test_distributed.py", "test_train.py", "test_mesh.py", "test_experiment.py")


def pytest_collection_modifyitems(items):
  """Slow modules first (longest-first scheduling): with ``--dist worksteal`` (setup.cfg) the
  workers end on short tests they take from each other, not on one minute-long trainer run."""
  items.sort(key=lambda item: item.path.name not in _SLOW_MODULES)


@pytest.fixture(scope="session")
def diffusers_vae(tmp_path_factory):
  """A small random-weight diffusers ``AutoencoderKLWan`` (Wan2.1 topology, base_dim 8) and the
  folder it is saved in (config.json + safetensors): the PyTorch reference of the VAE tests."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16).eval()
  with torch.no_grad():  # unit gammas and zero biases would hide mistakes in their conversion
    for name, p in model.named_parameters():
      if name.endswith("gamma"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("vae") / "diffusers"
  model.save_pretrained(path)
  return model, path


@pytest.fixture(scope="session")
def small_vae(tmp_path_factory):
  """A small random Wan VAE in the converted (Orbax) format: no torch needed to use it."""
  from afd_jax.models import wan_vae, wan_vae_checkpoint
  path = tmp_path_factory.mktemp("vae") / "converted"
  wan_vae_checkpoint.save_converted(wan_vae.init(wan_vae.VAEConfig(base_dim=8), seed=1), path)
  return path


def make_tokenizer(folder):
  """A word-level tokenizer folder with T5's special tokens (pad 0, end 1, unknown 2) and its
  end-of-sequence post-processing, which transformers reads like Wan's google/umt5-xxl."""
  import json
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)] + ["a", "red", "ball"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "eos_token": "</s>",
      "unk_token": "<unk>", "model_max_length": 512}))
  return folder
