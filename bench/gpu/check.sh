#!/usr/bin/env bash
# The GPU check, in one call on a machine with a CUDA GPU (issues 3, 4 and 6):
#   1. install carried wheels (.whl/*.whl, e.g. fla-core) into /tmp/site, no network;
#   2. build the package in place (CPU and, where csrc/cuda has sources, CUDA kernels);
#   3. the GPU tests (pytest -m gpu; flash-attn against SDPA where flash-attn is installed; every
#      op forward and backward with torch.cuda.set_sync_debug_mode("error"), tests/test_autocast.py;
#      metakernels.delta_rule against fla's chunk_delta_rule, packed sequences included);
#   4. the benchmark: docs/conventions.md's maml-small, maml-ce, trajectory, delta-rule (float32
#      and bfloat16, with flash-linear-attention's chunk_delta_rule) and large, at full size,
#      every GPU backend against the reference and torch.func, with the roofline floor measured on
#      this card;
#   4b. the Triton chunked kernels against fla's chunk_delta_rule and the Triton step kernels on
#      the delta rule (bench/gpu/chunked_delta_rule.py);
#   4c. the Triton MLP kernels on maml-sinusoid and ttt-mlp (bench/gpu/mlp_triton.py);
#   5. compute-sanitizer memcheck (CUDA and Triton kernels) and racecheck (CUDA kernels) on
#      bench/gpu/sanitize_case.py, after checking that its cases launch every GPU kernel.
# Every stage has a time limit, goes on after a failure, and prints one summary line; the whole
# script stays under about 9 minutes (MK_CHECK_BUDGET seconds, default 540). Logs and results go to $OUT
# (default ./gpu-out): summary.txt, build.log, pytest.log, bench.log, gpu-results.md,
# gpu-results.json, chunked.log, chunked-delta-rule.md, mlp.log, mlp-triton.md, coverage.log, memcheck.log, memcheck-triton.log, racecheck.log.
#
#   bash bench/gpu/check.sh
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${MK_CHECK_BUDGET:-540}
START=$SECONDS
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }

# seconds_left RESERVE: what is left of the budget after keeping RESERVE seconds for later stages.
seconds_left() { echo $(( BUDGET - (SECONDS - START) - $1 )); }

# stage NAME CAP RESERVE LOG COMMAND...: runs COMMAND under `timeout` (CAP seconds, or less when
# the budget is short), output to LOG, and prints one summary line.
stage() {
    local name=$1 cap=$2 reserve=$3 log=$4
    shift 4
    local limit
    limit=$(seconds_left "$reserve")
    (( limit > cap )) && limit=$cap
    if (( limit < 10 )); then
        say "stage $name: SKIPPED (out of time budget)"
        return 0
    fi
    local began=$SECONDS rc
    timeout -k 10 "$limit" "$@" >> "$log" 2>&1
    rc=$?
    local took=$(( SECONDS - began ))
    if (( rc == 0 )); then
        say "stage $name: OK (${took} s) -> $(basename "$log")"
    elif (( rc == 124 || rc == 137 )); then
        say "stage $name: TIMED OUT after ${limit} s -> $(basename "$log"): $(tail -n 1 "$log")"
    else
        say "stage $name: FAILED rc=$rc (${took} s) -> $(basename "$log"): $(tail -n 1 "$log")"
    fi
    return 0
}

say "metakernels GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "gpu: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
say "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1 | tail -n 1)"

# The toolkit's own folder: the nvcc on PATH may be a wrapper script.
if [[ -z "${CUDA_HOME:-}" || ! -x "${CUDA_HOME:-}/bin/nvcc" ]]; then
    CUDA_HOME=
    for candidate in /usr/local/cuda-13.0 /usr/local/cuda /usr/local/cuda-*; do
        if [[ -x $candidate/bin/nvcc ]]; then CUDA_HOME=$candidate; break; fi
    done
fi
export CUDA_HOME
say "CUDA_HOME: ${CUDA_HOME:-none found} ($("${CUDA_HOME:-/nonexistent}/bin/nvcc" --version 2>/dev/null | tail -n 1 || echo 'no nvcc'))"

# 1. Carried wheels (pure Python, e.g. fla-core): no index, no dependencies.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" > /dev/null; then
    stage wheels 60 360 "$OUT/build.log" \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH
else
    say "stage wheels: none carried (.whl/*.whl absent)"
fi
say "fla: $($PY -c 'import fla; print(fla.__version__)' 2>&1 | tail -n 1)"
# tests/test_attention.py's gpu test runs flash-attn against SDPA where flash-attn is installed
# (a carried wheel, or the machine's own), and skips saying so where it is not.
say "flash-attn: $($PY -c 'import flash_attn; print(flash_attn.__version__)' 2>&1 | tail -n 1)"

# 2. Build in place: setup.py compiles csrc/cuda/*.cu when there are any and CUDA_HOME is set.
stage build "${MK_BUILD_CAP:-210}" "${MK_BUILD_RESERVE:-300}" "$OUT/build.log" \
    env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 METAKERNELS_CPU_ARCH=native \
    "$PY" setup.py build_ext --inplace
say "backends: $($PY -c 'import metakernels as mk; print("cuda:", mk.available_backends("cuda"), "cpu:", mk.available_backends("cpu"))' 2>&1 | tail -n 1)"

# 3. The GPU tests. Modules that need packages this machine lacks fail to collect; the rest run.
stage pytest "${MK_PYTEST_CAP:-150}" "${MK_PYTEST_RESERVE:-250}" "$OUT/pytest.log" \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -rfEs \
        ${MK_PYTEST_ARGS:-tests/}
grep -E "passed|failed|error|skipped|deselected" "$OUT/pytest.log" | tail -n 1 | sed 's/^/  pytest: /' | tee -a "$SUMMARY"
# metakernels.delta_rule against fla's chunk_delta_rule (tests/test_delta_rule.py): its failures,
# or that none of its GPU tests failed.
if grep -qE "^(FAILED|ERROR) tests/test_delta_rule.py" "$OUT/pytest.log"; then
    grep -E "^(FAILED|ERROR) tests/test_delta_rule.py" "$OUT/pytest.log" | head -n 6 | sed 's/^/  delta_rule: /' | tee -a "$SUMMARY"
else
    say "  delta_rule: no failure among the GPU tests of tests/test_delta_rule.py (skips: see pytest.log)"
fi

# 4. The benchmark; the delta rule (T = 1024 steps of Python-driven baselines) last. The results
#    are rewritten after each configuration, so a run cut short keeps what it measured.
SANITIZE_RESERVE=0
[[ -f bench/gpu/sanitize_case.py ]] && SANITIZE_RESERVE=170
CHUNKED_CAP=${MK_CHUNKED_CAP:-100}
MLP_CAP=${MK_MLP_CAP:-90}
stage bench "${MK_BENCH_CAP:-210}" $(( SANITIZE_RESERVE + CHUNKED_CAP + MLP_CAP )) "$OUT/bench.log" \
    "$PY" -m metakernels bench --device cuda \
        --config large --config trajectory --config maml-small --config maml-ce \
        --config delta-rule:bfloat16 --config delta-rule \
        --time-budget 6 --repeats 20 \
        --json "$OUT/gpu-results.json" --markdown "$OUT/gpu-results.md"
grep -E "^(PASS|FAIL)" "$OUT/bench.log" | tail -n 1 | sed 's/^/  bench: /' | tee -a "$SUMMARY"

# 4b. The Triton chunked kernels on the delta rule (issue 14): against fla's chunk_delta_rule and
#     the Triton step kernels, bfloat16 and float32, the `delta-rule` configuration's and fla's own
#     shapes; the table (with the ratios chunked / fla and chunked / steps) goes to
#     chunked-delta-rule.md.
stage chunked-delta-rule "$CHUNKED_CAP" $(( SANITIZE_RESERVE + MLP_CAP )) "$OUT/chunked.log" \
    "$PY" bench/gpu/chunked_delta_rule.py --repeats 10 --out "$OUT/chunked-delta-rule.md"
grep -E "^\| delta-rule" "$OUT/chunked.log" | sed 's/^/  chunked: /' | tee -a "$SUMMARY"

# 4c. The Triton MLP kernels (issue 18): maml-sinusoid and ttt-mlp meta-steps (forward + backward,
#     float32) after a meta-gradient check against the float64 reference, timed against the
#     reference backend and torch.func; a configuration past the kernels' limits (ttt-mlp's
#     256-wide layer) says so on its row. The table goes to mlp-triton.md.
stage mlp-triton "$MLP_CAP" "$SANITIZE_RESERVE" "$OUT/mlp.log" \
    "$PY" bench/gpu/mlp_triton.py --repeats 10 --out "$OUT/mlp-triton.md"
grep -E "^\| (maml-sinusoid|ttt-mlp)" "$OUT/mlp.log" | sort -u | sed 's/^/  mlp: /' | tee -a "$SUMMARY"

# 5. compute-sanitizer on small cases that launch every GPU kernel: first (without the sanitizer)
#    the check that they do, then memcheck on the CUDA and the Triton kernels, racecheck on the
#    CUDA kernels (their shared-memory tiles are written by hand; Triton's are the compiler's).
if [[ -f bench/gpu/sanitize_case.py ]]; then
    SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer")
    stage kernel-coverage 40 130 "$OUT/coverage.log" \
        "$PY" bench/gpu/sanitize_case.py --backend cuda --backend triton --coverage
    grep -E "kernels launched" "$OUT/coverage.log" | sed 's/^/  coverage: /' | tee -a "$SUMMARY"
    stage memcheck 40 90 "$OUT/memcheck.log" \
        "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" bench/gpu/sanitize_case.py
    grep -E "ERROR SUMMARY" "$OUT/memcheck.log" | tail -n 1 | sed 's/^/  memcheck: /' | tee -a "$SUMMARY"
    stage memcheck-triton 45 45 "$OUT/memcheck-triton.log" \
        "$SANITIZER" --tool memcheck --error-exitcode 1 "$PY" bench/gpu/sanitize_case.py --backend triton
    grep -E "ERROR SUMMARY" "$OUT/memcheck-triton.log" | tail -n 1 | sed 's/^/  memcheck-triton: /' | tee -a "$SUMMARY"
    stage racecheck 45 0 "$OUT/racecheck.log" \
        "$SANITIZER" --tool racecheck --error-exitcode 1 "$PY" bench/gpu/sanitize_case.py
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/racecheck.log" | tail -n 1 | sed 's/^/  racecheck: /' | tee -a "$SUMMARY"
else
    say "stage sanitize: skipped (bench/gpu/sanitize_case.py absent)"
fi

say "done in $(( SECONDS - START )) s; results in $OUT"
if [[ -f $OUT/gpu-results.md ]]; then
    echo
    cat "$OUT/gpu-results.md"
fi
