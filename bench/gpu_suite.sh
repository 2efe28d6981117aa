#!/usr/bin/env bash
# The one command to run on a GPU machine (sized for one H200, bare: torch, triton, torchvision,
# timm, pytest, pytest-benchmark; no torch-pruning, no network), from the repository root:
#
#     bash bench/gpu_suite.sh            # everything, at most ~8 minutes
#     bash bench/gpu_suite.sh --smoke    # the same phases on CPU at tiny sizes (what CI runs)
#
# Phases, each under its own time limit (a slow phase cannot eat the others' time):
#   install    pip-installs lopfast from this checkout (editable, no deps, no network), and
#              torch-pruning from ./wheels/*.whl when present (else the tests that need it skip);
#              fill that git-ignored folder on a machine with network:
#                  pip download torch-pruning --no-deps -d wheels
#              (the device tool then needs `carry: ["wheels"]`)
#   build      compiles the CUDA extension (csrc/) for this GPU's architecture
#   selfcheck  lopfast selfcheck: every backend of every op against float64 -> selfcheck.json
#   tests      the kernel and dispatch tests, and every test marked gpu, on this GPU
#   bench      every benchmark at the issues' sizes (the issue-10 table first, the torch.compile
#              variants last) -> table-*.json, collapse-*.json, sp_loss-*.json, expanded_conv-*.json
#
# Output: $OUT when set, else ./gpu-results: suite.log (everything printed), suite.json (phases,
# machine, the dispatch's measured choices) and the JSON files above: 7 files at most.
# Exit status: non-zero when a phase failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (use --smoke or nothing)" >&2; exit 2 ;;
    esac
done

OUT_DIR="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
WORK="$(mktemp -d)"
PHASES="$WORK/phases.tsv"
: > "$PHASES"
START=$(date +%s)
# Total budget: 8 minutes on the GPU, minus a margin for the summary; the phases before the
# benchmarks leave them at least BENCH_RESERVE seconds
TOTAL=${LOPFAST_SUITE_SECONDS:-465}
BENCH_RESERVE=${LOPFAST_SUITE_BENCH_RESERVE:-180}

# The python that has torch (python3 on the GPU image; the venv's python in CI)
PY=""
for cand in ${PYTHON:-} python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import torch" >/dev/null 2>&1; then PY="$cand"; break; fi
done
if [ -z "$PY" ]; then echo "gpu_suite.sh: no python with torch found" | tee -a "$LOG"; exit 1; fi

HAS_CUDA=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$SMOKE" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
    echo "gpu_suite.sh: no CUDA device here; use --smoke for the CPU run" | tee -a "$LOG"; exit 1
fi

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# the dispatch starts from nothing, as on a user's first run; its cache ends up in suite.json
export XDG_CACHE_HOME="$WORK/cache"
export LOPFAST_BENCH_OUT="$OUT_DIR"
if [ "$SMOKE" = 1 ]; then
    export LOPFAST_BENCH_SIZE=tiny OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
else
    export LOPFAST_BENCH_SIZE=full LOPFAST_BENCH_ROUNDS=${LOPFAST_BENCH_ROUNDS:-5}
    export TORCH_CUDA_ARCH_LIST
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
fi

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# phase NAME CAP_SECONDS COMMAND...: runs COMMAND with a time limit of min(CAP, what is left)
phase() {
    local name="$1" cap="$2"; shift 2
    local reserve=$BENCH_RESERVE
    [ "$name" = bench ] && reserve=0
    local left=$(( TOTAL - reserve - ( $(date +%s) - START ) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 5 ]; then
        log "== $name: skipped, no time left"
        printf '%s\t%s\t%s\t%s\n' "$name" "no time left" 0 "$cap" >> "$PHASES"
        return
    fi
    local cmd="$*"
    [ ${#cmd} -gt 300 ] && cmd="${cmd:0:300}..."
    log "== $name (limit ${limit}s): $cmd"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    local status="ok"
    if [ $rc = 124 ] || [ $rc = 137 ]; then status="timed out"; elif [ $rc != 0 ]; then status="failed (exit $rc)"; fi
    log "== $name: $status in $(( $(date +%s) - t0 ))s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" >> "$PHASES"
}

skip_phase() {
    log "== $1: skipped ($2)"
    printf '%s\t%s\t%s\t%s\n' "$1" "skipped: $2" 0 0 >> "$PHASES"
}

log "lopfast GPU suite$([ "$SMOKE" = 1 ] && echo ' (smoke, CPU)') in $PWD, output $OUT_DIR, python $(command -v "$PY")"
"$PY" - >> "$LOG" 2>&1 <<'EOF'
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs", f"sm_{p.major}{p.minor}")
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >> "$LOG" 2>&1

# ---------------------------------------------------------------------------- install
install() {
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . || return 1
    if "$PY" -c "import torch_pruning" >/dev/null 2>&1; then
        echo "torch-pruning already installed"
    elif ls wheels/*.whl >/dev/null 2>&1 || ls ../wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-index $(ls wheels/*.whl ../wheels/*.whl 2>/dev/null) || return 1
    else
        echo "no torch-pruning and no wheels/*.whl: the tests that need it skip"
    fi
    "$PY" -c "import lopfast, triton; print('lopfast', lopfast.__version__, 'from', lopfast.__file__, '| triton', triton.__version__)"
}
phase install 60 bash -c "$(declare -f install); PY='$PY' install"

# ---------------------------------------------------------------------------- build
if [ "$HAS_CUDA" = 1 ]; then
    phase build 150 "$PY" -c "
import time, lopfast.backend as b
t = time.time()
ext = b.cuda_extension()
assert ext is not None, 'the CUDA extension did not build (see the warning above)'
print('CUDA extension', ext.__name__, 'ready in', round(time.time() - t, 1), 's')"
else
    skip_phase build "no CUDA device"
fi

# ---------------------------------------------------------------------------- selfcheck
phase selfcheck 100 "$PY" -m lopfast.cli selfcheck --json "$OUT_DIR/selfcheck.json"

# ---------------------------------------------------------------------------- tests
KERNEL_TESTS=""
for f in tests/test_collapse.py tests/test_collapse_gemm.py tests/test_sp_loss.py tests/test_cuda_ext.py \
         tests/test_dispatch.py; do
    [ -f "$f" ] && KERNEL_TESTS="$KERNEL_TESTS $f"
done
IGNORES=""
for f in $KERNEL_TESTS; do IGNORES="$IGNORES --ignore=$f"; done
if [ "$SMOKE" = 1 ]; then
    # CPU: the kernel tests run in CI's main pytest already; here only what the GPU run selects
    phase tests 120 bash -c "'$PY' -m pytest -q -p no:cacheprovider tests/test_dispatch.py && \
        '$PY' -m pytest -q -p no:cacheprovider tests -m gpu $IGNORES; rc=\$?; [ \$rc = 5 ] && rc=0; exit \$rc"
else
    phase tests 120 bash -c "'$PY' -m pytest -q -p no:cacheprovider -m 'not slow' $KERNEL_TESTS; r1=\$?; \
        '$PY' -m pytest -q -p no:cacheprovider tests -m gpu $IGNORES; r2=\$?; [ \$r2 = 5 ] && r2=0; \
        exit \$(( r1 > r2 ? r1 : r2 ))"
fi

# ---------------------------------------------------------------------------- benchmarks
if [ "$SMOKE" = 1 ]; then
    phase bench 150 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-disable
else
    phase bench 600 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-only
fi

# ---------------------------------------------------------------------------- summary
"$PY" - "$PHASES" "$OUT_DIR" "$SMOKE" "$START" <<'EOF' 2>&1 | tee -a "$LOG"
import json, os, sys, time
from pathlib import Path

phases_file, out, smoke, start = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
phases = []
for line in Path(phases_file).read_text().splitlines():
    name, status, seconds, limit = line.split("\t")
    phases.append(dict(phase=name, status=status, seconds=int(seconds), limit=int(limit)))
doc = dict(smoke=smoke, seconds=round(time.time() - start), phases=phases)
try:
    import torch
    doc["machine"] = dict(torch=torch.__version__, cuda=torch.version.cuda,
                          gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
except Exception as exc:
    doc["machine"] = str(exc)
cache = Path(os.environ["XDG_CACHE_HOME"]) / "lopfast" / "dispatch.json"
doc["dispatch"] = json.loads(cache.read_text())["entries"] if cache.exists() else {}
(out / "suite.json").write_text(json.dumps(doc, indent=1))

print("\nphase       status            seconds  limit")
for p in phases:
    print(f"{p['phase']:<11} {p['status']:<17} {p['seconds']:>7} {p['limit']:>6}")
sc = out / "selfcheck.json"
if sc.exists():
    rows = json.loads(sc.read_text())["rows"]
    fails = [r for r in rows if r["status"] == "FAIL"]
    print(f"selfcheck: {sum(r['status'] == 'pass' for r in rows)} passed, {len(fails)} failed, "
          f"{sum(r['status'] == 'skip' for r in rows)} skipped")
    for r in fails:
        print(f"  FAIL {r['op']} {r['backend']} {r['dtype']} {r['direction']}: error {r['error']} budget {r['budget']} {r['note']}")
for table in sorted(out.glob("table-*.json")):
    measures = json.loads(table.read_text())["measures"]
    print(f"{table.name}:")
    for name, m in measures.items():
        ratios = ", ".join(f"{k}={v:.2f}" for k, v in m["ratios"].items() if v is not None)
        times = ", ".join(f"{k}={1e3 * r['s']:.3f}ms" if r.get("s") else f"{k}={r.get('status')}"
                          for k, r in m["variants"].items())
        print(f"  {name}: {ratios}\n      {times}")
for name, e in doc["dispatch"].items():
    print(f"dispatch {name.split(' | ')[2]} -> {e['choice']} {e['times_ms']} rejected={list(e['rejected'])}")
files = sorted(p.name for p in out.iterdir() if p.is_file())
print(f"{len(files)} files in {out}: {' '.join(files)}")
EOF
FAILED=$(awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/ {print $1}' "$PHASES" | tr '\n' ' ')
rm -rf "$WORK"
log "done in $(( $(date +%s) - START ))s${FAILED:+; not ok: $FAILED}"
[ -z "$FAILED" ]
