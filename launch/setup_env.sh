#!/usr/bin/env bash
# Makes a venv with Python >= 3.11, requirements.txt and the accelerator's jax:
#   launch/setup_env.sh cpu|cuda12|cuda13|tpu [VENV]
# VENV defaults to the checkout's .venv, which the launchers run by default.
#
# Which Python: PYTHON if set (it must be >= 3.11), else the first of
# python3.13, python3.12, python3.11, python3 on PATH that is >= 3.11, made
# into a venv with `-m venv`. Where there is none (stock Ubuntu 22.04 and its
# TPU VM images ship 3.10), uv makes the venv and fetches a Python 3.11 build
# (`uv venv --seed --python 3.11`; uv from PATH, else installed with
# `python3 -m pip install --user uv`: no root needed). Where that fails too
# (no pip, no network to fetch Python), the error names the other way:
# Ubuntu's deadsnakes PPA (sudo add-apt-repository ppa:deadsnakes/ppa &&
# sudo apt-get install python3.11 python3.11-venv), then PYTHON=python3.11.
# Then: VENV/bin/python -m pip install -r requirements.txt "jax[ACCEL]==<pin>"
# (cpu: requirements.txt alone), and the launchers' check of the result.
# DRY_RUN=1 prints the commands only. PYTHON_CANDIDATES (the list above),
# UV (the uv command) and BOOTSTRAP_PYTHON (python3, which installs uv) can be
# set to other programs.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
usage="usage: setup_env.sh cpu|cuda12|cuda13|tpu [VENV]"
accel=${1:?$usage}
venv=${2:-$CHECKOUT/.venv}
case $accel in
  cpu) extra=(); kind=cpu ;;
  cuda12|cuda13) extra=("jax[$accel]==$(pinned jax)"); kind=gpu ;;
  tpu) extra=("jax[tpu]==$(pinned jax)"); kind=tpu ;;
  *) echo "error: unknown accelerator '$accel'; $usage" >&2; exit 2 ;;
esac

run() {
  if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

# The version ("3.11") of interpreter $1, or nothing if it cannot run.
version_of() {
  local line
  line=$(probe_python "$1") || return 0
  echo "${line%% *}"
}

deadsnakes="Ubuntu: sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y \
python3.11 python3.11-venv, then PYTHON=python3.11 launch/setup_env.sh $accel"

if [[ -x $venv/bin/python ]]; then
  have=$(version_of "$venv/bin/python")
  if ! python_new_enough "$have"; then
    echo "error: $venv exists with Python ${have:-that cannot run}; the pinned packages need" \
         "Python >= 3.$MIN_PYTHON_MINOR. Remove it (rm -rf $venv) and run this again." >&2
    exit 2
  fi
  echo "setup_env.sh: $venv exists (Python $have); installing into it" >&2
else
  python=
  if [[ -n ${PYTHON:-} ]]; then
    have=$(version_of "$PYTHON")
    if ! python_new_enough "$have"; then
      echo "error: PYTHON=$PYTHON is Python ${have:-that cannot run}; the pinned packages" \
           "need Python >= 3.$MIN_PYTHON_MINOR. Unset PYTHON (a Python >= 3.$MIN_PYTHON_MINOR" \
           "from PATH, else uv fetches one), or install one: $deadsnakes." >&2
      exit 2
    fi
    python=$PYTHON
  else
    for candidate in ${PYTHON_CANDIDATES:-python3.13 python3.12 python3.11 python3}; do
      command -v "$candidate" >/dev/null 2>&1 || [[ -x $candidate ]] || continue
      if python_new_enough "$(version_of "$candidate")"; then
        python=$candidate
        break
      fi
    done
  fi
  if [[ -n $python ]]; then
    echo "setup_env.sh: making $venv with $python (Python $(version_of "$python"))" >&2
    if ! run "$python" -m venv "$venv"; then
      echo "error: '$python -m venv' failed (Debian and Ubuntu put venv in a separate" \
           "package: sudo apt-get install python3.$(version_of "$python" | cut -d. -f2)-venv)." >&2
      exit 2
    fi
  else
    echo "setup_env.sh: no Python >= 3.$MIN_PYTHON_MINOR on PATH; uv makes $venv with a" \
         "Python 3.$MIN_PYTHON_MINOR build it fetches" >&2
    uv=()
    if [[ -n ${UV:-} ]]; then
      read -r -a uv <<< "$UV"
    elif command -v uv >/dev/null 2>&1; then
      uv=(uv)
    else
      bootstrap=${BOOTSTRAP_PYTHON:-python3}
      if ! run "$bootstrap" -m pip install --user --quiet uv; then
        echo "error: no Python >= 3.$MIN_PYTHON_MINOR on PATH, and '$bootstrap -m pip install" \
             "--user uv' failed, so none can be fetched. Install one: $deadsnakes." >&2
        exit 2
      fi
      uv=("$bootstrap" -m uv)
    fi
    if ! run "${uv[@]}" venv --seed --python "3.$MIN_PYTHON_MINOR" "$venv"; then
      echo "error: no Python >= 3.$MIN_PYTHON_MINOR on PATH, and uv could not fetch one" \
           "(above). Install one: $deadsnakes." >&2
      exit 2
    fi
  fi
fi
run "$venv/bin/python" -m pip install --quiet -r "$CHECKOUT/requirements.txt" "${extra[@]}"
if [[ -z ${DRY_RUN:-} ]]; then
  check_python "$venv/bin/python" "$kind"
  echo "setup_env.sh: ready: $venv/bin/python (Python $(version_of "$venv/bin/python")," \
       "jax $(pinned jax) for $accel); the launchers run it by default" >&2
fi
