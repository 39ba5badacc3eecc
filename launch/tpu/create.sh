#!/usr/bin/env bash
# Create a Cloud TPU VM, or with --queued a queued resource (waits for capacity; its node gets the
# same name, so run.sh / tail.sh / stop.sh take the same --name either way).
#
#   launch/tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]
#
#   --name NAME               TPU VM (and queued resource) name                (required)
#   --zone ZONE               e.g. us-east5-a                                  (required)
#   --accelerator-type TYPE   e.g. v5p-8, v5p-64, v6e-8, v6e-32                (required)
#   --project PROJECT         default: gcloud's configured project
#   --runtime-version V       default by generation: v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
#                             v5litepod v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base
#   --spot                    spot capacity (preemptible; the trainer resumes from checkpoints)
#   --queued                  create a queued resource instead of a VM directly
#   --dry-run                 print the command, run nothing
#   --help

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

accel='' runtime='' spot=0 queued=0
OPTIONS=([--accelerator-type]=accel [--runtime-version]=runtime [--spot]=spot=1 [--queued]=queued=1)
parse_tpu_options "$@"
require --accelerator-type "$accel"

if [[ -z $runtime ]]; then
  case $accel in
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    v5litepod-*) runtime=v2-alpha-tpuv5-lite ;;
    v4-*) runtime=tpu-ubuntu2204-base ;;
    *) die "no default runtime for $accel; pass --runtime-version" ;;
  esac
fi

common=("${GCLOUD_FLAGS[@]}" --accelerator-type="$accel")
(( spot )) && common+=(--spot)
# The two commands spell the runtime flag differently.
if (( queued )); then
  run gcloud compute tpus queued-resources create "$name" "${common[@]}" \
    --runtime-version="$runtime" --node-id="$name"
else
  run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --version="$runtime"
fi
