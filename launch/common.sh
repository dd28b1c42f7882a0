# Sourced by the launch scripts: which Python they run, and its check.
#
# requirements.txt pins jax/jaxlib 0.10.2, numpy 2.4.6, flax and orbax 0.12.8:
# all need Python >= 3.11, and stock Ubuntu 22.04 images (TPU VMs among them)
# ship 3.10. launch/setup_env.sh makes a venv with a Python >= 3.11 and the
# accelerator's jax. A GPU or TPU host also needs that accelerator's jax on
# top of the CPU pins, or jax runs on the host's CPU:
#   GPU: pip install -r requirements.txt "jax[cuda12]==0.10.2"   (CUDA 13 drivers: jax[cuda13])
#   TPU: pip install -r requirements.txt "jax[tpu]==0.10.2"
# JAX_PLATFORMS=cpu skips the accelerator check (a CPU trial of a launcher); on a
# machine without NVIDIA GPUs gpu_multinode.sh does not ask for the CUDA jax.

MIN_PYTHON_MINOR=11  # Python 3.11
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(dirname "$LAUNCH_DIR")

# The version requirements.txt pins for PACKAGE.
pinned() {
  sed -n "s/^$1==\([^ ;#]*\).*/\1/p" "$CHECKOUT/requirements.txt" | head -1
}

# The interpreter to run: PYTHON, else the active venv's, else the checkout's
# .venv (what setup_env.sh makes), else python3.
default_python() {
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    echo "$VIRTUAL_ENV/bin/python"
  elif [[ -x $CHECKOUT/.venv/bin/python ]]; then
    echo "$CHECKOUT/.venv/bin/python"
  else
    echo python3
  fi
}

# One line about interpreter $1: "MAJOR.MINOR jax=V jaxlib=V jax-cuda12-plugin=V
# jax-cuda13-plugin=V libtpu=V" ('-' where not installed); fails if $1 cannot run.
probe_python() {
  "$1" -c '
import sys
try:
  from importlib import metadata
except ImportError:
  metadata = None
def version(name):
  try:
    return metadata.version(name)
  except Exception:
    return "-"
names = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")
print("%d.%d" % sys.version_info[:2], " ".join("%s=%s" % (n, version(n)) for n in names))
' 2>/dev/null
}

# Field NAME of a probe line ("-" when absent).
probe_field() {
  local word
  for word in $1; do
    [[ $word == "$2="* ]] && { echo "${word#*=}"; return; }
  done
  echo -
}

# True when the version "MAJOR.MINOR" is at least 3.MIN_PYTHON_MINOR.
python_new_enough() {
  local major=${1%%.*} minor=${1#*.}
  [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] || return 1
  (( major > 3 || (major == 3 && minor >= MIN_PYTHON_MINOR) ))
}

# True when this machine or task has an NVIDIA GPU (what SLURM gave it, or
# what nvidia-smi lists): a CPU jaxlib there is a mistake, elsewhere the norm.
nvidia_gpu_here() {
  [[ -n ${CUDA_VISIBLE_DEVICES:-} || -n ${SLURM_GPUS_ON_NODE:-} || -n ${SLURM_STEP_GPUS:-} ]] &&
    return 0
  # The whole listing first: `nvidia-smi -L | grep -q` under pipefail fails at random when
  # grep exits at the first GPU line while nvidia-smi still writes the next (SIGPIPE).
  local listing
  listing=$(nvidia-smi -L 2>/dev/null) || true
  [[ $'\n'$listing == *$'\n'GPU* ]]
}

# check_python PY KIND (gpu | tpu | cpu): exits 2 with the reason and the fix
# unless PY runs, is Python >= 3.11, has the pinned jax and jaxlib, and, for
# tpu, and for gpu on a machine with an NVIDIA GPU, that accelerator's jax
# (unless JAX_PLATFORMS leaves that platform out).
check_python() {
  local py=$1 kind=$2 line version pin setup="launch/setup_env.sh ${2/gpu/cuda12}"
  pin=$(pinned jax)
  if ! line=$(probe_python "$py") || [[ -z $line ]]; then
    echo "error: the Python interpreter '$py' cannot be run. Make one with $setup" \
         "(a venv with Python >= 3.$MIN_PYTHON_MINOR and the pinned packages), or set" \
         "PYTHON=/path/to/python (Python >= 3.$MIN_PYTHON_MINOR with requirements.txt installed)." >&2
    exit 2
  fi
  version=${line%% *}
  if ! python_new_enough "$version"; then
    echo "error: '$py' is Python $version, and the pinned packages (jax $pin, numpy" \
         "$(pinned numpy), flax $(pinned flax), orbax-checkpoint $(pinned orbax-checkpoint))" \
         "need Python >= 3.$MIN_PYTHON_MINOR. Run $setup (it uses a Python >=" \
         "3.$MIN_PYTHON_MINOR from PATH, else fetches one with uv), or set PYTHON to a Python" \
         ">= 3.$MIN_PYTHON_MINOR with requirements.txt installed." >&2
    exit 2
  fi
  local jax jaxlib
  jax=$(probe_field "$line" jax)
  jaxlib=$(probe_field "$line" jaxlib)
  if [[ $jax != "$pin" || $jaxlib != "$pin" ]]; then
    echo "error: '$py' has jax $jax and jaxlib $jaxlib; requirements.txt pins $pin for both." \
         "Install the pins: $py -m pip install -r requirements.txt (or run $setup)." >&2
    exit 2
  fi
  local platforms=${JAX_PLATFORMS:-}
  case $kind in
    gpu)
      [[ -n $platforms && ! $platforms =~ (cuda|gpu) ]] && return 0
      nvidia_gpu_here || return 0
      if [[ $(probe_field "$line" jax-cuda12-plugin) != "$pin" &&
            $(probe_field "$line" jax-cuda13-plugin) != "$pin" ]]; then
        echo "error: '$py' has no CUDA jax $pin (jax-cuda12-plugin or jax-cuda13-plugin)," \
             "so jax would train on the CPU. Install it: $py -m pip install" \
             "\"jax[cuda12]==$pin\" (CUDA 13 drivers: \"jax[cuda13]==$pin\"), or run" \
             "$setup. JAX_PLATFORMS=cpu runs on the CPU on purpose." >&2
        exit 2
      fi ;;
    tpu)
      [[ -n $platforms && ! $platforms =~ tpu ]] && return 0
      if [[ $(probe_field "$line" libtpu) == - ]]; then
        echo "error: '$py' has no TPU jax (libtpu), so jax would train on the CPU. Install" \
             "it: $py -m pip install \"jax[tpu]==$pin\", or run $setup." \
             "JAX_PLATFORMS=cpu runs on the CPU on purpose." >&2
        exit 2
      fi ;;
  esac
  return 0
}
