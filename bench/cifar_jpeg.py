"""CIFAR-10 as JPEG image folders (an archive or its extracted folder) -> CIFAR's python-pickle layout.

Both GPU scripts (bench/gpu_proof.sh, bench/paper_fast.sh) decode the 60,000 JPEGs once into
``<dst>/data_batch_1..5, test_batch`` (lopfast's loader reads that layout: every process then
loads 180 MB of arrays instead of decoding 60,000 files). An archive is read in place: no 60,000
files to write, and none to delete at the end. Order: classes sorted, then file names sorted (the
order of lopfast's own image-folder loader).

    python bench/cifar_jpeg.py SRC DST               # SRC: cifar10-jpeg.tar.gz or a folder
    python bench/cifar_jpeg.py --fake ARCHIVE N      # a tiny archive of N random images per class
                                                     # and split (the scripts' --smoke runs)
"""
from __future__ import annotations

import io
import os
import pickle
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

IMG = (".png", ".jpg", ".jpeg", ".bmp")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


def _split_of(parts):  # (.../)train/<class>/<file>
    return parts[-3] if len(parts) >= 3 else None


def _files(src: Path) -> dict:
    """split -> class -> [(file name, bytes)] of an archive or a folder holding train/ and test/."""
    files: dict = {"train": {}, "test": {}}
    if src.is_file():
        with tarfile.open(src) as tar:
            for m in tar:
                parts = PurePosixPath(m.name).parts
                if m.isfile() and parts[-1].lower().endswith(IMG) and _split_of(parts) in files:
                    files[_split_of(parts)].setdefault(parts[-2], []).append((parts[-1], tar.extractfile(m).read()))
        return files
    roots = [d.parent for d in src.rglob("train") if d.is_dir() and (d.parent / "test").is_dir()]
    if not roots:
        sys.exit(f"no train/ and test/ folders under {src}")
    for split in files:
        for f in sorted((roots[0] / split).glob("*/*")):
            if f.suffix.lower() in IMG:
                files[split].setdefault(f.parent.name, []).append((f.name, f.read_bytes()))
    return files


def decode(src: Path, dst: Path) -> str:
    """Write ``src``'s images to ``dst`` in the pickle layout; returns a one-line summary."""
    t0 = time.time()
    files = _files(src)
    classes = sorted(files["train"])
    if not classes or sorted(files["test"]) != classes:
        sys.exit(f"{src}: expected train/<class>/ and test/<class>/ image folders with the same classes")
    out = {}
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for split in files:
            items = [(ci, data) for ci, c in enumerate(classes) for _, data in sorted(files[split][c], key=lambda t: t[0])]
            x = np.stack(list(pool.map(_decode, [d for _, d in items], chunksize=256)))
            out[split] = (x, np.array([ci for ci, _ in items], dtype=np.int64))
    dst.mkdir(parents=True, exist_ok=True)
    (x_tr, y_tr), (x_te, y_te) = out["train"], out["test"]
    for i, idx in enumerate(np.array_split(np.arange(len(y_tr)), 5), 1):
        with open(dst / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x_tr[idx].reshape(len(idx), -1), b"labels": y_tr[idx].tolist()}, f)
    with open(dst / "test_batch", "wb") as f:
        pickle.dump({b"data": x_te.reshape(len(y_te), -1), b"labels": y_te.tolist()}, f)
    return (f"decoded {len(y_tr)} training and {len(y_te)} test images of {len(classes)} classes "
            f"({', '.join(classes)}) from {src} in {time.time() - t0:.1f}s")


def make_fake_archive(path: Path, per_class: int) -> Path:
    """A .tar.gz of random 32x32 JPEGs in CIFAR-10's folder layout (``per_class`` per class and split)."""
    rng = np.random.RandomState(0)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for c in CLASSES:
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"cifar10/{split}/{c}/{i:05d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
    return path


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--fake":
        print(make_fake_archive(Path(sys.argv[2]), int(sys.argv[3])))
    elif len(sys.argv) == 3:
        print(decode(Path(sys.argv[1]), Path(sys.argv[2])))
    else:
        sys.exit(__doc__)
