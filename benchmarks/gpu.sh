#!/usr/bin/env bash
# The GPU run: the four default variants for the full 10 epochs at 224x224 on CIFAR-10 (the JPEG
# copy), pretrained variants on stand-in weights (their time is what counts here), then the summary
# and benchmarks/results/gpu-<date>.json. Target: under 9 minutes on one H200.
#
#   benchmarks/gpu.sh [path/to/cifar10-jpeg.tar.xz]
#
# Calls the trainers directly (the lent GPU machine has torch and JAX but neither Snakemake nor
# TensorFlow: Keras runs on KERAS_BACKEND, default jax there). Settings (environment): EPOCHS,
# IMAGE_SIZE, PRECISION, VAL_SIZE, TRAIN_LIMIT, TEST_LIMIT, REQUIRE_GPU (true: fail without a GPU);
# VARIANTS (a subset of the four);
# MAX_STEPS_PER_EPOCH (cut epochs short); DATA (an npz already prepared from the archive: no
# preparing); SUMMARY=0 (only the runs: no report, no gpu-<date>.json); WORK; OUT_DIR.
# benchmarks/device-check.sh runs it for its short trainer runs and for the GPU run, and
# tests/test_benchmarks.py rehearses that on the CPU in a tiny setting.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="${1:-$ROOT/../shared/data/cifar10-jpeg.tar.xz}"
WORK="${WORK:-/tmp/cnnbench-gpu}"
EPOCHS="${EPOCHS:-10}" IMAGE_SIZE="${IMAGE_SIZE:-224}" PRECISION="${PRECISION:-bf16}"
VAL_SIZE="${VAL_SIZE:-5000}" TRAIN_LIMIT="${TRAIN_LIMIT:-null}" TEST_LIMIT="${TEST_LIMIT:-null}"
VARIANTS="${VARIANTS:-torch-alexnet-scratch keras-alexnet-scratch torch-alexnet-pretrained keras-vgg16-pretrained}"
MAX_STEPS_PER_EPOCH="${MAX_STEPS_PER_EPOCH:-null}" DATA="${DATA:-$WORK/data.npz}" REQUIRE_GPU="${REQUIRE_GPU:-false}"
export KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONPATH="$ROOT/workflow${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$WORK/weights" "$WORK/results"
start=$(date +%s)

if [ ! -f "$DATA" ]; then
  python -m cnnbench.data prepare --out "$DATA" --data-config "{\"source\": \"imagefolder\",
    \"imagefolder\": {\"path\": \"$ARCHIVE\"}, \"val_size\": $VAL_SIZE, \"split_seed\": 0,
    \"train_limit\": $TRAIN_LIMIT, \"test_limit\": $TEST_LIMIT}"
fi

standin_weights() {  # variant -> the stand-in file, named as the published one (its name sets the preprocessing)
  local framework model
  IFS=- read -r framework model _ <<< "$1"
  case "$framework-$model" in
    torch-alexnet) local file="$WORK/weights/alexnet-owt-7be5be79.pth" ;;
    keras-vgg16) local file="$WORK/weights/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" ;;
    *) echo "gpu.sh: no stand-in weights for $1 (only torch-alexnet and keras-vgg16 are set up)" >&2; return 1 ;;
  esac
  [ -f "$file" ] || python -m "cnnbench.${framework}_models" standin --model "$model" --out "$file" >&2
  echo "$file"
}

hparams() {  # the default config's settings; lr 0.001 for fine-tuning
  echo "{\"epochs\": $EPOCHS, \"batch_size\": 64, \"eval_batch_size\": 512, \"optimizer\": \"sgd\", \"lr\": $1,
    \"momentum\": 0.9, \"nesterov\": false, \"weight_decay\": 0.0005, \"lr_schedule\": \"constant\",
    \"dropout\": 0.5, \"image_size\": $IMAGE_SIZE, \"preprocessing\": \"auto\", \"mean\": [0.485, 0.456, 0.406],
    \"std\": [0.229, 0.224, 0.225], \"precision\": \"$PRECISION\", \"require_gpu\": $REQUIRE_GPU, \"compile\": \"auto\",
    \"max_steps_per_epoch\": $MAX_STEPS_PER_EPOCH}"
}

train() {  # variant
  local variant=$1 framework init run="$WORK/runs/$1/seed0" lr=0.01 model_file=model.pt extra=()
  IFS=- read -r framework _ init <<< "$variant"
  if [ "$init" != scratch ]; then
    lr=0.001
    extra=(--weights "$(standin_weights "$variant")" --weights-source standin)
  fi
  if [ "$framework" = keras ]; then
    model_file=model.keras
    extra+=(--keras-backend "$KERAS_BACKEND")
  fi
  mkdir -p "$run"
  python -m "cnnbench.${framework}_trainer" --variant "$variant" --seed 0 --data "$DATA" \
    --hparams "$(hparams "$lr")" --run-dir "$run" --metrics "$run/metrics.json" --model-out "$run/$model_file" \
    "${extra[@]}" 2>&1 | tr '\r' '\n' | grep -v '%|' | tee "$run/train.log"
}
echo "gpu.sh: data ready after $(( $(date +%s) - start )) s"
for variant in $VARIANTS; do
  train "$variant"
done

if [ "${SUMMARY:-1}" = 0 ]; then
  echo "gpu.sh: trained in $(( $(date +%s) - start )) s (SUMMARY=0: no report)"
  exit 0
fi
python -m cnnbench.report "$WORK"/runs/*/seed0/metrics.json --out-dir "$WORK/results" > /dev/null
python "$ROOT/benchmarks/gpu_summary.py" --runs "$WORK/runs" --out-dir "${OUT_DIR:-$ROOT/benchmarks/results}" \
  --wall-seconds "$(( $(date +%s) - start ))"
cp "$WORK/results/summary.md" "${OUT_DIR:-$ROOT/benchmarks/results}/gpu-summary.md"
echo "gpu.sh: done in $(( $(date +%s) - start )) s"
