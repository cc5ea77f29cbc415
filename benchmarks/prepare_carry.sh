#!/usr/bin/env bash
# Builds carry/ (git-ignored): what the lent GPU machine needs to run fml_jax and
# benchmarks/accelerator_suite.py, and cannot download (it reaches no package registry).
#
#   bash benchmarks/prepare_carry.sh            # downloads here, copies MNIST, prints the size
#   bash benchmarks/prepare_carry.sh --verify   # and rehearses the install in a Python 3.12
#                                               # venv with the GPU image's packages (jax 0.11.2)
#
# Then, with the device tool (README.md, "GPU and TPU"):
#   run(command="python3 benchmarks/accelerator_suite.py --carry carry --pack --out $OUT/suite",
#       carry=["carry"], timeout_s=450)
#
# The machine's python3 is 3.12 (x86-64) with jax 0.11.2 (CUDA), flax, optax, chex,
# orbax-checkpoint, absl-py, numpy, scipy, etils, protobuf, pyarrow, psutil, requests,
# wrapt, tqdm, pillow, matplotlib, tensorboard, pytest, pytest-xdist and torch
# (/work/.library/device/KINDS.md lists them). It lacks the wheels below: fml_jax's own
# ml-collections, tensorboardX, tensorflow-datasets, array_record, dm-pix, dp-accounting,
# and the small dependencies tensorflow-datasets imports (found by installing these into
# such a venv, --no-deps, and importing fml_jax.main and loading MNIST until nothing was
# missing). promise has no wheel on PyPI: it is built here (pure Python). The fallback
# protobuf is installed there only if tensorflow_metadata's generated code (protobuf 6)
# does not import with the image's own protobuf (a 5.x would refuse it).
#
# Layout: carry/wheels/*.whl, carry/fallback/*.whl, carry/tfds/mnist (the prepared
# array_record MNIST, copied from ${TFDS_DATA_DIR:-../shared/tfds}). Everything that
# travels to the machine (this folder and the repository's files) must stay under 64 MiB;
# CIFAR-10 (137 MB) does not fit. Rebuild it whenever; nothing in it is edited by hand.
set -euo pipefail
cd "$(dirname "$0")/.."

carry="${CARRY:-carry}"
tfds="${TFDS_DATA_DIR:-../shared/tfds}"
python="${PYTHON:-python3}"
verify=0
[ "${1:-}" = "--verify" ] && verify=1

wheels=(
  ml-collections==1.1.0 tensorboardX==2.6.5 tensorflow-datasets==4.9.10 array-record==0.8.6
  dm-pix==0.4.5 dp-accounting==0.6.0
  # tensorflow-datasets' imports that the image lacks:
  dm-tree==0.1.10 immutabledict==4.3.1 tensorflow-metadata==1.21.0
  googleapis-common-protos==1.76.0 simple-parsing==0.1.9 docstring-parser==0.18.0
  termcolor==3.3.0 toml==0.10.2
)
sdist_only=(promise==2.3)
fallback=(protobuf==6.33.5)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
download=("$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12
          --implementation cp "${platforms[@]}")

if [ ! -d "$tfds/mnist" ]; then
  echo "prepare_carry: no prepared MNIST in $tfds/mnist (set TFDS_DATA_DIR)" >&2
  exit 1
fi
rm -rf "$carry"
mkdir -p "$carry/wheels" "$carry/fallback" "$carry/tfds"
"${download[@]}" -d "$carry/wheels" "${wheels[@]}"
"$python" -m pip wheel --quiet --no-deps --no-binary=:all: -w "$carry/wheels" "${sdist_only[@]}"
"${download[@]}" -d "$carry/fallback" "${fallback[@]}"
cp -r "$tfds/mnist" "$carry/tfds/mnist"

echo "prepare_carry: $carry"
ls -1 "$carry/wheels" "$carry/fallback" | sed 's/^/  /'
find "$carry/tfds" -type f | sed 's/^/  /'
carry_bytes=$(du -sb "$carry" | cut -f1)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard \
             | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
awk -v c="$carry_bytes" -v t="$tree_bytes" 'BEGIN {
  printf "prepare_carry: carry %.1f MiB + the working tree %.1f MiB = %.1f MiB", c / 2^20,
         t / 2^20, (c + t) / 2^20; print " of the 64 MiB that travel" }'
if [ $((carry_bytes + tree_bytes)) -gt "$limit" ]; then
  echo "prepare_carry: over the device tool's 64 MiB" >&2
  exit 1
fi

if [ "$verify" = 1 ]; then
  # A venv like the GPU image (Python 3.12, jax 0.11.2 on the CPU, no torch), the carry
  # installed as the suite installs it there, then the suite's rehearsal.
  py312="${PYTHON312:-$(command -v python3.12 ||
                        ls "$HOME"/.pyenv/versions/3.12*/bin/python3 2>/dev/null | head -1)}"
  if [ -z "$py312" ]; then
    echo "prepare_carry: --verify needs a Python 3.12 (set PYTHON312)" >&2
    exit 1
  fi
  venv="${VERIFY_VENV:-/tmp/carry_venv}"
  if [ ! -x "$venv/bin/python" ]; then
    "$py312" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "jax==0.11.2" "jaxlib==0.11.2" flax optax chex \
      orbax-checkpoint absl-py numpy scipy etils protobuf psutil pyarrow requests wrapt tqdm \
      pillow matplotlib fsspec zipp attrs mpmath typing-extensions pyyaml six packaging \
      tensorboard pytest pytest-xdist
  fi
  rm -rf /tmp/fml_jax_carry_verify_site
  env -u TFDS_DATA_DIR "$venv/bin/python" benchmarks/accelerator_suite.py --tiny --carry "$carry" \
    --site /tmp/fml_jax_carry_verify_site --out /tmp/fml_jax_carry_verify
fi
