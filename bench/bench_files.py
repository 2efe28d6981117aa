"""What the check of a lopfast file costs at load: a ResNet-50-sized model file (25.6 M float32
parameters, ~102 MB), read from the page cache.

Variants (each the read of the same weights):
    torch.load     ``torch.load(weights_only=True)`` of the file, no check (what lopfast did before)
    digest         ``lopfast.io.read_payload``: the same load + the SHA-256 content digest
    zip-crc        ``read_payload`` of a file written before files carried a digest: the load +
                   Python's zipfile CRC-32 check of every record
    digest-only    the check alone: the digest of the payload ``torch.load`` returned
    zip-crc-only   the check of an older file alone: ``zipfile``'s CRC pass over its records
    lopfast.load   the whole ``lopfast.load`` (build the architecture, load the state dict), check
                   included: building a ResNet-50 (its random init) dominates it, and varies most
and the writes: ``torch.save`` to a file against ``lopfast.save`` (digest + atomic write + fsync).

    pytest bench/bench_files.py --benchmark-only

A table of medians and the check's overhead is printed and written to <results>/files-<cpu|gpu>.json.
``LOPFAST_BENCH_SIZE=tiny`` uses a ResNet-18 (CI smoke run).
"""
import json
import os

import pytest
import torch

import lopfast
import lopfast.io as lio
from conftest import TINY, machine_info, median_time, results_dir

ROUNDS = int(os.environ.get("LOPFAST_BENCH_ROUNDS", "5"))
ARCH = "resnet18" if TINY else "resnet50"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tv = pytest.importorskip("torchvision")
    d = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    model = tv.models.get_model(ARCH).eval()
    new, old = str(d / "new.pt"), str(d / "old.pt")
    lopfast.save(model, new, arch=ARCH)
    payload = torch.load(new, weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "digest"} | {"version": 2}, old)
    return model, new, old, d


def _variants(model, new, old, d):
    payload = torch.load(new, weights_only=True)
    return {
        "torch.load": lambda: torch.load(new, weights_only=True),
        "digest": lambda: lio.read_payload(new),
        "zip-crc": lambda: lio.read_payload(old),
        "digest-only": lambda: lio._verify(new, payload, "model file"),
        "zip-crc-only": lambda: lio._check_zip_crcs(old, "model file"),
        "lopfast.load": lambda: lopfast.load(new),
        "torch.save": lambda: torch.save(model.state_dict(), str(d / "w.pt")),
        "lopfast.save": lambda: lopfast.save(model, str(d / "w2.pt"), arch=ARCH),
    }


@pytest.mark.parametrize("variant", ["torch.load", "digest", "zip-crc", "digest-only", "zip-crc-only", "lopfast.load",
                                     "torch.save", "lopfast.save"])
def test_file_io(benchmark, files, variant):
    fn = _variants(*files)[variant]
    benchmark.extra_info.update(arch=ARCH, bytes=os.path.getsize(files[1]))
    benchmark.pedantic(fn, rounds=1 if TINY else ROUNDS, warmup_rounds=0 if TINY else 1)


def test_file_check_table(files):
    """Medians of every variant in one run, and the check's share of a load."""
    model, new, old, d = files
    rounds = 1 if TINY else ROUNDS
    t = {k: median_time(fn, "cpu", rounds=rounds, warmup=0 if TINY else 1)
         for k, fn in _variants(model, new, old, d).items()}
    size = os.path.getsize(new)
    out = {"arch": ARCH, "bytes": size, "median_s": t,
           "digest_over_torch_load": t["digest"] / t["torch.load"],
           "crc_over_torch_load": t["zip-crc"] / t["torch.load"],
           "check_share_of_lopfast_load": t["digest-only"] / t["lopfast.load"],
           "digest_gb_per_s": size / t["digest-only"] / 1e9,
           "crc_gb_per_s": size / t["zip-crc-only"] / 1e9,
           "machine": machine_info()}
    print(f"\n{ARCH}, {size / 1e6:.1f} MB file")
    for k, v in t.items():
        print(f"  {k:24s} {v * 1e3:8.1f} ms")
    print(f"  checked read / torch.load: digest {out['digest_over_torch_load']:.2f}x, zip CRC "
          f"{out['crc_over_torch_load']:.2f}x; digest {out['digest_gb_per_s']:.2f} GB/s, CRC "
          f"{out['crc_gb_per_s']:.2f} GB/s; the check is {100 * out['check_share_of_lopfast_load']:.0f}% of a "
          "lopfast.load")
    with open(results_dir() / f"files-{'gpu' if torch.cuda.is_available() else 'cpu'}.json", "w") as f:
        json.dump(out, f, indent=2)
