"""Compile Triton kernel variants ahead of the work, in parallel processes, into Triton's cache.

A cold process compiles each kernel variant at its first launch, one after the other; the
8-tensor SP variants take 10-30 s each (triton 3.6, sm_90), and a GPU run needs several. This
compiles the variants a run will pick (by default those of the training dtypes, fp32 under the
default IEEE policy and bf16 autocast) in JOBS processes at once, through Triton's own launch
path without launching (``JITFunction.warmup``: the same specialisation and cache key as a real
launch of those argument types), into ``$TRITON_CACHE_DIR``. Every later process (the tests, the
benchmarks, paper_fast.sh's workers) finds them there. The list is ``aot_variants()`` of every
``kernels/*.py`` module: the variants the launchers can pick (tests/test_sp_table.py checks it).

    python bench/precompile.py [--jobs N] [--match REGEX] [--dry-run]

Prints one line per variant (seconds; "cached" when Triton had it), exit status 1 when one failed.
"""
from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import pkgutil
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

# the training dtypes (fp32 IEEE, bf16), aligned or not, both Gram modes' atomic one, the row tile
# of b >= 65, the (b, b) kernels of b = 64 ... 1024, and every collapse kernel of fp32 / bf16
DEFAULT = (r"^(sp_gram(_table)?_(fp32_ieee|bf16)(_nt\d)?_align\d+_atomic"
           r"|sp_grad_features(_table)?_(fp32_ieee|bf16)(_nt\d)?_bi128_align\d+"
           r"|sp_(row_normalize|finish|grad_gram)_c(64|128|256|512|1024)"
           r"|collapse_gemm_(fp32_ieee|bf16)_.*)$")


def variants(match: str):
    import lopfast.kernels as pkg

    rx = re.compile(match)
    out = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"lopfast.kernels.{info.name}")
        if hasattr(mod, "aot_variants"):
            out += [(info.name, v["name"]) for v in mod.aot_variants() if rx.search(v["name"])]
    # the slow ones first, so that they spread over the processes
    return sorted(out, key=lambda mv: ("_nt8_" not in mv[1], mv))


def _args(v: dict, device: str):
    """Arguments of the variant's signature: tensors of the pointer types (fresh allocations are
    16-byte aligned, as torch's are), ints that fit in 32 bits and are neither 1 nor a multiple
    of 16 (the values runtime would not specialise on anyway), floats."""
    import torch

    types = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16, "*i64": torch.int64,
             "*i32": torch.int32}
    args = []
    for name in v["fn"].arg_names:
        t = v["signature"][name]
        if t == "constexpr":
            continue
        if t.startswith("*"):
            args.append(torch.empty(64, dtype=types[t], device=device))
        elif t.startswith("i"):
            args.append(17)
        else:
            args.append(0.5)
    return args


def compile_one(module: str, name: str) -> tuple:
    mod = importlib.import_module(f"lopfast.kernels.{module}")
    (v,) = [v for v in mod.aot_variants() if v["name"] == name]
    t0 = time.time()
    kernel = v["fn"].warmup(*_args(v, "cuda"), grid=(1,), num_warps=v["num_warps"], num_stages=v["num_stages"],
                            **v["constexprs"])
    return name, time.time() - t0, getattr(kernel, "n_regs", None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1))
    ap.add_argument("--match", default=DEFAULT)
    ap.add_argument("--dry-run", action="store_true", help="list the variants, compile nothing")
    a = ap.parse_args()
    todo = variants(a.match)
    if a.dry_run:
        print("\n".join(f"{m}.{n}" for m, n in todo))
        print(f"{len(todo)} variants")
        return 0
    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print(f"precompile: no CUDA device (or the interpreter is on): nothing to compile ({len(todo)} variants listed)")
        return 0
    t0, failed = time.time(), 0
    # spawned, not forked: this process has touched the CUDA driver (is_available), and a forked
    # child cannot use CUDA after that
    with ProcessPoolExecutor(max_workers=a.jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        futs = {ex.submit(compile_one, m, n): n for m, n in todo}
        for f in as_completed(futs):
            try:
                name, secs, _ = f.result()
                print(f"{secs:7.1f}s {name}", flush=True)
            except Exception as exc:  # reported, the others go on
                failed += 1
                print(f"  FAILED {futs[f]}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    print(f"precompiled {len(todo) - failed}/{len(todo)} variants in {time.time() - t0:.1f}s with {a.jobs} processes "
          f"into {os.environ.get('TRITON_CACHE_DIR', '~/.triton/cache')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
