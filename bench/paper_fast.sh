#!/usr/bin/env bash
# The paper's comparison on one GPU in one command: `lopfast reproduce table1` and `fig3` in the
# fast budget (lopfast.pipeline.experiments.FAST), both at once on the one GPU, each under a time
# limit, from the repository root:
#
#     bash bench/paper_fast.sh DATA             # DATA: cifar10-jpeg.tar.gz or its extracted folder
#     bash bench/paper_fast.sh DATA --state S   # resume from the state.tar of an earlier run
#     bash bench/paper_fast.sh --smoke          # the same on CPU with the digits stand-in (CI)
#
# Options: --seeds N (3), --parallel N (processes per experiment, 6), --total SECONDS (whole
# script, 310: its share of one lent GPU, see below), --state FILE, --device DEV (e.g. cpu: the
# real budget without a GPU, hours; with a small --total it checks the plumbing).
#
# Cold start, paid once: a warm-up compiles the Triton variants of the training dtypes in 12
# processes at once (bench/precompile.py, while the JPEGs decode) into the cache every worker then
# reads; the workers' measured dispatch shares one cache file, written under a lock, and a worker
# that needs a key another is measuring waits and reads its result (lopfast.dispatch): each choice
# is timed once, by one process, on a quiet GPU. Both caches live in $LOPFAST_GPU_CACHE (default
# /tmp/lopfast-gpu-cache), shared with bench/gpu_proof.sh: run after it on the same machine, nothing
# is compiled or measured again.
#
# Time budget: 310 s of one lent GPU's 15 minutes (bench/gpu_proof.sh's header has the table: a
# machine start 120 s + gpu_proof 290 s + this 310 s + transfers and idle 45 s = 765 s, two minutes
# to spare). Within it: install and the warm-up ~50 s, the experiments until the time limit, 25 s to
# write the outputs. The tables complete only if the cells fit; a run stopped at its limit (exit 3)
# leaves state.tar, and --state resumes it on the next machine (teachers and finished cells kept).
#
# The GPU image has no network and no torch-pruning: the script pip-installs this checkout
# (editable, no deps) and torch-pruning from ./wheels/*.whl (fill it on a machine with network:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels torch-pruning==1.6.1
# and carry it: `carry: ["wheels", ...]`).
#
# Output, in $OUT when set, else ./paper-fast-results (7 files):
#   results.csv    one row per cell and seed, both experiments
#   results.md     both tables (mean ± std beside the paper, lop − ft paired by seed), recipe,
#                  teachers, time taken, what did not finish
#   table1.png, fig3.png   accuracy against % removed
#   machine.json   the machine, versions, each experiment's exit status and seconds
#   run.log        everything printed (per-task progress with ETA, per-epoch lines of a --smoke run)
#   state.tar      teachers (float16, checked on load) + finished cells + pruned models: give it
#                  back with --state on the next machine and only what is missing runs
# Exit status: 0 when both tables are complete, 3 when one stopped at its time limit, 1 on errors.
set -uo pipefail
HERE="$PWD"
cd "$(dirname "$0")/.."

SMOKE=0; DATA=""; STATE=""; SEEDS=3; PARALLEL=6; TOTAL=310; DEV=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --state) STATE="${2:-}"; shift ;;
        --seeds) SEEDS="${2:-}"; shift ;;
        --parallel) PARALLEL="${2:-}"; shift ;;
        --total) TOTAL="${2:-}"; shift ;;
        --device) DEV="${2:-}"; shift ;;
        -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
        -*) echo "paper_fast.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) [ -z "$DATA" ] || { echo "paper_fast.sh: one DATA path only, got '$DATA' and '$1'" >&2; exit 2; }
           DATA="$1" ;;
    esac
    shift
done
for v in SEEDS PARALLEL TOTAL; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "paper_fast.sh: --$(echo $v | tr A-Z a-z) must be a positive integer, got '${!v}'" >&2; exit 2; }
done
if [ "$SMOKE" = 0 ] && [ -z "$DATA" ]; then
    echo "paper_fast.sh: give the CIFAR-10 copy: bash bench/paper_fast.sh path/to/cifar10-jpeg.tar.gz (or its folder), or --smoke" >&2
    exit 2
fi
# paths given relative to where the script was started
[ -n "$DATA" ] && [[ "$DATA" != /* ]] && DATA="$HERE/$DATA"
[ -n "$STATE" ] && [[ "$STATE" != /* ]] && STATE="$HERE/$STATE"
if [ -n "$DATA" ] && [ ! -e "$DATA" ]; then echo "paper_fast.sh: DATA '$DATA' does not exist" >&2; exit 2; fi
if [ -n "$STATE" ] && [ ! -f "$STATE" ]; then echo "paper_fast.sh: --state file '$STATE' does not exist" >&2; exit 2; fi

START=$(date +%s)
OUT_DIR="${OUT:-$PWD/paper-fast-results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/run.log"
: > "$LOG"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RUNS="$WORK/runs"
mkdir -p "$RUNS"
log() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# one compile cache and one dispatch cache for every process (and for bench/gpu_proof.sh's)
CACHE="${LOPFAST_GPU_CACHE:-/tmp/lopfast-gpu-cache}"
[ "$SMOKE" = 1 ] && CACHE="$WORK/cache"
export TRITON_CACHE_DIR="$CACHE/triton" LOPFAST_CACHE_DIR="$CACHE/lopfast" TORCHINDUCTOR_CACHE_DIR="$CACHE/inductor"
mkdir -p "$TRITON_CACHE_DIR" "$LOPFAST_CACHE_DIR"
export LOPFAST_JIT_CUDA=0  # the CUDA C++ extension is not a training backend: never built on the way

PY=""
for cand in ${PYTHON:-} python python3; do
    command -v "$cand" >/dev/null 2>&1 && PY="$cand" && break
done
[ -n "$PY" ] || { log "no python found"; exit 1; }
# one interpreter start for every check (each import of torch costs seconds)
PROBE=$("$PY" -c '
import importlib.util, platform
try:
    import torch
except ImportError:
    print("torch=0"); raise SystemExit
cuda = torch.cuda.is_available()
def found(m):  # from the repository root lopfast/ is importable uninstalled, its kernels/ only installed
    try:
        return int(importlib.util.find_spec(m) is not None)
    except Exception:
        return 0
have = [found(m) for m in ("lopfast.kernels", "torch_pruning")]
print("torch=1 cuda=%d lopfast=%d tp=%d" % (cuda, *have))
print("# torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
if cuda:
    p = torch.cuda.get_device_properties(0)
    print("# gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
')
echo "$PROBE" | grep '^#' >> "$LOG"
has() { echo "$PROBE" | head -1 | grep -q "$1=1"; }
has torch || { log "$PY has no torch"; exit 1; }
if [ "$SMOKE" = 0 ] && [ -z "$DEV" ] && ! has cuda; then
    log "no CUDA device here; use --smoke for the CPU run (or --device cpu for the real budget, slowly)"; exit 1
fi

# ---------------------------------------------------------------------------- install (no network)
if ! has lopfast; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >> "$LOG" 2>&1 || { log "installing lopfast failed"; exit 1; }
fi
if ! has tp; then
    if ls wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-deps --no-index wheels/*.whl >> "$LOG" 2>&1 || { log "installing wheels/*.whl failed"; exit 1; }
    else
        log "torch-pruning is missing and there is no wheels/*.whl: the experiments prune with it (see --help)"; exit 1
    fi
fi

# ---------------------------------------------------------------------------- data
if [ "$SMOKE" = 1 ]; then
    BUDGET=fast-smoke; DATA_ARGS=(); DEVICE=(--device cpu)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    # a 2-core CI box, well under a minute: one seed, each experiment in its own process (no worker
    # processes to start; tests/test_tasks.py covers the workers and the time limit)
    [ "$PARALLEL" = 6 ] && PARALLEL=1
    [ "$SEEDS" = 3 ] && SEEDS=1
else
    BUDGET=fast; DEVICE=(); [ -n "$DEV" ] && DEVICE=(--device "$DEV")
    # decode the JPEGs once into CIFAR's python-pickle layout: every worker process then reads
    # 180 MB of arrays instead of decoding 60,000 files (lopfast's loader reads either layout). An
    # archive is read in place: no 60,000 files to write, and none to delete at the end
    # the warm-up compiles while the JPEGs decode (12 + 16 processes and threads on 16 cores: the
    # decode is short, the compiles are what a cold worker would wait for)
    "$PY" bench/precompile.py > "$WORK/precompile.log" 2>&1 &
    WARM=$!
    "$PY" bench/cifar_jpeg.py "$DATA" "$WORK/cifar10/cifar-10-batches-py" >> "$LOG" 2>&1 \
        || { log "reading the CIFAR-10 copy $DATA failed (see run.log)"; exit 1; }
    DATA_ARGS=(--data-dir "$WORK/cifar10")
    log "$(tail -1 "$LOG")"
    wait "$WARM" || log "warm-up: some variants did not compile (the workers compile what they need)"
    cat "$WORK/precompile.log" >> "$LOG"
    log "warm-up: $(tail -1 "$WORK/precompile.log")"
fi
if [ -n "$STATE" ]; then
    tar -xf "$STATE" -C "$RUNS" || { log "could not read --state $STATE"; exit 1; }
    log "resumed from $STATE: $(find "$RUNS" -name result.json | wc -l) finished cells, $(find "$RUNS" -name teacher.pt | wc -l) teachers"
fi

# ---------------------------------------------------------------------------- the two experiments, at once
PACK=25  # seconds kept for writing the outputs
LIMIT=$(( TOTAL - PACK - ( $(date +%s) - START ) ))
[ "$LIMIT" -ge 30 ] || { log "no time left for the experiments (--total $TOTAL)"; exit 1; }
TL_ARGS=(--time-limit "$LIMIT")
[ "$SMOKE" = 1 ] && [ "$PARALLEL" = 1 ] && TL_ARGS=()  # in-process; the outer timeout still bounds it
log "lopfast paper_fast ($BUDGET): table1 and fig3 at once, $SEEDS seeds, --parallel $PARALLEL each$([ ${#TL_ARGS[@]} -gt 0 ] && echo ", time limit ${LIMIT}s each"); python $(command -v "$PY")"
run_exp() {  # run_exp NAME: lopfast reproduce NAME, its output into the log with a prefix
    local name="$1" t0=$(date +%s)
    timeout -k 15 $(( LIMIT + 30 )) "$PY" -m lopfast.cli reproduce "$name" --budget "$BUDGET" --seeds "$SEEDS" \
        --parallel "$PARALLEL" "${TL_ARGS[@]}" --out "$RUNS" "${DATA_ARGS[@]}" "${DEVICE[@]}" 2>&1 \
        | sed -u "s/^/[$name] /" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}  # reproduce's: 0 complete, 3 time limit, 1 failed tasks, 2 bad input
    echo "$rc $(( $(date +%s) - t0 ))" > "$WORK/$name.status"
}
run_exp table1 &
P1=$!
run_exp fig3 &
P2=$!
wait "$P1" "$P2"

# ---------------------------------------------------------------------------- outputs
"$PY" - "$RUNS" "$OUT_DIR" "$WORK" "$BUDGET" "$START" "$SEEDS" "$PARALLEL" "$LIMIT" <<'EOF' 2>&1 | tee -a "$LOG"
import csv, json, os, shutil, sys, tarfile, time
from pathlib import Path

runs, out, work, budget, start, seeds, parallel, limit = sys.argv[1:9]
runs, out, work = Path(runs), Path(out), Path(work)
from lopfast.pipeline.experiments import machine

doc = {"budget": budget, "seeds": int(seeds), "parallel_per_experiment": int(parallel), "time_limit_s": int(limit),
       "machine": machine(), "experiments": {}}
rows, md = [], []
for name in ("table1", "fig3"):
    st = work / f"{name}.status"
    rc, secs = (st.read_text().split() if st.exists() else ("?", "?"))
    status = {"0": "complete", "3": "stopped at its time limit", "124": "killed (timeout)"}.get(rc, f"failed (exit {rc})")
    d = runs / f"{name}-{budget}"
    doc["experiments"][name] = {"exit": rc, "status": status, "seconds": secs}
    if (d / "results.csv").exists():
        with open(d / "results.csv", newline="") as f:
            rows += list(csv.DictReader(f))
    md.append(f"## {name}: {status}, {secs}s\n\n" + ((d / "results.md").read_text() if (d / "results.md").exists()
                                                      else "(no results)\n"))
    if (d / "results.png").exists():
        shutil.copy(d / "results.png", out / f"{name}.png")
if rows:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
m = doc["machine"]
head = (f"# lopfast: the paper's table1 and fig3 in the `{budget}` budget\n\n"
        f"Machine: {m.get('gpu') or 'CPU only'}; torch {m['torch']}, CUDA {m['cuda']}; {m['cpus']} CPUs. "
        f"{seeds} seeds, --parallel {parallel} per experiment, both experiments at once, time limit {limit}s each; "
        f"whole script {round(time.time() - int(start))}s.\n\n")
(out / "results.md").write_text(head + "\n\n".join(md))
# what the next machine needs to resume: teachers, finished cells, pruned models (no checkpoints)
keep = []
for p in sorted(runs.rglob("*")):
    if not p.is_file():
        continue
    rel = p.relative_to(runs)
    if p.name == "teacher.pt" or p.name in ("result.json", "cell.json", "accuracy.json", "report.json") or (
            p.name == "model.pt" and p.parent.name.startswith("prune_")):
        keep.append(rel)
keep_small = [r for r in keep if not (r.name == "model.pt")]
for chosen in (keep, keep_small):
    with tarfile.open(out / "state.tar", "w") as tar:
        for rel in chosen:
            tar.add(runs / rel, arcname=str(rel))
    if (out / "state.tar").stat().st_size < 15 * 2 ** 20:
        break
doc["state_tar_files"] = len(chosen)
doc["seconds"] = round(time.time() - int(start))
(out / "machine.json").write_text(json.dumps(doc, indent=1))
print((out / "results.md").read_text())
files = sorted(p.name for p in out.iterdir() if p.is_file())
print(f"{len(files)} files in {out}: {' '.join(files)}")
EOF
read -r RC1 _ < "$WORK/table1.status" 2>/dev/null || RC1=1
read -r RC2 _ < "$WORK/fig3.status" 2>/dev/null || RC2=1
log "done in $(( $(date +%s) - START ))s: table1 exit $RC1, fig3 exit $RC2"
if [ "$RC1" = 0 ] && [ "$RC2" = 0 ]; then exit 0; fi
if { [ "$RC1" = 0 ] || [ "$RC1" = 3 ]; } && { [ "$RC2" = 0 ] || [ "$RC2" = 3 ]; }; then exit 3; fi
exit 1
