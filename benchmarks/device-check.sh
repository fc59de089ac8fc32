#!/usr/bin/env bash
# The device check: one run on a lent GPU machine (one H200, torch + JAX, no TensorFlow, no
# internet), about 10 minutes in all, from the repository root:
#
#   bash benchmarks/device-check.sh [OUT]          # OUT: the results folder (default: $OUT)
#
# Beforehand, here: benchmarks/device-wheels.sh fills .whl/ (Keras, jsonschema and their needs the
# machine lacks) and .data/ (the JPEG archive); both are git-ignored, so the run names them in carry.
# Steps, in order, each with its own time limit, none past the deadline (DEADLINE_SECONDS after
# the start, default 560):
#   setup, imports  a venv (--system-site-packages, and the interpreter's own site-packages where
#                   python3 is itself a venv) with the wheels of WHEELS (default .whl/) installed; without
#                   that folder, the python3 on PATH as it is
#   prepare         the archive (ARCHIVE, default .data/cifar10-jpeg.tar.xz) as one npz, in the background
#   (1) facts-torch, facts-keras     device, driver, CUDA and versions (Keras on JAX)
#       compute-torch, compute-keras compute-only images/s, AlexNet at IMAGE_SIZE in bf16
#   (2) train-torch, train-keras     a short run of each trainer (AlexNet, 1 epoch of SHORT_STEPS steps)
#                                    on the real data: compile seconds, trainer / compute-only, memory, energy
#   (3) test-gpu                     tests/test_gpu.py with CNNBENCH_REQUIRE_GPU=1
#   (4) plan-gpu-sh, gpu-sh          benchmarks/gpu.sh (GPU_VARIANTS, default its four) with as many epochs
#                                    (<= MAX_EPOCHS) as the time left allows, sized from the short runs
# It requires a GPU (JAX_PLATFORMS=cuda, the trainers' require_gpu: true) and stops at the first
# step without one. REHEARSAL=cpu rehearses it on the CPU instead (tests/test_benchmarks.py does, at
# tiny sizes). $OUT gets device-check.json (every step: status, seconds, figures),
# device-check-logs.tar.gz (logs, step records, the runs' metrics) and gpu.sh's gpu-<date>.json and
# gpu-summary.md: 4 files. Exit status 0 when every step is ok.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
  echo "device-check.sh: name the results folder: bash benchmarks/device-check.sh OUT (or set OUT)" >&2
  exit 2
fi
REHEARSAL="${REHEARSAL:-}"
if [ -n "$REHEARSAL" ] && [ "$REHEARSAL" != cpu ]; then
  echo "device-check.sh: REHEARSAL is cpu (rehearse on the CPU) or unset (the GPU is required), not $REHEARSAL" >&2
  exit 2
fi
DEADLINE_SECONDS="${DEADLINE_SECONDS:-560}"
WHEELS="${WHEELS:-$ROOT/.whl}" ARCHIVE="${ARCHIVE:-$ROOT/.data/cifar10-jpeg.tar.xz}"
WORK="${WORK:-$(mktemp -d /tmp/cnnbench-device-check.XXXXXX)}"
COMPUTE_STEPS="${COMPUTE_STEPS:-20}" COMPUTE_WARMUP="${COMPUTE_WARMUP:-3}" SHORT_STEPS="${SHORT_STEPS:-100}"
MAX_EPOCHS="${MAX_EPOCHS:-10}"
FOUR_VARIANTS="torch-alexnet-scratch keras-alexnet-scratch torch-alexnet-pretrained keras-vgg16-pretrained"
GPU_VARIANTS="${GPU_VARIANTS:-$FOUR_VARIANTS}"
export IMAGE_SIZE="${IMAGE_SIZE:-224}" PRECISION=bf16 VAL_SIZE="${VAL_SIZE:-5000}"
export TRAIN_LIMIT="${TRAIN_LIMIT:-null}" TEST_LIMIT="${TEST_LIMIT:-null}"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 PYTHONUNBUFFERED=1
if [ "$REHEARSAL" = cpu ]; then
  export JAX_PLATFORMS=cpu REQUIRE_GPU=false
  require=() test_env=()
else
  export JAX_PLATFORMS=cuda REQUIRE_GPU=true
  require=(--require-gpu) test_env=(CNNBENCH_REQUIRE_GPU=1)
fi
DATA="$WORK/data.npz"
start=$(date +%s)
deadline=$(( start + DEADLINE_SECONDS ))
mkdir -p "$WORK/steps" "$WORK/results" "$WORK/logs" "$OUT_DIR" || exit 2
order=0
prepare_pid=""

record() {  # name status rc seconds limit note: the step's record (one line of JSON)
  local format='{"name": "%s", "order": %d, "status": "%s", "rc": %s, "seconds": %d, "timeout_seconds": %d, '
  format+='"log": "logs/%s.log", "note": "%s"}\n'
  printf "$format" "$1" "$order" "$2" "${3:-null}" "$4" "$5" "$1" "$6" > "$WORK/steps/$1.json"
}

step() {  # name cap command...: run it for at most cap seconds, never past the deadline; RESULT=file takes stdout
  local name=$1 cap=$2 began limit rc status note=""
  shift 2
  order=$(( order + 1 ))
  began=$(date +%s)
  limit=$(( deadline - began ))
  (( cap < limit )) && limit=$cap
  if (( limit <= 0 )); then
    record "$name" skipped "" 0 0 "the deadline had passed"
    echo "device-check: $name skipped: the deadline had passed"
    return 1
  fi
  echo "device-check: $name (at most $limit s)"
  if [ -n "${RESULT:-}" ]; then
    timeout -k 10 "$limit" "$@" > "$RESULT" 2> "$WORK/logs/$name.log"
  else
    timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=timed_out note="stopped at its limit of $limit s" ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$(( $(date +%s) - began ))" "$limit" "$note"
  tail -n 4 "$WORK/logs/$name.log" | sed "s/^/    /"
  echo "device-check: $name $status after $(( $(date +%s) - began )) s"
  return $rc
}

setup_python() {  # a venv over this machine's packages, with the carried wheels installed
  local base site
  base="$(command -v python3)"
  if [ ! -d "$WHEELS" ]; then
    echo "no wheel folder $WHEELS: using $base as it is"
    return 0
  fi
  "$base" -m venv --without-pip --system-site-packages "$WORK/venv" || return
  site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || return
  # Where python3 is itself a venv (the lent machine's is), --system-site-packages reaches only the
  # interpreter beneath it: its own site-packages come along through a .pth file.
  "$base" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/device-check-base.pth" || return
  local pip=("$WORK/venv/bin/python" -m pip install --no-index --no-compile --no-cache-dir --disable-pip-version-check)
  # Their needs resolved against what the machine has; else (a need pip cannot place) each wheel as it is,
  # as the device's own notes do it: the imports step then names anything still missing.
  "${pip[@]}" --find-links "$WHEELS" "$WHEELS"/*.whl || "${pip[@]}" --no-deps "$WHEELS"/*.whl
}

prepare_data() {
  if [ ! -f "$ARCHIVE" ]; then
    echo "no archive at $ARCHIVE: copy ../shared/data/cifar10-jpeg.tar.xz into .data/ (benchmarks/device-wheels.sh" \
      "does) and name .data in the run's carry" >&2
    return 1
  fi
  PYTHONPATH="$ROOT/workflow" python -m cnnbench.data prepare --out "$DATA" --data-config "{\"source\": \"imagefolder\",
    \"imagefolder\": {\"path\": \"$ARCHIVE\"}, \"val_size\": $VAL_SIZE, \"split_seed\": 0,
    \"train_limit\": $TRAIN_LIMIT, \"test_limit\": $TEST_LIMIT}"
}
export -f setup_python prepare_data
export WHEELS WORK ARCHIVE DATA ROOT

finish() {  # always: the logs in one archive, then the summary (a plain one if Python cannot write it)
  local code=0
  [ -n "$prepare_pid" ] && kill $(ps -o pid= --ppid "$prepare_pid") "$prepare_pid" 2> /dev/null
  (cd "$WORK" && find . \( -path '*/runs/*' \( -name metrics.json -o -name train.log \) \) -o -name 'gpu-*.json' \
      | tar -czf "$OUT_DIR/device-check-logs.tar.gz" logs steps results -T -)
  if ! timeout 120 python benchmarks/device_check.py summary --work "$WORK" --out "$OUT_DIR/device-check.json" \
      --deadline "$DEADLINE_SECONDS" --wall "$(( $(date +%s) - start ))" --rehearsal "$REHEARSAL"; then
    { printf '{"benchmark": "device-check", "assembled": false, "steps": ['
      paste -sd, "$WORK"/steps/*.json
      printf ']}\n'; } > "$OUT_DIR/device-check.json"
    code=1
  fi
  grep -L '"status": "ok"' "$WORK"/steps/*.json | grep -q . && code=1
  echo "device-check: done in $(( $(date +%s) - start )) s; $OUT_DIR holds $(ls "$OUT_DIR" | wc -l) files"
  exit $code
}
trap finish EXIT

step setup 120 bash -c setup_python
[ -x "$WORK/venv/bin/python" ] && PATH="$WORK/venv/bin:$PATH"
RESULT="$WORK/results/imports.json" step imports 60 python benchmarks/device_check.py imports --wheels "$WHEELS"
step prepare 300 bash -c prepare_data &
prepare_pid=$!
order=$(( order + 1 ))

# (1) GPU facts and compute-only ceilings
if ! RESULT="$WORK/results/facts-torch.json" step facts-torch 90 python benchmarks/device_check.py facts torch \
    --image-size "$IMAGE_SIZE" --variants $GPU_VARIANTS "${require[@]}" && [ -z "$REHEARSAL" ]; then
  echo "device-check: stopping: torch sees no GPU (REHEARSAL=cpu rehearses this check on the CPU)" >&2
  exit 1
fi
RESULT="$WORK/results/facts-keras.json" step facts-keras 90 python benchmarks/device_check.py facts keras \
  "${require[@]}"
for framework in torch keras; do
  RESULT="$WORK/results/compute-$framework.json" step "compute-$framework" 150 python benchmarks/compute_only.py \
    --framework "$framework" --keras-backend jax --model alexnet --image-size "$IMAGE_SIZE" --precision bf16 \
    --steps "$COMPUTE_STEPS" --warmup "$COMPUTE_WARMUP"
done

# (2) a short run of each trainer on the real data
wait "$prepare_pid"
prepare_pid=""
for framework in torch keras; do
  step "train-$framework" 240 env VARIANTS="$framework-alexnet-scratch" EPOCHS=1 MAX_STEPS_PER_EPOCH="$SHORT_STEPS" \
    SUMMARY=0 DATA="$DATA" WORK="$WORK/short-$framework" bash benchmarks/gpu.sh "$ARCHIVE"
done

# (3) the GPU tests
step test-gpu 300 env "${test_env[@]}" python -m pytest tests/test_gpu.py -q -p no:cacheprovider \
  --junitxml="$WORK/results/test-gpu.xml"

# (4) the GPU run, as many epochs as fit before the deadline
RESULT="$WORK/results/plan-gpu-sh.json" step plan-gpu-sh 60 python benchmarks/device_check.py epochs --work "$WORK" \
  --left "$(( deadline - $(date +%s) - 5 ))" --max-epochs "$MAX_EPOCHS" --variants $GPU_VARIANTS
epochs="$(sed -n 's/.*"epochs": \([0-9]*\).*/\1/p' "$WORK/results/plan-gpu-sh.json")"
if [ "${epochs:-0}" -ge 1 ]; then
  step gpu-sh 600 env EPOCHS="$epochs" VARIANTS="$GPU_VARIANTS" DATA="$DATA" WORK="$WORK/full" OUT_DIR="$OUT_DIR" \
    bash benchmarks/gpu.sh "$ARCHIVE"
else
  order=$(( order + 1 ))
  record gpu-sh skipped "" 0 0 "no epoch of the four variants fits in the time left (see plan-gpu-sh)"
  echo "device-check: gpu-sh skipped: no epoch fits in the time left"
fi
