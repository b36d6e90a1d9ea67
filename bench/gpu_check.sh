#!/usr/bin/env bash
# The prepared device check (issue 20): run from the repository root of a machine with a CUDA GPU.
#
#   bash bench/gpu_check.sh            # about 8 minutes at most; tables and logs under $OUT
#   bash bench/gpu_check.sh --dry-run  # prints each step's command and timeout, runs nothing
#
# Steps, each under its own `timeout` (seconds; the sum is 480): the environment, the carried wheels
# (.whl/, see docs/gpus.md), the build of the C++/CUDA extension with the project installed
# against the machine's torch, the GPU tests (tests/test_gpu_realistic.py and the op tests on CUDA),
# the three op benchmarks at the issue's sizes, TransCLIP's solver against its dense reference (50k rows)
# and alone at 1.28M rows, and the end-to-end speed benchmark on ViT-B/16 with
# random weights over synthetic images that the script writes. A failed step is recorded and the
# next one runs. $OUT (default ./gpu_check_out) receives summary.md (the tables), steps.tsv (step, exit
# status, seconds) and gpu_check_logs.tar.gz (every log and results file): three files.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-./gpu_check_out}"
PY="${PYTHON:-python}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"  # outside $OUT: only the three result files go back
LOGS="$WORK/logs"
ARCH="${TORCH_CUDA_ARCH_LIST:-9.0}"
QUEUE_CONFIGS="--config 256,65536,512,float32 --config 256,65536,512,bfloat16 --config 256,65536,768,bfloat16"
DUAL_CONFIGS="--config 256,1000,512,float32 --config 256,1000,512,bfloat16 --config 256,1000,768,bfloat16"

# name | timeout (s) | command
STEPS=(
  "environment|10|nvidia-smi; $PY -c 'import sys, torch, triton; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(0))'"
  "wheels|30|if ls .whl/*.whl >/dev/null 2>&1; then $PY -m pip install --no-deps --no-index .whl/*.whl; else echo 'no .whl/ folder: nothing to install'; fi"
  "build|100|COFT_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST='$ARCH' MAX_JOBS=16 $PY -m pip install --no-deps --no-build-isolation -e . && $PY -c 'from coft_fast.ops import _extension as e; assert e.has_cuda_kernels(), \"no CUDA kernels built\"; print(\"CUDA kernels: yes\")'"
  "gpu_tests|70|$PY -m pytest -q -p no:cacheprovider tests/test_gpu_realistic.py tests/test_ops_queue_loss.py tests/test_ops_dual_prompt.py tests/test_ops_pseudo_label.py"
  "bench_queue_loss|30|$PY bench/bench_queue_loss.py --device cuda $QUEUE_CONFIGS --tag h200"
  "bench_dual_prompt|30|$PY bench/bench_dual_prompt.py --device cuda $DUAL_CONFIGS --tag h200"
  "bench_pseudo_label_stats|40|$PY bench/bench_pseudo_label_stats.py --devices cuda --sizes 1281167x1000 --repeats 5 --large-repeats 5"
  "bench_transductive|60|$PY bench/bench_transductive.py --device cuda --cells 50000:1000 1281167:1000 --dense-max 50000 --dense-max-classes 1000 --tag h200"
  "e2e_speed|100|$PY bench/gpu_check_images.py '$WORK/images' && $PY bench/e2e_speed.py --model ViT-B-16 --pretrained none --images '$WORK/images/pool' --eval-images '$WORK/images/test' --subset 1000 --eval-subset 300 --work '$WORK/e2e' --tag h200 --set phase1.steps=40 --set phase1.min_epochs=1 --set phase2.epochs=1"
  "pack|10|true"
)

if [ "$DRY_RUN" = 1 ]; then
  echo "# bench/gpu_check.sh --dry-run: OUT=$OUT; nothing is run"
  total=0
  for entry in "${STEPS[@]}"; do
    IFS='|' read -r name limit command <<<"$entry"
    total=$((total + limit))
    printf 'step %-26s timeout %4ss: %s\n' "$name" "$limit" "$command"
  done
  echo "total of the timeouts: ${total} s"
  exit 0
fi

mkdir -p "$LOGS"
printf 'step\texit_status\tseconds\n' > "$OUT/steps.tsv"
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit command <<<"$entry"
  [ "$name" = pack ] && continue
  echo "=== $name (timeout ${limit} s): $command"
  start=$(date +%s)
  timeout --kill-after=5 "$limit" bash -c "$command" > "$LOGS/$name.log" 2>&1
  status=$?
  seconds=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\n' "$name" "$status" "$seconds" >> "$OUT/steps.tsv"
  tail -n 3 "$LOGS/$name.log"
  echo "--- $name: exit status $status in ${seconds} s"
done

# pack: the tables into summary.md, everything else into one archive
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  cat "$OUT/steps.tsv"
  echo '```'
  for table in bench/results/queue_loss_cuda_h200.md bench/results/dual_prompt_cuda_h200.md \
               bench/results/pseudo_label_stats.md bench/results/transductive_speed_cuda_h200.md \
               bench/results/e2e_speed_cuda_h200.md; do
    [ -f "$table" ] && { echo; echo "## $table"; echo; cat "$table"; }
  done
  echo
  echo "## gpu_tests (last lines)"
  echo '```'
  tail -n 30 "$LOGS/gpu_tests.log" 2>/dev/null
  echo '```'
} > "$OUT/summary.md"
cp bench/results/*_h200.* bench/results/pseudo_label_stats.* "$LOGS/" 2>/dev/null
tar -czf "$OUT/gpu_check_logs.tar.gz" -C "$WORK" logs
printf 'pack\t0\t0\n' >> "$OUT/steps.tsv"
echo "wrote $OUT/summary.md, $OUT/steps.tsv, $OUT/gpu_check_logs.tar.gz"
