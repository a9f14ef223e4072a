#!/usr/bin/env bash
# Check a jgpt change on one GPU in one go, each part under its own time limit so one slow part
# cannot take the others' results with it:
#   1. the record step beside ref/train_gpt.py under torch.compile (scripts/bench.py, windows
#      1 and 14, remat off), with any extra bench.py flags, e.g. --variant base --variant x:head_out=bf16
#   2. the GPU-only tests (compiled kernels against references, the FP8 GEMMs in the HLO)
#   3. where torch eager, torch compiled and jgpt round to bf16 (scripts/rounding_audit.py)
#   4. the step-1 gradients at the training init against ref (scripts/gpu_grad_parity.py --init
#      train: lm_head's signs, which alone set the loss after the first update), if DATA holds
#      Gutenberg-format shards (*train*.bin, *val*.bin)
#   5. 200 steps of jgpt against stored ref curves (scripts/gpu_parity.py --baseline), with DATA too
#
#   OUT=/tmp/check DATA=.gpudata bash scripts/gpu_check.sh [bench.py flags...]
#
# Results go to $OUT (default runs/gpu_check): step.txt/json, tests.txt, audit.txt, grad.txt,
# parity/ and parity.txt; the tables are printed too. BASELINE (default
# benchmarks/parity_h100/curves.csv) names the curves to compare against (none: run ref compiled
# anew beside jgpt, ~3 minutes more on an H100; with CALIBRATE=1 all three curves come from one
# card, ~7 minutes on an H200); JGPT_FLAGS passes
# jgpt.train flags to the parity run; CALIBRATE=1 reruns ref eager beside it (after a change to
# ref's eager arithmetic; ~2 minutes more; ref eager at 49,152 tokens needs more than an H100's
# 80 GB: an H200). The parts' limits in seconds, 0 skipping a part:
# BENCH_S (300; torch and three jgpt variants took 150 on an H100), TESTS_S (240: 26 tests took 230),
# AUDIT_S (90), GRAD_S (200: it compiles the whole ref model),
# PARITY_S (200). On the device tool keep their sum under its 10-minute limit per call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
DATA=${DATA:-.gpudata}
BASELINE=${BASELINE:-benchmarks/parity_h100/curves.csv}
mkdir -p "$OUT"
python -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" || { echo "gpu_check: no GPU for jax" >&2; exit 2; }

part() {  # part LIMIT_SECONDS TITLE: true when the part runs (a limit of 0 skips it)
    if [ "$1" = 0 ]; then echo "== $2: skipped =="; return 1; fi
    echo "== $2 =="
}
have_data() {
    compgen -G "$DATA/*train*.bin" > /dev/null && return 0
    echo "   (no $DATA/*train*.bin: copy ../shared/data/gutenberg/*.bin there)"; return 1
}

if part "${BENCH_S:=300}" "record step (bench.py)"; then
    timeout "$BENCH_S" python scripts/bench.py --windows 1 14 --remat off --iters 3 --warmup 1 --json "$OUT/step.json" "$@" \
        > "$OUT/step.txt" 2> "$OUT/step.err" || echo "bench.py: exit $? (see $OUT/step.err)"
    cat "$OUT/step.txt"
fi

if part "${TESTS_S:=240}" "GPU-only tests"; then
    # ("not interpreted": the interpreted-kernel tests are for CPUs; "on_gpu" also matches
    # test_attention_gpu.py's name, whose fast CPU-side tests come along)
    timeout "$TESTS_S" python -m pytest -q tests -k "(on_gpu or cublaslt or ref_cuda) and not interpreted" -p no:cacheprovider \
        > "$OUT/tests.txt" 2>&1 || echo "pytest: exit $?"
    tail -5 "$OUT/tests.txt"
fi

if part "${AUDIT_S:=90}" "bf16 rounding sites (rounding_audit.py)"; then
    timeout "$AUDIT_S" python scripts/rounding_audit.py > "$OUT/audit.txt" 2>&1 || echo "rounding_audit: exit $?"
    grep -E "^\||^torch" "$OUT/audit.txt"
fi

if part "${GRAD_S:=200}" "step-1 gradients at the training init (gpu_grad_parity.py --init train)" && have_data; then
    timeout "$GRAD_S" python scripts/gpu_grad_parity.py --data "$DATA" --tokens 16384 --init train \
        > "$OUT/grad.txt" 2>&1 || echo "gpu_grad_parity: exit $?"
    grep -E "^summed loss|^lm_head|^head input|^\| lm_head" "$OUT/grad.txt"
fi

if part "${PARITY_S:=200}" "200-step parity against $BASELINE${CALIBRATE:+, ref eager rerun}" && have_data; then
    baseline=(--baseline "$BASELINE")
    [ "$BASELINE" = none ] && baseline=()
    timeout "$PARITY_S" python scripts/gpu_parity.py --data "$DATA" --steps 200 --val_every 50 ${baseline[@]+"${baseline[@]}"} \
        --out "$OUT/parity" --jgpt_flags "${JGPT_FLAGS:-}" ${CALIBRATE:+--calibrate} > "$OUT/parity.txt" 2>&1 \
        || echo "gpu_parity: exit $?"
    tail -6 "$OUT/parity.txt"
fi
