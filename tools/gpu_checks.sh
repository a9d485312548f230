#!/usr/bin/env bash
# The GPU checks of the scale work (cuDNN attention numerics; CLIP and COTS base step time, pairs/s and MFU with
# cuDNN attention on and off and the scan and remat variants), each part sized for one call of a lent GPU machine,
# whose image has jax, flax, optax and orbax but not all of our packages and no network.
#
# Here, once (pip works here):     bash tools/gpu_checks.sh wheels     -> .whl/ (git-ignored, ~6 MB)
# There (carry .whl), one part per call, or several in one:
#   bash tools/gpu_checks.sh numerics   cuDNN against XLA attention in bfloat16, outputs and gradients (pytest)
#   bash tools/gpu_checks.sh clip       CLIP base, bf16, batch 256: XLA / cuDNN / cuDNN+scan / cuDNN+remat dots
#   bash tools/gpu_checks.sh cots       COTS base, bf16, batch 256: XLA / cuDNN
# The step parts are `python -m vlp_jax.bench variants`: every variant compiled first, then timed one step each
# per round in a shuffled order, each against the first (see vlp_jax/variants.py). STEPS=N sets the rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
# the packages the device image lacks (its list: the device library's KINDS.md), at our pinned versions
WHEELS=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 clu==0.0.12 tensorboardX==2.6.5 simplejpeg==1.9.0
        dm-tree==0.1.10 portpicker==1.6.0)
STEPS=${STEPS:-20}
PY=${PYTHON:-python3}

install_wheels() {
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: no .whl/ here: run 'bash tools/gpu_checks.sh wheels' where pip works, then carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  export PYTHONUNBUFFERED=1
  "$PY" -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax",
optax.__version__, jax.devices())'
}

variants() {  # CONFIG, then --variant flags
  local config=$1; shift
  "$PY" -m vlp_jax.bench variants "--config=$config" --config.train.batch_size=256 "--steps=$STEPS" --warmup=3 "$@"
}

for part in "${@:-clip}"; do
  case $part in
    wheels)
      mkdir -p .whl
      pip_platforms=()
      for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31; do
        pip_platforms+=(--platform "${tag}_x86_64")
      done
      "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${pip_platforms[@]}" --platform any -d .whl "${WHEELS[@]}"
      ls -l .whl ;;
    numerics)
      install_wheels
      JAX_PLATFORMS=cuda "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_scan.py -k cudnn ;;
    clip)
      install_wheels
      variants configs/clip.py:base --variant= --variant=model.attention=cudnn \
        --variant=model.attention=cudnn,model.scan_layers=true --variant=model.attention=cudnn,model.remat=dots ;;
    cots)
      install_wheels
      variants configs/cots.py:base --variant= --variant=model.attention=cudnn ;;
    *)
      echo "error: unknown part '$part'; use wheels, numerics, clip or cots" >&2
      exit 2 ;;
  esac
done
