#!/usr/bin/env bash
# Submit launch/gpu/afd.sbatch: builds the sbatch command from the options below.
#
#   launch/gpu/submit.sh --workdir DIR [--nodes N] [options] [-- --config.KEY=VALUE ...]
#
#   --workdir DIR        checkpoints and logs on a filesystem every node sees    (required)
#   --nodes N            nodes of 8 GPUs, default 1
#   --partition NAME     default: the cluster's default partition
#   --account NAME       default: your default account
#   --time LIMIT         e.g. 24:00:00, default: the partition's limit
#   --job-name NAME      default afd
#   --config FILE        default configs/wan_ar.py
#   --dry-run            print the commands, submit nothing
#   --help
#
# Arguments after -- go to `python -m afd_jax.main` unchanged, e.g. --config.mesh.fsdp=8.
# Logs: WORKDIR/logs/<job-name>-<jobid>.out (the batch script) and task<rank>-<jobid>.log.

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

workdir='' nodes=1 partition='' account='' time_limit='' job_name=afd config=configs/wan_ar.py
overrides=()
OPTIONS=([--workdir]=workdir [--nodes]=nodes [--partition]=partition [--account]=account
         [--time]=time_limit [--job-name]=job_name [--config]=config [--]=overrides)
parse_options "$@"
require --workdir "$workdir"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not $nodes"
# The job runs in the repository (--chdir), so a relative workdir is made absolute here.
[[ $workdir == /* ]] || workdir=$PWD/$workdir

# sbatch does not create the directory of --output; the job would fail without a trace.
run mkdir -p "$workdir/logs"
run sbatch --nodes="$nodes" ${partition:+"--partition=$partition"} \
  ${account:+"--account=$account"} ${time_limit:+"--time=$time_limit"} --job-name="$job_name" \
  --chdir="$root" --output="$workdir/logs/%x-%j.out" "$root/launch/gpu/afd.sbatch" \
  --config="$config" --workdir="$workdir" -- "${overrides[@]}"
