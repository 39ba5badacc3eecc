#!/usr/bin/env bash
# Ship afd_jax to every worker of a TPU VM, install it, and start training on all workers at once
# (in the background; each worker logs to ~/afd_logs/worker_<id>.log, see tail.sh).
#
#   launch/tpu/run.sh --name NAME --zone ZONE --workdir DIR [options] [-- --config.KEY=VALUE ...]
#
#   --name NAME          TPU VM name                                               (required)
#   --zone ZONE                                                                    (required)
#   --workdir DIR        checkpoints and logs; must be storage every worker sees   (required)
#   --project PROJECT    default: gcloud's configured project
#   --config FILE        default configs/wan_ar.py
#   --repo URL           git clone URL on the workers instead of copying this checkout's HEAD
#                        (git archive: uncommitted changes are not shipped)
#   --ref REF            with --repo: branch, tag or commit to check out
#   --python VERSION     Python for the workers' venv (uv-managed), default 3.12
#   --skip-setup         reuse the code and venv already on the workers; only launch
#   --dry-run            print the commands, run nothing
#   --help
#
# Arguments after -- go to `python -m afd_jax.main` unchanged, e.g. --config.mesh.fsdp=8.

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

workdir='' config=configs/wan_ar.py repo='' ref='' python=3.12 setup=1 overrides=()
OPTIONS=([--workdir]=workdir [--config]=config [--repo]=repo [--ref]=ref [--python]=python
         [--skip-setup]=setup=0 [--]=overrides)
parse_tpu_options "$@"
require --workdir "$workdir"
# The trainer writes the workdir through the file system: a bucket must be mounted (gcsfuse) at
# the same path on every worker. A relative workdir would be a different directory on each.
[[ $workdir != gs://* ]] ||
  die "--workdir $workdir: mount the bucket with gcsfuse on every worker and pass the mount path"
[[ $workdir == /* ]] ||
  echo "${0##*/}: warning: --workdir $workdir is relative; multi-host runs need shared storage" >&2

ssh=(gcloud compute tpus tpu-vm ssh "$name" "${GCLOUD_FLAGS[@]}" --worker=all)
if (( setup )); then
  if [[ -n $repo ]]; then
    fetch="rm -rf ~/afd_jax && git clone $(quote "$repo") ~/afd_jax"
    [[ -z $ref ]] || fetch+=" && git -C ~/afd_jax checkout $(quote "$ref")"
  else
    tarball=${TMPDIR:-/tmp}/afd_jax_$name.tar.gz
    run git -C "$root" archive --format=tar.gz -o "$tarball" HEAD
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:afd_jax.tar.gz" "${GCLOUD_FLAGS[@]}" \
      --worker=all
    fetch='rm -rf ~/afd_jax && mkdir -p ~/afd_jax && tar -xzf ~/afd_jax.tar.gz -C ~/afd_jax'
  fi
  # The images' system Python is too old for afd_jax (>= 3.11), so uv brings its own in a venv.
  install="{ [ -x ~/.local/bin/uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
  install+=" && { [ -x ~/afd_venv/bin/python ] || ~/.local/bin/uv venv --python $(quote "$python") ~/afd_venv; }"
  install+=" && ~/.local/bin/uv pip install --python ~/afd_venv/bin/python -e ~/afd_jax \"jax[tpu]\""
  run "${ssh[@]}" --command="$fetch && $install"
fi

# jax.distributed.initialize() finds the other workers itself on TPU VMs. nohup and the redirects
# let ssh return while training goes on.
args=$(quote --config="$config" --workdir="$workdir" "${overrides[@]}")
run "${ssh[@]}" --command="cd ~/afd_jax && mkdir -p ~/afd_logs && nohup ~/afd_venv/bin/python -m afd_jax.main $args > $TPU_LOG 2>&1 < /dev/null &"
