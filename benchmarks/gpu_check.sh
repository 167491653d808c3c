#!/usr/bin/env bash
# One prepared device run: build, GPU tests, benchmarks against their baselines. Every part runs under its
# own time limit, so a slow or hanging part costs its budget and no more; the parts that finished still report.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh                 # PYTHON=python3.12 to pick the interpreter
#   PARTS="build tests ops" bash benchmarks/gpu_check.sh       # a subset, to fit one call's time limit
#   BUDGET_tests=240 bash benchmarks/gpu_check.sh              # a part's limit in seconds (defaults below)
#
# The default PARTS are what a session's first device call should run (about 9 minutes: the goals table of
# issue 19 first); a second call takes the rest: PARTS="tests ablation sampling ops attention".
#
# Parts, in order:
#   build      pip install --no-build-isolation --no-deps -e .  (timed; log kept) + build_info
#   train      benchmarks/gpu_bench_train_step.py --phases table: the trainer's whole step (fmnist, batch 256) as
#              reference, reference+compile, ul_fast, ul_fast+compile, ul_fast+graph, ul_fast+compile+graph, with
#              ms/step, MFU and the ratios over reference and reference+compile (compiled for
#              TRAIN_COMPILE_STAGES, default "1,2")
#   paper      gpu_bench_train_step.py --phases paper: imagenet512-paper per stage, the largest power-of-two batch,
#              its peak memory, ms/step and MFU (ul_fast, ul_fast+graph), then the same with
#              train.activation_checkpointing (a part cut short by its budget keeps the rows it measured)
#   profile    benchmarks/profile_train_step.py: GPU-busy share, kernels and host ms per step, top kernels
#   tests      pytest -m gpu tests/ (pytest-xdist over 16 workers when installed; JUnit XML kept), and
#              tests/test_inception.py against pytorch-fid when pytorch_fid and torchvision import
#   ablation   gpu_bench_train_step.py --phases ablation: each kernel against its reference inside the
#              graph-captured step (for dispatch.REFERENCE_IS_FASTER)
#   ops        benchmarks/gpu_bench_ops.py        noise injection, loss, embedding vs eager and torch.compile
#   sampling   benchmarks/gpu_bench_sampling.py   images/s of sampling chains, eager vs CUDA-graph replay
#   attention  benchmarks/gpu_bench_attention.py  Triton attention vs every SDPA backend; adaLN vs eager/compile
#   wheel      a wheel built from a clean copy of the sources (the "< 60 s from a clean clone" target)
#
# What comes back ($OUT holds at most 8 files): summary.md (printed last) and logs.tgz (every log and JSON,
# re-packed after each part, so a run cut short still returns what it has).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/ul_fast_gpu_check}
LOGS=$(mktemp -d)/logs
mkdir -p "$OUT" "$LOGS"
summary="$OUT/summary.md"
: > "$summary"
export PYTHONUNBUFFERED=1
PARTS=${PARTS:-"build train paper profile"}
want() { case " $PARTS " in *" $1 "*) return 0;; *) return 1;; esac; }
note() { echo "$*" >> "$summary"; echo "[gpu_check $(date -u +%H:%M:%S)] $*" >&2; }
pack() { tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs 2>/dev/null; }
budget() { local var="BUDGET_$1"; echo "${!var:-$2}"; }
# run_part NAME DEFAULT_SECONDS COMMAND...: run under `timeout`, log to $LOGS/NAME.log, note rc and seconds.
run_part() {
  local name=$1 limit; limit=$(budget "$1" "$2"); shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local verdict="rc=$rc"
  [ "$rc" = 124 ] && verdict="TIMED OUT after ${limit}s"
  note "- $name: $verdict, $((SECONDS - t0)) s"
  pack
  return "$rc"
}

note "## ul_fast GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
note "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -1)"
note "- software: $($PY -c 'import sys, torch, triton; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")' 2>&1 | tail -1), $(nvcc --version 2>/dev/null | tail -1)"

if want build; then
  if ! run_part build 240 "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    note "BUILD FAILED: last lines of build.log follow"; tail -40 "$LOGS/build.log"; cat "$summary"; exit 1
  fi
  $PY -c "import json, ul_fast; print(json.dumps(ul_fast.build_info(), indent=1, default=str))" \
    > "$LOGS/build_info.json" 2>&1
  note "- build_info: $($PY -c "import ul_fast; i = ul_fast.build_info(); print({k: i.get(k) for k in ('extension', 'cuda', 'cuda_archs', 'cuda_available')})" 2>&1 | tail -1)"
  pack
fi

if want train; then
  run_part train 330 "$PY" benchmarks/gpu_bench_train_step.py --config fmnist --batch 256 --phases table \
    --compile-stages "${TRAIN_COMPILE_STAGES:-1,2}" --out "$LOGS/train"
fi

if want paper; then
  run_part paper 240 "$PY" benchmarks/gpu_bench_train_step.py --phases paper --rounds 2 --steps 5 --warmup 3 \
    --out "$LOGS/paper"
fi

if want profile; then
  run_part profile 100 "$PY" benchmarks/profile_train_step.py --config fmnist --batch 256 --steps 10 \
    --out "$LOGS/profile"
fi

if want tests; then
  xdist=()
  $PY -c "import xdist" 2>/dev/null && xdist=(-n 16)  # the time is Triton autotuning (compiles): CPU-bound
  run_part tests 240 "$PY" -m pytest -m gpu tests/ -q -rfE -p no:cacheprovider --continue-on-collection-errors \
    "${xdist[@]}" --junitxml="$LOGS/pytest_gpu.xml"
  note "- pytest -m gpu: $(grep -E '[0-9]+ (passed|failed|error|skipped)' "$LOGS/tests.log" | tail -1)"
  # CPU checks that need packages this project cannot install beside its torch (torchvision, pytorch-fid):
  # the device run carries pytorch-fid's wheel in .whl/ and installs it first with
  #   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  if $PY -c "import pytorch_fid, torchvision" 2>/dev/null; then
    run_part inception 60 "$PY" -m pytest tests/test_inception.py -q -p no:cacheprovider -rs
    note "- pytest tests/test_inception.py (pytorch-fid $($PY -c 'import importlib.metadata as m; print(m.version("pytorch-fid"))')): $(tail -1 "$LOGS/inception.log")"
  fi
fi

if want ops; then
  run_part ops 100 "$PY" benchmarks/gpu_bench_ops.py --out "$LOGS/bench_ops.json" --md "$LOGS/bench_ops.md"
fi

if want ablation; then
  run_part ablation 150 "$PY" benchmarks/gpu_bench_train_step.py --config fmnist --batch 256 --phases ablation \
    --rounds 3 --steps 10 --out "$LOGS/ablation"
fi

if want sampling; then
  run_part sampling 60 "$PY" benchmarks/gpu_bench_sampling.py --config fmnist --n 16,256 --steps 32 --out "$LOGS"
fi

if want attention; then
  run_part attention 150 "$PY" benchmarks/gpu_bench_attention.py --out "$LOGS"
fi

if want wheel; then
  clean=$(mktemp -d)
  cp -r csrc ul_fast setup.py pyproject.toml MANIFEST.in README.md "$clean"/ 2>/dev/null
  find "$clean" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} + 2>/dev/null
  run_part wheel 180 "$PY" -m pip wheel --no-build-isolation --no-deps -q -w "$clean/wheels" "$clean"
  rm -rf "$clean"
fi

# The short table, last: failures first, then each benchmark's table.
echo
if want tests; then grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -25; fi
if want ops && [ -f "$LOGS/bench_ops.md" ]; then cat "$LOGS/bench_ops.md" >> "$summary"; fi
if want attention; then grep -E "^\|" "$LOGS/attention.log" | head -30 >> "$summary"; fi
for part in train paper ablation; do
  if want $part; then grep -E '^(## UL training step|\| |paper config)' "$LOGS/$part.log" >> "$summary"; fi
done
if want profile; then grep -A 20 "^## Where the step" "$LOGS/profile.log" >> "$summary"; fi
if want sampling; then grep -A 8 "^## Sampling" "$LOGS/sampling.log" >> "$summary"; fi
pack
cat "$summary"
