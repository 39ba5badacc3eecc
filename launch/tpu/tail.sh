#!/usr/bin/env bash
# Follow the training log of one TPU worker (run.sh writes one per worker).
#
#   launch/tpu/tail.sh --name NAME --zone ZONE [--worker N] [--lines N] [--project PROJECT]
#
#   --name NAME          TPU VM name                                  (required)
#   --zone ZONE                                                       (required)
#   --worker N           which worker, default 0 (the one that logs metrics)
#   --lines N            lines of history to show first, default 100
#   --project PROJECT    default: gcloud's configured project
#   --dry-run            print the command, run nothing
#   --help

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

worker=0 lines=100
OPTIONS=([--worker]=worker [--lines]=lines)
parse_tpu_options "$@"

run gcloud compute tpus tpu-vm ssh "$name" "${GCLOUD_FLAGS[@]}" --worker="$worker" \
  --command="tail -n $(quote "$lines") -F $TPU_LOG"
