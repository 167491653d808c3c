#!/usr/bin/env bash
# One prepared device run for the compiled core: build, GPU tests, benchmarks. Results go under $OUT
# (default /tmp/ul_fast_gpu_check); the last thing printed is a short summary table.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # PYTHON=python3.12 to pick the interpreter
#   PARTS="tests ops" bash benchmarks/gpu_check.sh      # a subset, to fit one call's time limit
#
# Steps: (1) pip install --no-build-isolation -e . (timed; build log kept), plus a timed wheel build from a
# clean copy of the sources (the issue's "< 60 s from a clean clone" target); (2) pytest -m gpu over
# tests/; (3) benchmarks/gpu_bench_ops.py; (4) benchmarks/gpu_bench_attention.py if present;
# (5) benchmarks/gpu_bench_train_step.py (a whole UL training step, reference vs fused, eager vs compile).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/ul_fast_gpu_check}
mkdir -p "$OUT"
summary="$OUT/summary.md"
: > "$summary"
note() { echo "$*" >> "$summary"; echo "[gpu_check] $*" >&2; }
PARTS=${PARTS:-"tests ops attention train"}
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
seconds() { $PY -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

# (1) build
t0=$(date +%s.%N)
$PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
build_rc=$?
t1=$(date +%s.%N)
clean=$(mktemp -d)
cp -r csrc ul_fast setup.py pyproject.toml MANIFEST.in README.md "$clean"/ 2>/dev/null
find "$clean" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} + 2>/dev/null
t2=$(date +%s.%N)
$PY -m pip wheel --no-build-isolation --no-deps -q -w "$clean/wheels" "$clean" >> "$OUT/build.log" 2>&1
clean_rc=$?
t3=$(date +%s.%N)
rm -rf "$clean"
$PY -c "import json, ul_fast; print(json.dumps(ul_fast.build_info(), indent=1))" > "$OUT/build_info.json" 2>&1
note "## ul_fast compiled core: GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
note "- device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
note "- software: $($PY -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")' 2>&1), $(nvcc --version 2>/dev/null | tail -1)"
note "- editable build (pip install --no-build-isolation -e .): rc=$build_rc, $(seconds "$t0" "$t1") s"
note "- wheel from a clean copy of the sources: rc=$clean_rc, $(seconds "$t2" "$t3") s"
note "- build_info: $($PY -c "import ul_fast; i = ul_fast.build_info(); print(f\"extension={i['extension']} cuda={i['cuda']} archs={i['cuda_archs']} cuda_available={i['cuda_available']}\")" 2>&1 | tail -1)"
if [ "$build_rc" != 0 ]; then
  note "BUILD FAILED: see $OUT/build.log"; tail -30 "$OUT/build.log"; exit 1
fi

# (2) GPU tests
if want tests; then
  $PY -m pytest -m gpu tests/ -q -p no:cacheprovider > "$OUT/pytest_gpu.log" 2>&1
  note "- pytest -m gpu tests/: $(tail -1 "$OUT/pytest_gpu.log")"
fi

# (3) op benchmarks
if want ops; then
  $PY benchmarks/gpu_bench_ops.py --out "$OUT/bench_ops.json" --md "$OUT/bench_ops_table.md" > "$OUT/bench_ops.log" 2>&1
  note "- gpu_bench_ops.py: rc=$?"
fi

# (4) attention and adaLN benchmark
if want attention; then
  $PY benchmarks/gpu_bench_attention.py > "$OUT/bench_attention.log" 2>&1
  note "- gpu_bench_attention.py: rc=$? (output in bench_attention.log)"
fi

# (5) UL training step: reference vs fused kernels, eager vs torch.compile (stage 1 and stage 2)
if want train; then
  $PY benchmarks/gpu_bench_train_step.py --config fmnist --batch 256 --out "$OUT" > "$OUT/bench_train_step.log" 2>&1
  note "- gpu_bench_train_step.py: rc=$?"
fi

echo
want tests && grep -E "FAILED|ERROR" "$OUT/pytest_gpu.log" | head -20
want train && grep -A 12 "^## UL training step" "$OUT/bench_train_step.log"
want attention && tail -25 "$OUT/bench_attention.log"
echo
if [ -f "$OUT/bench_ops_table.md" ]; then
  cat "$OUT/bench_ops_table.md" >> "$summary"
  rm "$OUT/bench_ops_table.md"  # kept in summary.md ($OUT returns at most 8 files)
  cat "$summary"
else
  cat "$summary"
  if want ops; then echo; tail -30 "$OUT/bench_ops.log"; fi
fi
