#!/usr/bin/env bash
# The real-data transfer study (config/transfer-cifar10.yaml) on the JPEG copy of CIFAR-10, and its
# results committed under benchmarks/results/transfer-cifar10/ with the command, the machine and the
# wall time. A few hours on 2 CPU cores.
#   bash benchmarks/transfer-cifar10.sh [ARCHIVE [WORKDIR]]
# ARCHIVE defaults to ../shared/data/cifar10-jpeg.tar.xz, WORKDIR (the workflow's results) to
# /tmp/transfer-cifar10; a rerun resumes there. Two trainings at a time, a thread each (`--resources
# gpu=2`: two slots; on a CPU they only bound how many trainings run at once), so that the scratch
# runs use the core the pretraining leaves. CNNBENCH_DRY_RUN=1: a Snakemake dry run (-n), nothing
# trained or copied (tests/test_benchmarks.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
archive="$(realpath "${1:-$repo/../shared/data/cifar10-jpeg.tar.xz}")"
workdir="${2:-/tmp/transfer-cifar10}"
out="$repo/benchmarks/results/transfer-cifar10"
cores=$(nproc)
python="${PYTHON:-$repo/.venv/bin/python}"
export PATH="$(dirname "$python"):$PATH"  # the jobs' `python` is the one that runs Snakemake

run=("$python" -m snakemake -s "$repo/Snakefile" --directory "$workdir" --configfile "$repo/config/transfer-cifar10.yaml"
     --config "data={imagefolder: {path: $archive}}" --cores "$cores"
     --resources gpu=2)
if [ "${CNNBENCH_DRY_RUN:-0}" = 1 ]; then
    exec "${run[@]}" -n
fi
start=$(date +%s)
"${run[@]}"
end=$(date +%s)

mkdir -p "$out"
for name in summary.md conclusions.md data_efficiency.png pretraining_gain.png summary.csv paired_differences.csv lr_selection.csv; do
    cp "$workdir/results/$name" "$out/$name"
done
cp "$workdir/results/pretrain/alexnet/metrics.json" "$out/pretraining-metrics.json"
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
cat > "$out/README.md" <<EOF
# The real-data transfer study: results

What \`bash benchmarks/transfer-cifar10.sh\` wrote on $(date -u +%Y-%m-%d) (config/transfer-cifar10.yaml,
commit $(git -C "$repo" rev-parse --short HEAD)). The source task is five other CIFAR-10 classes, not
ImageNet, and the images are the JPEG copy of CIFAR-10 (quality 75, lossy): accuracies are close to,
not the same as, accuracies on the original batches.

- Command: \`bash benchmarks/transfer-cifar10.sh\`, which ran \`${run[*]/#$repo\//}\`
- Machine: $cores CPU cores ($cpu), $(free -g | awk '/^Mem:/ {print $2}') GiB, no GPU; $("$python" -c 'import torch; print("torch", torch.__version__)'), $("$python" -c 'import keras, tensorflow as tf; print("keras", keras.__version__, "tensorflow", tf.__version__)' 2>/dev/null)
- Wall time: $(( end - start )) s (the data's preparation, the pretraining, $(ls -d "$workdir"/results/runs/*/*/seed* | wc -l) study runs, the summary)
- Files: summary.md (every run, per-variant statistics, paired differences), conclusions.md,
  data_efficiency.png, pretraining_gain.png, summary.csv, paired_differences.csv, lr_selection.csv, and the pretraining's
  metrics.json (pretraining-metrics.json)
EOF
echo "wrote $out"
