#!/usr/bin/env bash
# Run training as an xpk workload on a GKE TPU cluster (the alternative to TPU VMs and run.sh).
# The image must hold this repository at its working directory with `pip install -e . "jax[tpu]"`
# done (see launch/README.md); xpk starts it on every host of every slice.
#
#   launch/tpu/xpk.sh --cluster CLUSTER --workload NAME --tpu-type TYPE --docker-image IMAGE \
#     --workdir DIR [options] [-- --config.KEY=VALUE ...]
#
#   --cluster CLUSTER       xpk / GKE cluster                                      (required)
#   --workload NAME         workload name, unique in the cluster                   (required)
#   --tpu-type TYPE         e.g. v5p-64, v6e-32                                    (required)
#   --docker-image IMAGE    e.g. gcr.io/PROJECT/afd_jax:latest                     (required)
#   --workdir DIR           checkpoints and logs on storage every host sees        (required)
#   --num-slices N          default 1
#   --config FILE           default configs/wan_ar.py
#   --zone ZONE             default: gcloud's configured zone
#   --project PROJECT       default: gcloud's configured project
#   --dry-run               print the command, run nothing
#   --help
#
# Arguments after -- go to `python -m afd_jax.main` unchanged, e.g. --config.mesh.fsdp=32.

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

cluster='' workload='' tpu_type='' image='' workdir='' slices=1 config=configs/wan_ar.py zone=''
project='' overrides=()
OPTIONS=([--cluster]=cluster [--workload]=workload [--tpu-type]=tpu_type [--docker-image]=image
         [--workdir]=workdir [--num-slices]=slices [--config]=config [--zone]=zone
         [--project]=project [--]=overrides)
parse_options "$@"
require --cluster "$cluster"
require --workload "$workload"
require --tpu-type "$tpu_type"
require --docker-image "$image"
require --workdir "$workdir"

run xpk workload create --cluster="$cluster" --workload="$workload" --tpu-type="$tpu_type" \
  --num-slices="$slices" --docker-image="$image" ${zone:+"--zone=$zone"} \
  ${project:+"--project=$project"} \
  --command="python -m afd_jax.main $(quote --config="$config" --workdir="$workdir" "${overrides[@]}")"
