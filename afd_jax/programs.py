"""The jitted step programs of one training configuration on one mesh, with explicit output
shardings and donation of the state they replace, compiled once and reused by every trainer of
the same configuration (a resume, an evaluation, a test)."""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from afd_jax import mesh as mesh_lib
from afd_jax import rollout as rollout_lib
from afd_jax import steps
from afd_jax.methods import GENERATOR, NFT, ON_POLICY, WITH_DISC, afd_config, rollout_config
from afd_jax.state import Networks

@dataclasses.dataclass
class StepFns:
  """The jitted programs of one training configuration on one mesh."""

  noise: Callable
  rollout: Callable
  train_rollout: Callable | None = None   # GENERATOR methods: ends chunks at an exit step
  fm: Callable | None = None
  disc: Callable | None = None            # AFD: the advantage too, in the same program
  score: Callable | None = None
  advantage: Callable | None = None       # the oracle's, from its physics scores
  student: Callable | None = None         # NFT: the old policy's update too
  critic: Callable | None = None


_STEP_FNS: collections.OrderedDict = collections.OrderedDict()
_KEEP = 8  # configurations whose programs stay compiled (tests build many)


def make_step_fns(config, nets: Networks, mesh, latent_shape) -> StepFns:
  """Jitted steps with explicit output shardings and donation of the state they replace.

  Memoised (the last few) on exactly what the programs close over: the method, the frozen step
  and rollout settings, the optimizers' hyperparameters, the networks' configurations, the batch,
  the mesh and the shardings; so a second trainer of the same configuration reuses the traced
  and compiled programs."""
  key = (config.method, afd_config(config), rollout_config(config), _frozen(config.optim),
         _frozen(config.disc), config.train.max_nonfinite, config.train.micro_batches,
         config.data.batch_size, tuple(latent_shape), mesh, nets.student_config,
         nets.disc_config, nets.lora["student"], nets.lora["disc"],
         tuple(jax.tree.leaves(nets.state_sharding)),
         jax.tree.structure(nets.state_sharding))
  if key in _STEP_FNS:
    _STEP_FNS.move_to_end(key)
  else:
    _STEP_FNS[key] = _make_step_fns(config, nets, mesh, latent_shape)
    while len(_STEP_FNS) > _KEEP:
      _STEP_FNS.popitem(last=False)
  return _STEP_FNS[key]


def _frozen(section):
  """A config section as a hashable value."""
  if hasattr(section, "items"):
    return tuple(sorted((k, _frozen(v)) for k, v in section.items()))
  return tuple(_frozen(v) for v in section) if isinstance(section, (list, tuple)) else section


def _make_step_fns(config, nets: Networks, mesh, latent_shape) -> StepFns:
  sh, afd = nets.state_sharding, afd_config(config)
  graph, micro = nets.student_graph, config.train.micro_batches
  lora, dlora = nets.lora["student"], nets.lora["disc"]
  batch = mesh_lib.batch_sharding(mesh)
  fns = StepFns(
      noise=jax.jit(lambda k, rows: jax.random.normal(k, (rows, *latent_shape), jnp.float32),
                    static_argnums=1, out_shardings=batch),
      rollout=rollout_lib.make_rollout(graph, rollout_config(config), out_shardings=batch,
                                       micro_batches=micro, lora=lora))
  student_out = (sh["student"], None)
  if config.method not in ON_POLICY:
    fns.fm = jax.jit(steps.make_fm_step(graph, nets.tx_student, afd, lora=lora),
                     donate_argnums=(0,),
                     out_shardings=student_out)
    return fns
  if config.method in WITH_DISC:
    disc_out = (sh["disc"]["params"], sh["disc"]["opt"], None)
    nft = config.method in NFT
    fns.disc = jax.jit(steps.make_disc_step(nets.disc_graph, nets.tx_disc, afd, lora=dlora,
                                            with_advantage=nft),
                       donate_argnums=(0, 1), out_shardings=disc_out)
    fns.score = jax.jit(steps.make_disc_step(nets.disc_graph, nets.tx_disc, afd, update=False,
                                             lora=dlora, with_advantage=nft))
  if config.method in GENERATOR:
    fns.train_rollout = rollout_lib.make_rollout(graph, rollout_config(config),
                                                 out_shardings=(batch, batch),
                                                 micro_batches=micro, exit_inputs=True,
                                                 lora=lora)
  if config.method == "gan":
    fns.student = jax.jit(steps.make_gan_step(graph, nets.disc_graph, nets.tx_student, afd,
                                              lora=lora, disc_lora=dlora),
                          donate_argnums=(0,), out_shardings=student_out)
    return fns
  if config.method == "dmd":
    fns.critic = jax.jit(steps.make_fm_step(graph, nets.tx_critic, afd, critic=True, lora=lora),
                         donate_argnums=(0,), out_shardings=(sh["critic"], None))
    fns.student = jax.jit(steps.make_dmd_step(graph, nets.tx_student, afd, lora=lora),
                          donate_argnums=(0,),
                          out_shardings=student_out)
    return fns
  if config.method == "afd_oracle":
    fns.advantage = jax.jit(lambda t, s: steps.advantage(t, s, afd))
  student_step = steps.make_student_step(graph, nets.tx_student, afd, lora=lora)

  n = afd.student_steps

  def student_and_old(student, old, ref, x0, context, r, key, step, frozen=None):
    """``afd.student_steps`` NFT updates on the iteration's rollouts, each with its own noise
    levels and noise (DiffusionNFT's inner epochs; the first draws as one update does), then the
    old policy's one move toward the new parameters; both count optimizer steps, as
    DiffusionNFT's do."""
    if n == 1:
      student, metrics = student_step(student, old, ref, x0, context, r, key, step, frozen)
    else:
      keys = jnp.stack([key] + [jax.random.fold_in(key, i) for i in range(1, n)])
      student, metrics = jax.lax.scan(
          lambda s, inputs: student_step(s, old, ref, x0, context, r, inputs[0],
                                         step * n + inputs[1], frozen),
          student, (keys, jnp.arange(n)))
      metrics = jax.tree.map(jnp.mean, metrics)
    eta = steps.old_policy_eta((step + 1) * n, afd.old_decay_type)
    return student, steps.update_old(old, student["params"], eta), metrics

  fns.student = jax.jit(student_and_old, donate_argnums=(0, 1),
                        out_shardings=(sh["student"], sh["old"], None))
  return fns
