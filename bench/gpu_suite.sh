#!/usr/bin/env bash
# The one command to run on a GPU machine (sized for one H200, bare: torch, triton, torchvision,
# timm, pytest, pytest-benchmark, pytest-xdist; no torch-pruning, no network), from the repository
# root:
#
#     bash bench/gpu_suite.sh            # every phase, at most 8 minutes in all
#     bash bench/gpu_suite.sh --smoke    # the same phases on CPU at tiny sizes (what CI runs)
#
# Phases, in order, each under a time limit (a slow phase cannot eat the others' time):
#   install    pip-installs lopfast from this checkout (editable, no deps, no network), and
#              torch-pruning from ./wheels/*.whl when present (else the tests that need it skip);
#              fill that git-ignored folder on a machine with network:
#                  pip download torch-pruning --no-deps -d wheels
#              (the device tool then needs `carry: ["wheels"]`)
#   build      compiles the CUDA extension (csrc/) for this GPU's architecture (the tests and the
#              benchmarks load it from the same cache)
#   selfcheck  lopfast selfcheck: every backend of every op against float64, the SPDistiller
#              steps of ResNet-56 / MobileNetV2 / ResNet-50 included -> selfcheck.json
#   tests      TEST_FILES below and every test marked gpu, in parallel (pytest -n 8 when
#              pytest-xdist is installed, else one process with a note)
#   bench      BENCHES below, in order (the issue tables first), each a pytest run; past the
#              budget's deadline the benchmarks not yet started skip, each listed with the reason
#
# Output: $OUT when set, else ./gpu-results: suite.log (everything printed), suite.json (phases,
# what was skipped and why, machine, the dispatch's measured choices) and the result files of
# the phases (selfcheck.json, table-*.json, sp_loss-*.json, collapse-*.json, expanded_conv-*.json,
# prune_latency-gpu.json).
# Exit status: non-zero when a phase failed or ran out of time. Skips never fail the suite; the
# summary lists every one with its reason.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument $arg (use --smoke or nothing)" >&2; exit 2 ;;
    esac
done

# ---------------------------------------------------------------------------- what runs
# Test files run whole on the GPU (the kernel, op, dispatch and distillation tests: device-aware,
# their requires_cuda cases, bf16 and the device-side table included); the rest of tests/ runs
# its `-m gpu` tests. The distiller configurations' GPU test is deselected: the selfcheck phase
# runs the same check (lopfast.selfcheck.check_distill) on the same three networks.
TEST_FILES="tests/test_collapse.py tests/test_collapse_graph.py tests/test_sp_loss.py tests/test_sp_table.py
            tests/test_sp_dispatch.py tests/test_cuda_ext.py tests/test_dispatch.py tests/test_distill.py"
TEST_DESELECT="tests/test_sp_dispatch.py::test_gpu_distiller_configurations"
# Benchmarks, in order: "name|seconds it needs on one H200|pytest arguments" (the seconds are
# documentation: the time budget is enforced by LOPFAST_BENCH_DEADLINE, past which every
# benchmark not yet started skips with the reason, and the summary lists it). The issue tables
# first. Other issues plug in here: a row per selection (issue 17's captured training step in
# bench_table.py, or a file of its own; issue 19's pruning latency), placed by priority.
BENCHES=(
    "table|150|bench/bench_table.py"
    "sp_loss|60|bench/bench_sp_loss.py -k resnet56 or host_work"
    "collapse|60|bench/bench_collapse.py"
    "expanded_conv|50|bench/bench_expanded_conv.py"
    "prune_latency|90|bench/bench_prune_latency.py -k resnet56"
)
if [ "$SMOKE" = 1 ]; then
    BENCHES=("all|150|bench")
fi

OUT_DIR="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/suite.log"
: > "$LOG"
WORK="$(mktemp -d)"
PHASES="$WORK/phases.tsv"
SKIPS="$WORK/skips.tsv"
: > "$PHASES"
: > "$SKIPS"
START=$(date +%s)
# Total budget: 8 minutes on the GPU, minus a margin for the summary; the phases before the
# benchmarks leave them at least BENCH_RESERVE seconds
TOTAL=${LOPFAST_SUITE_SECONDS:-470}
BENCH_RESERVE=${LOPFAST_SUITE_BENCH_RESERVE:-150}

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
    # 3 rounds: the medians of these GPU benchmarks move by a few percent between rounds; the
    # ratios the issues track are many-fold (override with LOPFAST_BENCH_ROUNDS)
    export LOPFAST_BENCH_SIZE=full LOPFAST_BENCH_ROUNDS=${LOPFAST_BENCH_ROUNDS:-3}
    # issue 19's pruned-model latency (the CIFAR ResNet-56 rows: BENCHMARKS.md's GPU column); the
    # ImageNet nets take ~6 min: LOPFAST_BENCH_PRUNE=1 pytest bench/bench_prune_latency.py --benchmark-only
    export LOPFAST_BENCH_PRUNE=1
    export TORCH_CUDA_ARCH_LIST
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
fi

log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
note_skip() { printf '%s\t%s\n' "$1" "$2" >> "$SKIPS"; log "-- skipped $1: $2"; }

# run_limited NAME CAP RESERVE COMMAND...: COMMAND with a time limit of min(CAP, time left - RESERVE);
# records NAME's status in the phase table (returns 3 when there was no time left to start it)
run_limited() {
    local name="$1" cap="$2" reserve="$3"; shift 3
    local left=$(( TOTAL - reserve - ( $(date +%s) - START ) ))
    local limit=$(( cap < left ? cap : left ))
    if [ "$limit" -lt 10 ]; then
        note_skip "$name" "no time left (${left}s of the ${TOTAL}s budget)"
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped: no time left" 0 "$cap" >> "$PHASES"
        return 3
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

phase() { local name="$1" cap="$2"; shift 2; run_limited "$name" "$cap" "$BENCH_RESERVE" "$@"; }

skip_phase() {
    note_skip "$1" "$2"
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
"$PY" -c "import torch_pruning" >/dev/null 2>&1 || note_skip "torch-pruning tests" "torch-pruning is not installed (put its wheel in wheels/)"

# ---------------------------------------------------------------------------- build
if [ "$HAS_CUDA" = 1 ]; then
    phase build 120 "$PY" -c "
import time, lopfast.backend as b
t = time.time()
ext = b.cuda_extension()
assert ext is not None, 'the CUDA extension did not build (see the warning above)'
print('CUDA extension', ext.__name__, 'ready in', round(time.time() - t, 1), 's')"
else
    skip_phase build "no CUDA device"
fi

# ---------------------------------------------------------------------------- selfcheck
if [ "$SMOKE" = 1 ]; then
    phase selfcheck 120 "$PY" -m lopfast.cli selfcheck --json "$OUT_DIR/selfcheck.json"
else
    phase selfcheck 170 "$PY" -m lopfast.cli selfcheck --json "$OUT_DIR/selfcheck.json"
fi

# ---------------------------------------------------------------------------- tests
PAR=""
if [ "$SMOKE" = 0 ]; then
    if "$PY" -c "import xdist" >/dev/null 2>&1; then
        PAR="-n ${LOPFAST_SUITE_WORKERS:-8}"
    else
        note_skip "parallel tests" "pytest-xdist is not installed: the tests run in one process (pip install pytest-xdist)"
    fi
    note_skip "$TEST_DESELECT" "the selfcheck phase runs the same check (lopfast.selfcheck.check_distill) on the same networks"
fi
EXISTING=""
for f in $TEST_FILES; do
    if [ -f "$f" ]; then EXISTING="$EXISTING $f"; else note_skip "$f" "no such file in this checkout"; fi
done
IGNORES=""
for f in $EXISTING; do IGNORES="$IGNORES --ignore=$f"; done
PYTEST="'$PY' -m pytest -q -rs -p no:cacheprovider"
if [ "$SMOKE" = 1 ]; then
    # CPU: the kernel tests run in CI's main pytest already; here only what the GPU run selects
    phase tests 150 bash -c "$PYTEST tests/test_dispatch.py && \
        $PYTEST tests -m gpu $IGNORES; rc=\$?; [ \$rc = 5 ] && rc=0; exit \$rc"
else
    phase tests 170 bash -c "$PYTEST $PAR -m 'not slow' --deselect $TEST_DESELECT $EXISTING; r1=\$?; \
        $PYTEST $PAR tests -m gpu $IGNORES; r2=\$?; [ \$r2 = 5 ] && r2=0; \
        exit \$(( r1 > r2 ? r1 : r2 ))"
fi

# ---------------------------------------------------------------------------- benchmarks
BENCH_MODE="--benchmark-only"
[ "$SMOKE" = 1 ] && BENCH_MODE="--benchmark-disable"
# past this moment a benchmark that has not started skips (bench/conftest.py): the longest single
# measurement (a torch.compile variant) still ends inside the budget, and the phase never runs out
export LOPFAST_BENCH_DEADLINE=$(( START + TOTAL - ${LOPFAST_SUITE_BENCH_MARGIN:-45} ))
for entry in "${BENCHES[@]}"; do
    IFS='|' read -r bname bcap bargs <<< "$entry"
    if [[ "$bargs" == *" -k "* ]]; then
        sel=(${bargs%% -k *} -k "${bargs#* -k }")
    else
        sel=($bargs)
    fi
    # the hard limit is what is left of the budget (the deadline above ends the run before it)
    run_limited "bench:$bname" $(( TOTAL )) 0 "$PY" -m pytest "${sel[@]}" -q -rs -p no:cacheprovider $BENCH_MODE
done

# ---------------------------------------------------------------------------- summary
"$PY" - "$PHASES" "$SKIPS" "$OUT_DIR" "$SMOKE" "$START" "$LOG" <<'EOF' 2>&1 | tee -a "$LOG"
import collections, json, os, re, sys, time
from pathlib import Path

phases_file, skips_file, out, smoke, start, log = (sys.argv[1], sys.argv[2], Path(sys.argv[3]),
                                                    sys.argv[4] == "1", int(sys.argv[5]), Path(sys.argv[6]))
phases = []
for line in Path(phases_file).read_text().splitlines():
    name, status, seconds, limit = line.split("\t")
    phases.append(dict(phase=name, status=status, seconds=int(seconds), limit=int(limit)))
skipped = [dict(what=w, why=y) for w, y in (l.split("\t", 1) for l in Path(skips_file).read_text().splitlines())]
# pytest's own skips (-rs lines), by reason
reasons = collections.Counter()
for line in log.read_text(errors="replace").splitlines():
    m = re.match(r"SKIPPED \[(\d+)\] [^:]+(?::\d+)?: (.*)", line)
    if m:
        reasons[m.group(2).strip()] += int(m.group(1))
doc = dict(smoke=smoke, seconds=round(time.time() - start), phases=phases, skipped=skipped,
           skipped_tests=[dict(reason=r, count=n) for r, n in reasons.most_common()])
try:
    import torch
    doc["machine"] = dict(torch=torch.__version__, cuda=torch.version.cuda,
                          gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
except Exception as exc:
    doc["machine"] = str(exc)
cache = Path(os.environ["XDG_CACHE_HOME"]) / "lopfast" / "dispatch.json"
doc["dispatch"] = json.loads(cache.read_text())["entries"] if cache.exists() else {}
(out / "suite.json").write_text(json.dumps(doc, indent=1))

print("\nphase              status            seconds  limit")
for p in phases:
    print(f"{p['phase']:<18} {p['status']:<17} {p['seconds']:>7} {p['limit']:>6}")
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
for sp in sorted(out.glob("sp_loss-*.json")):
    d = json.loads(sp.read_text())
    print(f"{sp.name}:")
    if d.get("issue17_sp_over_one_read"):
        print("  SP loss / one read (issue 17, target <= 1.5): "
              + ", ".join(f"{k} {v:.1f}x" for k, v in d["issue17_sp_over_one_read"].items()))
    for h in d.get("host_work", []):
        print(f"  host work {h['variant']}: {h['host_us']:.0f} us, {h['launches']} launches per call")
other = collections.Counter()
for name, e in doc["dispatch"].items():
    parts = name.split(" | ")
    if "choice" not in e or len(parts) < 3:
        # entries of other kinds share the cache (pruning's per-layer latency tables): counted, not listed
        other[parts[2] if len(parts) > 2 else name] += 1
        continue
    rej = "; ".join(f"{k}: {v}" for k, v in (e.get("rejected") or {}).items())
    print(f"dispatch {parts[2]} -> {e['choice']} {e.get('times_ms', '')}" + (f" rejected: {rej}" if rej else ""))
for what, n in other.items():
    print(f"dispatch cache: {n} {what} entries")
print("skipped (suite):")
for s in skipped:
    print(f"  {s['what']}: {s['why']}")
if reasons:
    print("skipped tests, by reason:")
    for r, n in reasons.most_common():
        print(f"  {n:>4}  {r}")
files = sorted(p.name for p in out.iterdir() if p.is_file())
print(f"{len(files)} files in {out}: {' '.join(files)}")
EOF
FAILED=$(awk -F'\t' '$2 != "ok" && $2 !~ /^skipped/ {print $1}' "$PHASES" | tr '\n' ' ')
rm -rf "$WORK"
log "done in $(( $(date +%s) - START ))s${FAILED:+; not ok: $FAILED}"
[ -z "$FAILED" ]
