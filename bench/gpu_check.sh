#!/usr/bin/env bash
# The project's GPU check, prepared to run as ONE command on a lent GPU machine in about 4-8 minutes:
#   1. the kernel tests (tests/test_kernels_{slot_assign,permute}.py): CPU interpreter cases plus the
#      same cases compiled on CUDA (bf16 included);
#   2. `bench-kernels --device cuda`: bf16/fp32 checks, the Megatron cross-check, timings for
#      T in {4096, 16384, 65536}, K = 8, H in {2048, 4096}, the card's copy bandwidth, goal verdicts;
#   3. bench/calibrate_gpu.py: the cost model's expert GEMM fit (a + b*tokens per preset), matmul and HBM
#      copy rates, written as a hardware profile (profile_measured.json) for `simulate --profile PATH`;
#   4. bench/grouped_gemm.py: the expert MLP as one grouped GEMM over S home groups, over S + R groups
#      (replicas as extra groups, relibra's grouped-experts runtime) and as S groups + one call per replica.
# Results go to $OUT (the device tool's folder; ./bench/results/local-<date> when unset): nvidia-smi.txt,
# pytest.log, bench.log, bench_kernels_cuda.json, summary.txt. Copy the JSON into bench/results/.
#
# Needs python3 with torch + triton (+ numpy, pytest). megatron-core is optional: carry its wheel in .whl/
# (bench/results/README.md); without it the Megatron comparisons are skipped with a note in the JSON.
# Without a GPU (a dry run of this script) it runs the tests and `bench-kernels --device cpu` instead.
# Exit status: 0 when every check passed (timings never fail the script), else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/bench/results/local-$(date -u +%Y%m%dT%H%M%S)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/relibra-triton-cache}
start=$(date +%s)
status=0

# optional wheels (megatron-core 0.19.2 for the comparison), never fetched from a registry here
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/relibra-site \
    .whl/*.whl && export PYTHONPATH=/tmp/relibra-site${PYTHONPATH:+:$PYTHONPATH}
fi

# the package without installing it: relibra_verl/ plus kernels/ as relibra_verl.kernels (pyproject's
# package-dir), assembled from links in a scratch folder
if ! "$PY" -c "import relibra_verl.kernels" 2>/dev/null; then
  pkg=$(mktemp -d /tmp/relibra-pkg.XXXXXX)
  mkdir -p "$pkg/relibra_verl"
  for f in "$ROOT"/relibra_verl/*; do ln -s "$f" "$pkg/relibra_verl/"; done
  ln -s "$ROOT/kernels" "$pkg/relibra_verl/kernels"
  export PYTHONPATH=$pkg${PYTHONPATH:+:$PYTHONPATH}
fi

{ nvidia-smi 2>&1 || echo "nvidia-smi not available"; } >"$OUT/nvidia-smi.txt"
"$PY" - <<'EOF' | tee "$OUT/summary.txt"
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import megatron.core
    print("megatron-core", megatron.core.__version__)
except Exception as exc:
    print("megatron-core not importable:", type(exc).__name__, exc)
EOF
has_cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")

# 1. tests: the kernel test modules only (the CLI test imports every command module, some need verl)
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_slot_assign.py tests/test_kernels_permute.py \
  2>&1 | tee "$OUT/pytest.log" | tail -n 15
rc=${PIPESTATUS[0]}
echo "pytest exit $rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
[ "$rc" -eq 0 ] || status=1

# 2. checks + benchmarks
if [ "$has_cuda" = 1 ]; then
  timeout 360 "$PY" -m relibra_verl.commands.bench_kernels --device cuda --json "$OUT/bench_kernels_cuda.json" \
    2>&1 | tee "$OUT/bench.log" | grep -v "^check .* ok " | tail -n 80
else
  timeout 120 "$PY" -m relibra_verl.commands.bench_kernels --device cpu --json "$OUT/bench_kernels_cpu.json" \
    2>&1 | tee "$OUT/bench.log" | tail -n 5
fi
rc=${PIPESTATUS[0]}
echo "bench-kernels exit $rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
[ "$rc" -eq 0 ] || status=1
grep -E "^goals|^device-to-device|megatron cross-check" "$OUT/bench.log" >>"$OUT/summary.txt"

# 3. cost-model calibration (issue 3): expert GEMM a + b*tokens per preset, matmul rate, HBM copy rate
if [ "$has_cuda" = 1 ]; then
  timeout 150 "$PY" bench/calibrate_gpu.py --out "$OUT/profile_measured.json" 2>&1 | tee "$OUT/calibrate.log" | tail -n 12
else
  timeout 120 "$PY" bench/calibrate_gpu.py --dry-run --out "$OUT/profile_dry_run.json" 2>&1 | tee "$OUT/calibrate.log" | tail -n 3
fi
rc=${PIPESTATUS[0]}
echo "calibrate exit $rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
[ "$rc" -eq 0 ] || status=1

# 4. grouped expert GEMM with and without replica groups (relibra's grouped-experts runtime: home + replica
#    groups in one call, against home only and against one extra call per replica); step 2 already times
#    relibra's Triton permute against Megatron's unfused and (with Transformer Engine) fused permute
if [ "$has_cuda" = 1 ]; then
  timeout 150 "$PY" bench/grouped_gemm.py --out "$OUT/grouped_gemm.json" 2>&1 | tee "$OUT/grouped_gemm.log" | tail -n 6
else
  timeout 60 "$PY" bench/grouped_gemm.py --dry-run --out "$OUT/grouped_gemm_dry_run.json" 2>&1 | tee "$OUT/grouped_gemm.log" | tail -n 2
fi
rc=${PIPESTATUS[0]}
echo "grouped gemm exit $rc ($(( $(date +%s) - start )) s)" | tee -a "$OUT/summary.txt"
[ "$rc" -eq 0 ] || status=1
grep -E "^grouped GEMM" "$OUT/grouped_gemm.log" >>"$OUT/summary.txt"
echo "gpu_check status $status, results in $OUT" | tee -a "$OUT/summary.txt"
exit $status
