"""Multi-host start-up through JAX's own distributed runtime.

One process per host (TPU VM worker, GPU node or SLURM task). ``jax.distributed.initialize``
must run before anything touches a device; it finds the cluster itself on Cloud TPU, GKE and
SLURM, and takes ``--coordinator_address/--num_processes/--process_id`` everywhere else (a
GPU cluster without SLURM, or several processes on one machine).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from afd_jax import errors


def detected_cluster() -> str | None:
  """The multi-process cluster JAX can configure itself from the environment, if any."""
  if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1):
  """Joins the job. Explicit arguments win; else an auto-detected cluster; else one process."""
  explicit = (coordinator_address, num_processes, process_id >= 0)
  if any(explicit):
    if not all(explicit):
      raise errors.UserError(
          "multi-process runs need all three of --coordinator_address (HOST:PORT of process 0), "
          f"--num_processes and --process_id; got coordinator_address={coordinator_address!r}, "
          f"num_processes={num_processes}, process_id={process_id}.")
    if not 0 <= process_id < num_processes:
      raise errors.UserError(f"--process_id={process_id} must lie in [0, --num_processes="
                       f"{num_processes}).")
    if ":" not in coordinator_address:
      raise errors.UserError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT.")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif (cluster := detected_cluster()) is not None:
    logging.info("joining the %s cluster found in the environment", cluster)
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
