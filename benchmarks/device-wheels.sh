#!/usr/bin/env bash
# Fill .whl/ and .data/ for benchmarks/device-check.sh, here (where PyPI can be reached): the wheels of
# what the lent GPU machine lacks (its image has torch, JAX, numpy, pandas, PyYAML, tqdm, pillow, h5py,
# rich, attrs, pytest ...; not Keras, jsonschema or their needs below), for its Python 3.12 on x86-64,
# and a copy of the JPEG archive. Both folders are git-ignored: name them in the run's carry.
#
#   benchmarks/device-wheels.sh [path/to/cifar10-jpeg.tar.xz]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="${1:-$ROOT/../shared/data/cifar10-jpeg.tar.xz}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
# keras 3.15.1 needs namex and optree beyond the image; jsonschema 4.26.0 needs the other four.
# Versions as requirements.txt's venv resolves them.
WHEELS=(keras==3.15.1 namex==0.1.0 optree==0.20.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
        referencing==0.37.0 rpds-py==2026.9.1)
mkdir -p "$ROOT/.whl" "$ROOT/.data"
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --disable-pip-version-check \
  -d "$ROOT/.whl" "${WHEELS[@]}"
cp "$ARCHIVE" "$ROOT/.data/cifar10-jpeg.tar.xz"
du -sh "$ROOT/.whl" "$ROOT/.data"
