#!/usr/bin/env bash
# Stop the training run on every worker of a TPU VM: SIGTERM (the trainer saves a checkpoint after
# the current step and exits), SIGKILL whatever is left after --timeout. --delete then deletes the
# TPU VM, or with --queued the queued resource and its node.
#
#   launch/tpu/stop.sh --name NAME --zone ZONE [--timeout SECONDS] [--delete [--queued]]
#
#   --name NAME          TPU VM (and queued resource) name              (required)
#   --zone ZONE                                                         (required)
#   --project PROJECT    default: gcloud's configured project
#   --timeout SECONDS    wait this long for the checkpoint, default 600
#   --delete             delete the TPU afterwards (also when its workers cannot be reached)
#   --queued             it was created with create.sh --queued
#   --dry-run            print the commands, run nothing
#   --help

set -euo pipefail
# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

timeout=600 delete=0 queued=0
OPTIONS=([--timeout]=timeout [--delete]=delete=1 [--queued]=queued=1)
parse_tpu_options "$@"
[[ $timeout =~ ^[0-9]+$ ]] || die "--timeout must be a number of seconds, not $timeout"

# The [a] keeps the pattern from matching the remote shell that runs pkill itself.
pat='"[a]fd_jax[.]main"'
stop="pkill -TERM -f $pat || exit 0; for _ in \$(seq $timeout); do pgrep -f $pat > /dev/null || exit 0; sleep 1; done; pkill -KILL -f $pat; true"
if ! run gcloud compute tpus tpu-vm ssh "$name" "${GCLOUD_FLAGS[@]}" --worker=all \
    --command="$stop"; then
  (( delete )) || exit 1
  echo "${0##*/}: warning: could not reach every worker; deleting anyway" >&2
fi
if (( delete && queued )); then
  run gcloud compute tpus queued-resources delete "$name" "${GCLOUD_FLAGS[@]}" --force --quiet
elif (( delete )); then
  run gcloud compute tpus tpu-vm delete "$name" "${GCLOUD_FLAGS[@]}" --quiet
fi
