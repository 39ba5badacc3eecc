# shellcheck shell=bash
# Sourced by every launch script: option parsing, --help from the header comment, and `run`, which
# prints each command (shell-quoted, paste-able) and runs it unless --dry-run.

# ${var@Q} and empty arrays under `set -u` need bash >= 4.4 (macOS: brew install bash).
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then
  echo "${0##*/}: needs bash >= 4.4, this is $BASH_VERSION" >&2
  exit 2
fi

DRY_RUN=0

# The remote log of one TPU worker; expanded on the worker, so run.sh and tail.sh agree on it.
# shellcheck disable=SC2016,SC2034  # expanded by the worker's shell; used by the sourcing scripts
TPU_LOG='$HOME/afd_logs/worker_${TPU_WORKER_ID:-$(hostname)}.log'

die() { echo "${0##*/}: $*" >&2; exit 2; }

# usage: the script's header comment, from line 2 to the first blank line.
usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

# need_value "$@": an option given without its value.
need_value() { (( $# >= 2 )) || die "option $1 needs a value"; }

# require OPTION VALUE: a required option left out.
require() { [[ -n $2 ]] || die "missing required option $1 (see --help)"; }

# A script's own options, for parse_options; each script fills it in before calling it:
#   [--opt]=var         --opt VALUE (or --opt=VALUE) sets var to VALUE
#   [--opt]=var=VALUE   --opt is a flag that sets var to VALUE
#   [--]=array          the arguments after -- go, unchanged, to array (the trainer's flags)
declare -A OPTIONS=()

# parse_options "$@": the options in OPTIONS plus --dry-run and --help, which every script takes.
# printf -v sets the variable named in OPTIONS.
parse_options() {
  local _spec _hint=''
  [[ -n ${OPTIONS[--]-} ]] && _hint='; trainer flags go after --'
  while (( $# )); do
    [[ $1 == --*=* ]] && set -- "${1%%=*}" "${1#*=}" "${@:2}"
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --help|-h) usage; exit 0 ;;
      *)
        # Looked up only when non-empty: '' is no valid key of an associative array.
        _spec=''
        [[ -z $1 ]] || _spec=${OPTIONS[$1]-}
        if [[ -z $_spec ]]; then
          die "unknown option $1 (see --help$_hint)"
        elif [[ $1 == -- ]]; then
          local -n _rest=$_spec  # the array named in OPTIONS[--]
          _rest=("${@:2}")
          return
        elif [[ $_spec == *=* ]]; then
          printf -v "${_spec%%=*}" %s "${_spec#*=}"
        else
          need_value "$@"
          printf -v "$_spec" %s "$2"
          shift
        fi ;;
    esac
    shift
  done
}

# parse_tpu_options "$@": parse_options plus what every TPU VM script takes: --name and --zone
# (required) and --project. GCLOUD_FLAGS gets the --zone / --project flags of the gcloud commands.
parse_tpu_options() {
  name='' zone='' project=''
  OPTIONS+=([--name]=name [--zone]=zone [--project]=project)
  parse_options "$@"
  require --name "$name"
  require --zone "$zone"
  # shellcheck disable=SC2034  # used by the sourcing scripts
  GCLOUD_FLAGS=(--zone="$zone" ${project:+"--project=$project"})
}

# quote ARGS...: one shell word per argument, single-quoted only where needed.
quote() {
  local plain='^[A-Za-z0-9_@%+=:,./-]+$' words=() a
  for a in "$@"; do
    if [[ $a =~ $plain ]]; then words+=("$a"); else words+=("${a@Q}"); fi
  done
  echo "${words[*]}"
}

# run CMD...: print `+ CMD` (stdout with --dry-run, else stderr) and run it unless --dry-run.
run() {
  if (( DRY_RUN )); then
    echo "+ $(quote "$@")"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}
