"""Networks and the training state: the student, the discriminator on its trunk, and the one pytree
(every network, optimizer state, step and RNG) the trainer steps, sharded over the mesh by the
config's logical rules. ``abstract=True`` builds shapes and shardings only (a resume restores
into it; the planner compiles against it)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from afd_jax import lora as lora_lib
from afd_jax import mesh as mesh_lib
from afd_jax import optim
from afd_jax.methods import NFT, WITH_DISC
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan

def model_runtime(config) -> dict:
  """``config.model``'s runtime settings (WanConfig.RUNTIME_FIELDS but the parameter dtype), for
  every Wan network the trainer builds: the student and the discriminator's trunk alike."""
  m = config.model
  return dict(dtype=m.dtype, attention_kernel=m.attention_kernel, scan_layers=m.scan_layers,
              remat_policy=m.remat_policy)


def build_student(config, shardings=None, abstract: bool = False) -> wan.WanModel:
  """The student from ``config.model``, each parameter placed by ``shardings`` (a callable from
  the abstract NNX state to a pure dict of shardings) as it is created or loaded. ``abstract``
  gives shapes and metadata only: a checkpoint's architecture is read, its weights are not."""
  m = config.model
  runtime = model_runtime(config)
  cfg = (wan.load_config(m.checkpoint, **runtime) if m.checkpoint
         else wan.preset(m.preset, **runtime, **m.overrides))
  if abstract:
    return wan.abstract(cfg)
  if m.checkpoint:
    return wan.from_pretrained(m.checkpoint, shardings=shardings, **runtime)
  return wan.init(cfg, seed=config.seed, shardings=shardings and shardings(nnx.state(
      wan.abstract(cfg))))


def build_discriminator(config, student: wan.WanModel, shardings=None,
                        abstract: bool = False) -> disc_lib.Discriminator:
  """Readouts and head on a trunk: ``config.disc.checkpoint``, or a copy of the student. Fresh
  parameters are created in one jitted program straight into ``shardings`` (as for the student)."""
  cfg = disc_lib.DiscriminatorConfig(readout_layers=tuple(config.disc.readout_layers),
                                     readout_ffn_dim=config.disc.readout_ffn_dim,
                                     freeze_below=config.disc.freeze_below,
                                     input=config.disc.input,
                                     coarse_pool=config.disc.coarse_pool,
                                     chunk_frames=(config.rollout.chunk_frames
                                                   if config.disc.per_chunk else 0))
  path, seed = config.disc.checkpoint, config.seed + 1
  runtime = model_runtime(config)
  trunk_cfg = wan.load_config(path, **runtime) if path else student.config
  shapes = nnx.eval_shape(lambda: disc_lib.init(wan.WanModel(trunk_cfg, rngs=nnx.Rngs(0)), cfg))
  if abstract:
    return shapes
  trunk = wan.from_pretrained(path, shardings=shardings, **runtime) if path else student
  trunk_graph, trunk_state = nnx.split(trunk)
  graph, state = nnx.split(shapes)
  make = jax.jit(lambda t: nnx.to_pure_dict(nnx.state(disc_lib.init(nnx.merge(trunk_graph, t),
                                                                    cfg, seed=seed))),
                 out_shardings=shardings and shardings(state))
  nnx.replace_by_pure_dict(state, make(trunk_state))
  return nnx.merge(graph, state)


@dataclasses.dataclass
class Networks:
  """The static half of the training state: graph definitions, optimizers, shardings, and the
  frozen bases that adapters apply to (``frozen[name]``, None for a fully trained network)."""

  student_graph: nnx.GraphDef
  student_config: wan.WanConfig
  tx_student: optax.GradientTransformation
  disc_graph: nnx.GraphDef | None
  disc_config: tuple | None      # (DiscriminatorConfig, trunk WanConfig): what disc_graph holds
  tx_disc: optax.GradientTransformation | None
  tx_critic: optax.GradientTransformation | None
  state_sharding: dict
  logical_names: dict          # logical axis names of every trained parameter, by network
  lora: dict                   # {"student", "disc"}: lora.LoRA, or None (full fine-tuning)
  frozen: dict                 # {"student", "disc"}: the base adapters apply to, or None
  fingerprint: dict            # {"student", "disc"}: lora.fingerprint of each loaded base


def build_state(config, mesh, abstract: bool = False, abstract_base: bool | None = None):
  """``(networks, state)``: every network, optimizer state, the step and the RNG of
  ``config.method``, each parameter placed by the sharding its logical rule names, optimizer
  moments like their parameters, counters replicated. ``abstract`` returns ShapeDtypeStructs
  carrying the shardings and allocates nothing (the compile-only planner). With adapters, the
  state holds adapter sets and ``networks.frozen`` the bases; ``abstract_base=False`` loads the
  bases of an abstract state (a resume restores adapters into it; default: ``abstract``)."""
  abstract_base = abstract if abstract_base is None else abstract_base
  rules = mesh_lib.check_rules(config.logical_rules)
  shardings = lambda state: mesh_lib.param_shardings(state, mesh, rules)
  replicated = mesh_lib.replicated(mesh)
  with_disc = config.method in WITH_DISC
  lora = {"student": lora_lib.from_config(config.model),
          "disc": lora_lib.from_config(config.disc, within="trunk") if with_disc else None}
  real_base = {"student": not abstract_base and bool(
                   lora["student"] or (lora["disc"] and not config.disc.checkpoint)),
               "disc": not abstract_base and bool(lora["disc"])}
  student = build_student(config, shardings, abstract and not real_base["student"])
  graph, pstate = nnx.split(student)
  params = nnx.to_pure_dict(pstate)
  net_sh, net_params = {"student": shardings(pstate)}, {"student": params}
  names = {"student": mesh_lib.logical_names(pstate)}
  disc_graph = disc_config = tx_disc = tx_critic = None
  if with_disc:
    disc = build_discriminator(config, student, shardings, abstract and not real_base["disc"])
    disc_config = (disc.config, disc.trunk.config)
    disc_graph, dstate = nnx.split(disc)
    net_sh["disc"], net_params["disc"] = shardings(dstate), nnx.to_pure_dict(dstate)
    names["disc"] = mesh_lib.logical_names(dstate)
    tx_disc = optim.disc_optimizer(config.optim.disc, config.disc.freeze_below,
                                   config.train.max_nonfinite, lora=bool(lora["disc"]))

  # What the state trains of each network: all of it, or an adapter set over the frozen base.
  trained_sh, trained, frozen, fingerprint = {}, {}, {"student": None, "disc": None}, {}
  for name, p in net_params.items():
    spec = lora[name]
    if spec is None:
      trained_sh[name], trained[name] = net_sh[name], p
      continue
    trained_sh[name] = lora_lib.shardings(net_sh[name], p, spec, mesh)
    trained[name] = jax.eval_shape(lambda p, s=spec: lora_lib.init(jax.random.key(0), p, s), p)
    names[name] = lora_lib.logical_names(names[name], p, spec)
    base = lora_lib.frozen(p, spec)
    if real_base[name] or not abstract:
      fingerprint[name] = jax.jit(lora_lib.fingerprint, out_shardings=replicated)(base)
    else:
      base = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base,
                          lora_lib.frozen(net_sh[name], spec))
    frozen[name] = base

  tx = optim.optimizer(config.optim.student, config.train.max_nonfinite)
  student_sh = trained_sh["student"]
  opt_sh = lambda tx, name: mesh_lib.opt_state_shardings(tx, trained[name], trained_sh[name], mesh)
  sharding = {"student": {"params": student_sh, "ema": student_sh, "opt": opt_sh(tx, "student")},
              "step": replicated, "rng": replicated}
  if config.method in NFT:
    sharding.update(old=student_sh)
  if config.method == "dmd":   # the real score (the initial student) and the fake one
    tx_critic = optim.optimizer(config.optim.critic, config.train.max_nonfinite)
    sharding.update(critic={"params": student_sh, "opt": opt_sh(tx_critic, "student")})
  if config.method in NFT + ("dmd",) and not lora["student"]:
    sharding.update(ref=student_sh)   # with adapters the reference is the base, adapters off
  if with_disc:
    sharding.update(disc={"params": trained_sh["disc"], "opt": opt_sh(tx_disc, "disc")})
  if any(lora.values()):
    sharding.update(lora_base={k: replicated for k, v in lora.items() if v})
  nets = Networks(graph, student.config, tx, disc_graph, disc_config, tx_disc, tx_critic,
                  sharding, names, lora, frozen, fingerprint)

  def assemble(params, dparams, fingerprint):
    key = jax.random.key(config.seed + 2)
    if lora["student"]:
      params = lora_lib.init(key, params, lora["student"])
    if lora["disc"]:
      dparams = lora_lib.init(jax.random.fold_in(key, 1), dparams, lora["disc"])
    state = {"student": {"params": params, "ema": params, "opt": tx.init(params)},
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed))}
    if config.method in NFT:
      state.update(old=params)
    if config.method == "dmd":
      state.update(critic={"params": params, "opt": tx_critic.init(params)})
    if "ref" in sharding:
      state.update(ref=params)
    if dparams is not None:
      state.update(disc={"params": dparams, "opt": tx_disc.init(dparams)})
    if "lora_base" in sharding:
      state.update(lora_base=fingerprint)
    return jax.tree.map(jnp.copy, state)  # unshares the aliased copies of the student

  fingerprints = {k: fingerprint[k] if k in fingerprint
                  else jax.eval_shape(lora_lib.fingerprint, frozen[k]) for k, v in lora.items() if v}
  args = (params, net_params.get("disc"), fingerprints)
  if abstract:
    shapes = jax.eval_shape(assemble, *args)
    return nets, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shapes, sharding)
  return nets, jax.jit(assemble, out_shardings=sharding)(*args)
