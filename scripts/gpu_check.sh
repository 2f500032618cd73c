#!/usr/bin/env bash
# The one script to run on a GPU machine (make gpu-check). It writes every step's log and a summary
# table under $OUT (default ./gpu_check_out) and is sized to fit in about 9 minutes on one H200.
#   GPU_CHECK_SKIP="bench,ddp"   skips steps by name (names: see STEPS below)
#   GPU_CHECK_DRY=1              runs the same steps on CPU at tiny sizes, skipping the CUDA-only
#                                ones (build, cuda_tests); tests/test_gpu_check.py runs it so
#   PYTHON=/path/to/python       the interpreter (default: .venv/bin/python, else python3)
#   GPU_CHECK_CONFIG=FILE        the model config (default: the demo's; the tiny one in a dry run)
#   GPU_CHECK_WORK=DIR           datasets, runs and exports (default /tmp/isda_gpu_check): only the
#                                logs go to $OUT
# A failing step does not stop the others; the exit status is 1 when any step failed.
# On a machine without Detectron2 and without network, install the wheels that
# scripts/gpu_wheels.sh prepared first (docs/INSTALL.md).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/gpu_check_out}"
work="${GPU_CHECK_WORK:-/tmp/isda_gpu_check}"
mkdir -p "$OUT" "$work"
export DETECTRON2_DATASETS="$work/datasets"
dry="${GPU_CHECK_DRY:-0}"
skip=",${GPU_CHECK_SKIP:-},"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
summary="$OUT/summary.txt"
printf '%-12s %-8s %8s  %s\n' step result seconds log > "$summary"
failed=0

if [ "$dry" = 1 ]; then
  device=cpu; dtypes="float32"; cfg=configs/ISDA-Tiny-CPU.yaml; iters=40; size="128 160"
  image="256 320"; shapes=dec1; amp=False; scenes=8
else
  device=cuda; dtypes="float32 bfloat16"; cfg=configs/ISDA-Demo.yaml; iters=200; size="800 1216"
  image="800 1216"; shapes=enc1,dec1; amp=True; scenes=400
fi
cfg="${GPU_CHECK_CONFIG:-$cfg}"

step() {  # step NAME CUDA_ONLY COMMAND...: runs COMMAND, logging to $OUT/NAME.log, and times it
  local name="$1" cuda_only="$2"; shift 2
  local log="$OUT/$name.log" start=$SECONDS result rc
  if [[ "$skip" == *",$name,"* ]]; then
    result=skipped; echo "skipped by GPU_CHECK_SKIP" > "$log"
  elif [ "$dry" = 1 ] && [ "$cuda_only" = 1 ]; then
    result=skipped; echo "skipped: CUDA-only step in a dry run" > "$log"
  else
    echo "== $name: $*" | tee "$log"
    "$@" >> "$log" 2>&1; rc=$?
    if [ "$rc" = 0 ]; then result=ok; else result=FAIL; failed=1; fi
    [ "$rc" = 0 ] || tail -n 20 "$log"
  fi
  printf '%-12s %-8s %8d  %s\n' "$name" "$result" $((SECONDS - start)) "$log" | tee -a "$summary"
}

train_amp() {  # the demo's training (AMP on CUDA), with evaluation; the loss must go down
  "$PYTHON" tools/run_demo.py --config-file "$cfg" --output-dir "$work/train_run" --retrain \
    --dataset-root "$DETECTRON2_DATASETS/isda_synth" --train-size "$scenes" --val-size 8 \
    --num-vis 1 MODEL.DEVICE "$device" SOLVER.AMP.ENABLED "$amp" SOLVER.MAX_ITER "$iters" \
    SOLVER.STEPS "()" TEST.EVAL_PERIOD 0 || return 1
  "$PYTHON" - "$work/train_run/metrics.json" <<'PY'
import json, sys
losses = [r["total_loss"] for r in map(json.loads, open(sys.argv[1])) if "total_loss" in r]
k = max(1, len(losses) // 4)
first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
print(f"total_loss: first {k} logged {first:.3f}, last {k} logged {last:.3f}")
sys.exit(0 if last < first else "the loss did not go down")
PY
}

ddp() {  # 2-process DDP training when there are two or more GPUs (2 CPU processes in a dry run)
  local gpus
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  if [ "$dry" != 1 ] && [ "$gpus" -lt 2 ]; then
    echo "skipped: $gpus GPU(s) visible, DDP needs 2"; return 0
  fi
  "$PYTHON" train_net.py --config-file "$cfg" --num-gpus 2 MODEL.DEVICE "$device" \
    SOLVER.MAX_ITER 4 SOLVER.IMS_PER_BATCH 4 TEST.EVAL_PERIOD 0 OUTPUT_DIR "$work/ddp_run"
}

export_all() {  # torch.export and ONNX (verified in onnxruntime) of the trained model
  local common=(--config-file "$cfg" --size $size MODEL.DEVICE cpu
    MODEL.WEIGHTS "$work/train_run/model_final.pth")
  "$PYTHON" tools/export_model.py --format torch_export --output "$work/export_pt2" "${common[@]}" &&
    "$PYTHON" tools/export_model.py --format onnx --dynamic --output "$work/export_onnx" "${common[@]}"
}

# STEPS, in order.
step build 1 env MAX_JOBS="$(nproc)" "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
step check 0 "$PYTHON" -m isda.check --json "$OUT/check.json"
step cuda_tests 1 "$PYTHON" -m pytest -q -m cuda tests
step opcheck 0 "$PYTHON" -m pytest -q tests/test_ms_deform_attn_operator.py \
  tests/test_ms_deform_attn_cuda.py -k "operator_checks or fake_shapes"
step bench 0 "$PYTHON" benchmarks/bench_ms_deform_attn.py --device "$device" --repeats 3 \
  --shapes "$shapes"
step model 0 "$PYTHON" benchmarks/bench_model.py inference --device "$device" --repeats 3 \
  --dtypes $dtypes --image-size $image
step train_amp 0 train_amp
step ddp 0 ddp
step export 0 export_all

echo "summary ($summary):"; cat "$summary"
exit "$failed"
