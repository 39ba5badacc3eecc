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

from afd_jax import mesh as mesh_lib
from afd_jax import optim
from afd_jax.methods import NFT, WITH_DISC
from afd_jax.models import discriminator as disc_lib
from afd_jax.models import wan
from afd_jax.models import wan_checkpoint

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
  cfg = (wan_checkpoint.load_config(m.checkpoint, **runtime) if m.checkpoint
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
                                     freeze_below=config.disc.freeze_below)
  path, seed = config.disc.checkpoint, config.seed + 1
  runtime = model_runtime(config)
  trunk_cfg = wan_checkpoint.load_config(path, **runtime) if path else student.config
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
  """The static half of the training state: graph definitions, optimizers, shardings."""

  student_graph: nnx.GraphDef
  student_config: wan.WanConfig
  tx_student: optax.GradientTransformation
  disc_graph: nnx.GraphDef | None
  disc_config: tuple | None      # (DiscriminatorConfig, trunk WanConfig): what disc_graph holds
  tx_disc: optax.GradientTransformation | None
  tx_critic: optax.GradientTransformation | None
  state_sharding: dict
  logical_names: dict          # logical axis names of every parameter, by network


def build_state(config, mesh, abstract: bool = False):
  """``(networks, state)``: every network, optimizer state, the step and the RNG of
  ``config.method``, each parameter placed by the sharding its logical rule names, optimizer
  moments like their parameters, counters replicated. ``abstract`` returns ShapeDtypeStructs
  carrying the shardings and allocates nothing (the compile-only planner)."""
  rules = mesh_lib.check_rules(config.logical_rules)
  shardings = lambda state: mesh_lib.param_shardings(state, mesh, rules)
  replicated = mesh_lib.replicated(mesh)
  student = build_student(config, shardings, abstract)
  graph, pstate = nnx.split(student)
  param_sh = shardings(pstate)
  names = {"student": mesh_lib.logical_names(pstate)}
  params = nnx.to_pure_dict(pstate)
  tx = optim.optimizer(config.optim.student, config.train.max_nonfinite)
  sharding = {"student": {"params": param_sh, "ema": param_sh,
                          "opt": mesh_lib.opt_state_shardings(tx, params, param_sh, mesh)},
              "step": replicated, "rng": replicated}
  disc_graph = disc_config = tx_disc = dparams = tx_critic = None
  if config.method in NFT:
    sharding.update(old=param_sh, ref=param_sh)
  if config.method == "dmd":   # the real score (the initial student) and the fake one
    tx_critic = optim.optimizer(config.optim.critic, config.train.max_nonfinite)
    sharding.update(ref=param_sh, critic={
        "params": param_sh, "opt": mesh_lib.opt_state_shardings(tx_critic, params, param_sh, mesh)})
  if config.method in WITH_DISC:
    disc = build_discriminator(config, student, shardings, abstract)
    disc_config = (disc.config, disc.trunk.config)
    disc_graph, dstate = nnx.split(disc)
    dparam_sh = shardings(dstate)
    names["disc"] = mesh_lib.logical_names(dstate)
    dparams = nnx.to_pure_dict(dstate)
    tx_disc = optim.disc_optimizer(config.optim.disc, config.disc.freeze_below,
                                   config.train.max_nonfinite)
    sharding.update(disc={
        "params": dparam_sh, "opt": mesh_lib.opt_state_shardings(tx_disc, dparams, dparam_sh, mesh)})
  nets = Networks(graph, student.config, tx, disc_graph, disc_config, tx_disc, tx_critic,
                  sharding, names)

  def assemble(params, dparams):
    state = {"student": {"params": params, "ema": params, "opt": tx.init(params)},
             "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(config.seed))}
    if config.method in NFT:
      state.update(old=params, ref=params)
    if config.method == "dmd":
      state.update(ref=params, critic={"params": params, "opt": tx_critic.init(params)})
    if dparams is not None:
      state.update(disc={"params": dparams, "opt": tx_disc.init(dparams)})
    return jax.tree.map(jnp.copy, state)  # unshares the aliased copies of the student

  if abstract:
    shapes = jax.eval_shape(assemble, params, dparams)
    return nets, jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              shapes, sharding)
  return nets, jax.jit(assemble, out_shardings=sharding)(params, dparams)
