#!/usr/bin/env bash
# The GPU run: the four default variants for the full 10 epochs at 224x224 on CIFAR-10 (the JPEG
# copy), pretrained variants on stand-in weights (their time is what counts here), then the summary
# and benchmarks/results/gpu-<date>.json. Target: under 9 minutes on one H200.
#
#   benchmarks/gpu.sh [path/to/cifar10-jpeg.tar.xz]
#
# Calls the trainers directly (the lent GPU machine has torch and JAX but neither Snakemake nor
# TensorFlow: Keras runs on KERAS_BACKEND, default jax there). tests/test_benchmarks.py rehearses it on
# the CPU in a tiny setting (a small generated archive, Keras on jax):
#   EPOCHS=1 IMAGE_SIZE=64 VAL_SIZE=20 WORK=/tmp/x OUT_DIR=/tmp/x benchmarks/gpu.sh archive.tar.xz
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="${1:-$ROOT/../shared/data/cifar10-jpeg.tar.xz}"
WORK="${WORK:-/tmp/cnnbench-gpu}"
EPOCHS="${EPOCHS:-10}" IMAGE_SIZE="${IMAGE_SIZE:-224}" PRECISION="${PRECISION:-bf16}"
VAL_SIZE="${VAL_SIZE:-5000}" TRAIN_LIMIT="${TRAIN_LIMIT:-null}" TEST_LIMIT="${TEST_LIMIT:-null}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONPATH="$ROOT/workflow" TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$WORK/weights" "$WORK/results"
start=$(date +%s)

python -m cnnbench.data prepare --out "$WORK/data.npz" --data-config "{\"source\": \"imagefolder\",
  \"imagefolder\": {\"path\": \"$ARCHIVE\"}, \"val_size\": $VAL_SIZE, \"split_seed\": 0,
  \"train_limit\": $TRAIN_LIMIT, \"test_limit\": $TEST_LIMIT}"
python -m cnnbench.torch_models standin --model alexnet --out "$WORK/weights/alexnet-owt-7be5be79.pth"
python -m cnnbench.keras_models standin --model vgg16 --out "$WORK/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
echo "gpu.sh: data and weights ready after $(( $(date +%s) - start )) s"

hparams() {  # the default config's settings; lr 0.001 for fine-tuning
  echo "{\"epochs\": $EPOCHS, \"batch_size\": 64, \"eval_batch_size\": 512, \"optimizer\": \"sgd\", \"lr\": $1,
    \"momentum\": 0.9, \"nesterov\": false, \"weight_decay\": 0.0005, \"lr_schedule\": \"constant\",
    \"dropout\": 0.5, \"image_size\": $IMAGE_SIZE, \"preprocessing\": \"auto\", \"mean\": [0.485, 0.456, 0.406],
    \"std\": [0.229, 0.224, 0.225], \"precision\": \"$PRECISION\", \"require_gpu\": false, \"compile\": \"auto\"}"
}
train() {  # variant lr model-file [weights]
  local variant=$1 framework=${1%%-*} run="$WORK/runs/$1/seed0"
  local extra=()
  [ -n "${4:-}" ] && extra=(--weights "$4" --weights-source standin)
  [ "$framework" = keras ] && extra+=(--keras-backend "$KERAS_BACKEND")
  mkdir -p "$run"
  python -m "cnnbench.${framework}_trainer" --variant "$variant" --seed 0 --data "$WORK/data.npz" \
    --hparams "$(hparams "$2")" --run-dir "$run" --metrics "$run/metrics.json" --model-out "$run/$3" \
    "${extra[@]}" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$run/train.log"
}
train torch-alexnet-scratch 0.01 model.pt
train keras-alexnet-scratch 0.01 model.keras
train torch-alexnet-pretrained 0.001 model.pt "$WORK/weights/alexnet-owt-7be5be79.pth"
train keras-vgg16-pretrained 0.001 model.keras "$WORK/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"

python -m cnnbench.report "$WORK"/runs/*/seed0/metrics.json --out-dir "$WORK/results" > /dev/null
python "$ROOT/benchmarks/gpu_summary.py" --runs "$WORK/runs" --out-dir "${OUT_DIR:-$ROOT/benchmarks/results}" \
  --wall-seconds "$(( $(date +%s) - start ))"
cp "$WORK/results/summary.md" "${OUT_DIR:-$ROOT/benchmarks/results}/gpu-summary.md"
echo "gpu.sh: done in $(( $(date +%s) - start )) s"
