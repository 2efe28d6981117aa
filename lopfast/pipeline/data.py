"""Data sets for the pipeline.

* ``digits``: scikit-learn's embedded 8x8 handwritten digits (1797 images, no download),
  split 80/20 with a fixed seed.
* ``cifar10`` / ``cifar100``: from a local directory in the python-pickle layout
  (``cifar-10-batches-py/data_batch_1..5, test_batch`` / ``cifar-100-python/train, test``)
  or the image-folder layout (``train/<class>/*.png|jpg``, ``test/<class>/...``); optional
  download of the official archive with its MD5 checked.
* ``imagenet``: image folders ``train/`` and ``val/`` read by a DataLoader with workers
  (needs torchvision).

A validation split (``val_size`` images) can be carved out of the training set: stratified by
class, chosen by a generator seeded with ``val_seed`` alone (not the training seed), so every run
and every seed holds out the same images, and those images are removed from the training set
before ``train_subset`` is drawn. Hyper-parameters are chosen on it, never on the test set.

Small data sets live on the training device as uint8 tensors; random crop (zero pad) and
horizontal flip are applied per batch on that device, so an epoch costs no host work and no
worker processes. The order of an epoch and its augmentation draws come from a generator
seeded by ``(seed, epoch)``: a resumed run sees exactly the batches an uninterrupted one
would, and every DDP rank draws the same global batch and keeps its own slice of it.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lopfast.checks import InvalidArgument

__all__ = ["DATASETS", "DataBundle", "TensorLoader", "check_dataset_name", "check_image_folders", "check_labels",
           "check_model_matches_data", "load_data", "split_validation"]

DATASETS = ("digits", "cifar10", "cifar100", "imagenet")

_CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": b"labels",
        "classes": 10,
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": b"fine_labels",
        "classes": 100,
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

_LAYOUT_HELP = (
    "expected either the python-pickle layout ({folder}/{train0} ... {folder}/{test0}) or the image-folder "
    "layout (train/<class>/*.png|jpg and test/<class>/*.png|jpg) under that directory; pass --download to "
    "fetch the official archive, or --data-dir to point elsewhere"
)


def check_dataset_name(name: object) -> str:
    """Validate a data set name."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return name  # type: ignore[return-value]


class TensorLoader:
    """Batches from uint8 images held on the device, augmented on the device.

    Args:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,).
        mean, std: per-channel normalisation (on the 0..1 scale).
        batch_size: *global* batch size (summed over DDP ranks).
        train: shuffle + augment (else fixed order, no augmentation).
        crop_pad: zero padding for the random crop (0 disables cropping).
        flip: random horizontal flips.
        seed: base seed of the per-epoch generators.
        rank, world_size: this process's slice of every global batch.
        channels_last: return batches in channels_last memory format.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int,
        *,
        train: bool,
        crop_pad: int = 0,
        flip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError("images must be a uint8 tensor (N, C, H, W)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.images, self.labels = images, labels
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, c, 1, 1)
        self.batch_size, self.train = batch_size, train
        self.crop_pad, self.flip, self.seed = crop_pad, flip, seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last

    def __len__(self) -> int:
        """Number of (global) batches per epoch; the last one may be smaller."""
        return (len(self.labels) + self.batch_size - 1) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self.labels)

    def epoch(self, epoch: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        """Yield ``(x, y, global_batch_size)`` for one epoch (x float32, normalised).

        The permutation and augmentation draws are made for the whole global batch on a CPU
        generator seeded by (seed, epoch), identically on every rank, then sliced per rank. All of
        an epoch's draws are made at its start (in the order a batch-by-batch draw would make
        them: the same numbers) and uploaded to the device in one copy each: a batch then costs
        no host-to-device copy, so the host never waits for the GPU between steps (a pageable
        copy would wait for every step queued before it, a replayed graph included).
        """
        n = len(self.labels)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        crop = self.train and bool(self.crop_pad)
        flip = self.train and self.flip
        offs, flips = [], []
        for start in range(0, n, self.batch_size):
            gbs = min(self.batch_size, n - start)
            if crop:
                offs.append(torch.randint(0, 2 * self.crop_pad + 1, (gbs, 2), generator=g))
            if flip:
                flips.append(torch.rand(gbs, generator=g) < 0.5)
        dev = self.images.device
        order = order.to(dev)
        offs_all = torch.cat(offs).to(dev) if crop and offs else None
        flips_all = torch.cat(flips).to(dev) if flip and flips else None
        for start in range(0, n, self.batch_size):
            gbs = min(self.batch_size, n - start)
            # contiguous slice of the global batch for this rank
            lo = start + gbs * self.rank // self.world_size
            hi = start + gbs * (self.rank + 1) // self.world_size
            sel = order[lo:hi]
            x = self.images.index_select(0, sel)
            if crop:
                x = _random_crop(x, offs_all[lo:hi], self.crop_pad)
            if flip:
                x = torch.where(flips_all[lo:hi].view(-1, 1, 1, 1), x.flip(3), x)
            x = (x.float().div_(255.0) - self.mean) / self.std
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels.index_select(0, sel), gbs

    def __iter__(self):
        return self.epoch(0)


def _random_crop(x: torch.Tensor, offs: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each image of the zero-padded batch at its own (dy, dx) offset: one gather."""
    b, c, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = offs[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offs[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class FolderLoader:
    """ImageNet-style image folders through a torch DataLoader with workers (needs torchvision)."""

    def __init__(self, dataset, batch_size: int, *, train: bool, workers: int, seed: int, rank: int,
                 world_size: int, device: torch.device, channels_last: bool = False) -> None:
        from torch.utils.data import DataLoader, DistributedSampler

        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.world_size, self.device, self.channels_last = world_size, device, channels_last
        self.sampler = DistributedSampler(dataset, world_size, rank, shuffle=train, seed=seed, drop_last=False)
        self.loader = DataLoader(
            dataset, batch_size=max(1, batch_size // world_size), sampler=self.sampler, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=False,
        )

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def epoch(self, epoch: int = 0):
        self.sampler.set_epoch(epoch)
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True), len(y) * self.world_size

    def __iter__(self):
        return self.epoch(0)


@dataclass
class DataBundle:
    """Train / test loaders plus what a model needs to know about the data.

    ``val``: the validation loader when ``load_data(val_size=...)`` carved one out of the
    training set (else None); ``extra["train_index"]`` / ``extra["val_index"]`` then give the
    positions of both in the full training set (disjoint).
    """

    name: str
    train: object
    test: object
    in_channels: int
    num_classes: int
    image_size: int
    extra: dict = field(default_factory=dict)
    val: Optional[object] = None

    def example_inputs(self, n: int = 2, device=None) -> torch.Tensor:
        """A small normalised batch from the test set (for pruning tracers and checks)."""
        x, _, _ = next(iter(self.test.epoch(0)))
        x = x[:n]
        return x.to(device) if device is not None else x


def _first_conv(model: torch.nn.Module):
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(getattr(m, "in_channels", None), int) and isinstance(w, torch.Tensor) and w.dim() >= 3:
            return name, m
    return None, None


def check_model_matches_data(model: torch.nn.Module, data, name: str = "model") -> None:
    """Refuse a model whose input channels or class count do not match ``data`` (a DataBundle).

    Found by one forward pass of two test images in eval mode without gradients, on the model's
    device; the model's train/eval modes and the RNG states are kept, so a run is the same with or
    without the check (call it before compiling the model). Fewer outputs than classes is an
    :class:`~lopfast.checks.InvalidArgument` naming ``name`` (the labels above would be out of
    range); more outputs is a warning (the extra outputs learn never to be chosen). A data object
    without ``num_classes`` / ``example_inputs`` is not checked.
    """
    classes, example = getattr(data, "num_classes", None), getattr(data, "example_inputs", None)
    if not isinstance(classes, int) or example is None:
        return
    dname = getattr(data, "name", "the data")
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    x = example(2, device)
    if p is not None and p.is_floating_point():
        x = x.to(p.dtype)
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            out = model.eval()(x)
    except Exception as exc:
        shape = tuple(x.shape[1:])
        layer, conv = _first_conv(model)  # the usual cause, named; the forward is what decides
        why = (f"it takes {conv.in_channels} input channels (its first layer {layer!r}), but {dname} has "
               f"{shape[0]}: build it with in_channels={shape[0]}"
               if conv is not None and conv.in_channels != shape[0] else
               f"{dname} has {shape[0]} input channels; it failed: "
               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        raise InvalidArgument(name, model, f"a model that runs on inputs of shape {shape}", why) from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not (isinstance(out, torch.Tensor) and out.dim() == 2):
        return
    if out.shape[1] < classes:
        raise InvalidArgument(name, model, f"a model with {classes} outputs, one per class of {dname}",
                              f"it gives {out.shape[1]}: the labels above {out.shape[1] - 1} would be out of "
                              f"range; build it with num_classes={classes}")
    if out.shape[1] > classes:
        warnings.warn(f"the {name} gives {out.shape[1]} outputs but {dname} has {classes} classes: the extra outputs "
                      "are trained towards never being chosen", stacklevel=3)


# --------------------------------------------------------------------------- loaders
def _digits(subset: Optional[int], seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from exc
    d = load_digits()
    imgs = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8), 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    # fixed stratified-enough 80/20 split independent of the training seed
    perm = np.random.RandomState(0).permutation(len(labels))
    cut = int(0.8 * len(labels))
    tr, te = perm[:cut], perm[cut:]
    x_tr, y_tr, x_te, y_te = imgs[tr], labels[tr], imgs[te], labels[te]
    mean = float(x_tr.mean() / 255.0)
    std = float(x_tr.std() / 255.0)
    return x_tr, y_tr, x_te, y_te, 10, (mean,), (std,)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(name: str, root: Path) -> Path:
    """Download and unpack the official CIFAR archive into ``root`` (MD5 verified)."""
    meta = _CIFAR[name]
    root.mkdir(parents=True, exist_ok=True)
    archive = root / os.path.basename(meta["url"])
    if not archive.exists() or _md5(archive) != meta["md5"]:
        tmp = archive.with_suffix(".part")
        try:
            urllib.request.urlretrieve(meta["url"], tmp)
        except Exception as exc:
            raise RuntimeError(
                f"could not download {meta['url']} ({exc}); fetch it by hand into {root} or use the image-folder layout"
            ) from exc
        os.replace(tmp, archive)
    digest = _md5(archive)
    if digest != meta["md5"]:
        raise RuntimeError(f"{archive} has MD5 {digest}, expected {meta['md5']}; delete it and retry")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(root)
    return root / meta["folder"]


# decoded image folders of this process, by (path, classes): ``lopfast reproduce`` prepares
# the data once per (seed, target) unit; decoding 60,000 CIFAR JPEGs each time would cost more
# than a short-budget cell's training on a GPU
_FOLDER_CACHE: dict = {}


def _decode(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _class_folders(split_dir: Path) -> List[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def _has_image(folder: Path, suffixes: Sequence[str], recursive: bool) -> bool:
    for _, _, names in os.walk(folder, followlinks=True):
        if any(os.path.splitext(n)[1].lower() in suffixes for n in names):
            return True
        if not recursive:
            break
    return False


def check_image_folders(train_dir, test_dir, suffixes: Sequence[str] = _IMAGE_SUFFIXES, *,
                        recursive: bool = False) -> List[str]:
    """Check that two image-folder splits (``<split>/<class>/<image>``) hold the same classes; returns them.

    Refused (ValueError naming the folders): a class folder of ``test_dir`` that ``train_dir``
    lacks (its images would be dropped or mislabelled), a class folder of ``train_dir`` with no
    image (a class the model has an output for but never trains on), no class folder at all.
    Warned: a class of ``train_dir`` that ``test_dir`` lacks or holds no image of (the test
    accuracy does not measure it). ``suffixes``: the image file endings (lower case);
    ``recursive``: images may sit in subfolders of a class folder (torchvision's ImageFolder).
    """
    train_dir, test_dir = Path(train_dir), Path(test_dir)
    classes, tested = _class_folders(train_dir), _class_folders(test_dir)
    if not classes:
        raise FileNotFoundError(f"no class folders under {train_dir} (expected {train_dir}/<class>/<image>)")
    extra = sorted(set(tested) - set(classes))
    if extra:
        raise ValueError(f"{test_dir} has class folders that {train_dir} lacks: {_names(extra)}; a class the model "
                         f"never trains on cannot be tested: add it to {train_dir.name}/ or remove it from "
                         f"{test_dir.name}/")
    empty = [c for c in classes if not _has_image(train_dir / c, suffixes, recursive)]
    if empty:
        raise ValueError(f"{train_dir}: class folders with no image ({', '.join(suffixes)}): {_names(empty)}; the "
                         "model would have an output it never trains on: add images or remove the folders")
    untested = [c for c in classes if c not in tested or not _has_image(test_dir / c, suffixes, recursive)]
    if untested:
        warnings.warn(f"{test_dir}: no test image of the classes {_names(untested)} (no folder, or no image in it): "
                      "the test accuracy does not measure them", stacklevel=3)
    return classes


def _names(items: Sequence, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_labels(labels, num_classes: int, where: str, split: str = "training") -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` and warn about classes with no ``split`` image,
    naming ``where`` (the data set's folder or name)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
        raise ValueError(f"{where}: {split} labels {_names(bad)} are outside 0..{num_classes - 1} (the data set "
                         f"has {num_classes} classes)")
    if split == "training":
        missing = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0).tolist()
        if missing:
            warnings.warn(f"{where}: no training image of the classes {_names(missing)} of {num_classes}: the model "
                          "has an output for each but never learns them", stacklevel=3)


def _load_image_folder(split_dir: Path, classes: List[str]):
    key = (str(split_dir.resolve()), tuple(classes))
    if key in _FOLDER_CACHE:
        return _FOLDER_CACHE[key]
    files, ys = [], []
    for ci, cname in enumerate(classes):
        cdir = split_dir / cname
        if not cdir.is_dir():
            continue
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                files.append(f)
                ys.append(ci)
    if not files:
        raise FileNotFoundError(f"no images found under {split_dir}")
    from concurrent.futures import ThreadPoolExecutor

    # PIL decodes outside the GIL: threads make the one-time decode several times faster
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        xs = list(pool.map(_decode, files, chunksize=256))
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"images under {split_dir} have different sizes {sorted(shapes)[:3]}; expected one size")
    result = (np.stack(xs), np.asarray(ys, dtype=np.int64), classes)
    _FOLDER_CACHE[key] = result
    return result


def _cifar(name: str, data_dir: Optional[str], download: bool):
    meta = _CIFAR[name]
    root = Path(data_dir).expanduser() if data_dir else Path(os.environ.get("LOPFAST_DATA", "data")) / name
    help_text = _LAYOUT_HELP.format(folder=meta["folder"], train0=meta["train"][0], test0=meta["test"][0])
    candidates = [root, root / meta["folder"]]
    for c in candidates:
        if (c / meta["train"][0]).is_file() and (c / meta["test"][0]).is_file():
            return _cifar_pickle(c, meta)
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = check_image_folders(root / "train", root / "test")
        x_tr, y_tr, _ = _load_image_folder(root / "train", classes)
        x_te, y_te, _ = _load_image_folder(root / "test", classes)
        return x_tr, y_tr, x_te, y_te, max(meta["classes"], len(classes)), meta["mean"], meta["std"]
    if download:
        return _cifar_pickle(download_cifar(name, root), meta)
    raise FileNotFoundError(f"{name} not found in {root.resolve()}: {help_text}")


def _cifar_pickle(folder: Path, meta: dict):
    def read(files):
        xs, ys = [], []
        for f in files:
            with open(folder / f, "rb") as fh:
                # the official archive is a pickle of plain numpy data; it is only read from the
                # directory the user named (never from the network without the MD5 check)
                d = pickle.load(fh, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[meta["label_key"]], dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    x_tr, y_tr = read(meta["train"])
    x_te, y_te = read(meta["test"])
    return x_tr, y_tr, x_te, y_te, meta["classes"], meta["mean"], meta["std"]


def _subset_index(n_all: int, n: Optional[int], seed: int) -> np.ndarray:
    if n is None or n >= n_all:
        return np.arange(n_all)
    return np.sort(np.random.RandomState(seed).permutation(n_all)[:n])


def _subset(x, y, n: Optional[int], seed: int):
    idx = _subset_index(len(y), n, seed)
    return x[idx], y[idx]


def split_validation(labels, val_size: int, seed: int = 0):
    """Hold ``val_size`` of the positions of ``labels`` out for validation, stratified by class.

    Returns ``(train_index, val_index)``: sorted, disjoint int64 arrays covering every position.
    Each class gives ``val_size`` times its share of the labels (rounded down, the remainder
    going one each to classes in a seeded order); which of its images go is a seeded
    permutation. The result depends on ``labels``, ``val_size`` and ``seed`` only.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not 0 < val_size < n:
        raise ValueError(f"val_size must be an int between 1 and {n - 1} (images held out of the {n} training "
                         f"images), got {val_size!r}")
    rng = np.random.RandomState(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = (counts * val_size) // n
    for c in rng.permutation(len(classes))[: val_size - int(take.sum())]:
        take[c] += 1
    val = []
    for c, k in zip(classes, take):
        pos = np.flatnonzero(labels == c)
        val.append(pos[rng.permutation(len(pos))[:k]])
    val_index = np.sort(np.concatenate(val)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val_index] = False
    return np.flatnonzero(mask).astype(np.int64), val_index


def load_data(
    name: str = "digits",
    *,
    data_dir: Optional[str] = None,
    batch_size: int = 256,
    eval_batch_size: Optional[int] = None,
    device="cpu",
    seed: int = 0,
    train_subset: Optional[int] = None,
    test_subset: Optional[int] = None,
    download: bool = False,
    workers: int = 8,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    val_size: Optional[int] = None,
    val_seed: int = 0,
) -> DataBundle:
    """Load a data set and return its train / test loaders.

    Args:
        name: ``digits``, ``cifar10``, ``cifar100`` or ``imagenet``.
        data_dir: directory of the data (cifar: pickle or image-folder layout; imagenet:
            ``train/`` and ``val/`` image folders). Default: ``$LOPFAST_DATA/<name>`` or
            ``data/<name>``.
        batch_size: global training batch size (split over DDP ranks).
        eval_batch_size: test batch size (default: ``max(batch_size, 512)``).
        device: where the uint8 tensors and batches live.
        seed: seed of the epoch order / augmentation draws.
        train_subset, test_subset: keep only this many (random, fixed) samples.
        download: fetch the CIFAR archive if it is not in ``data_dir``.
        workers: DataLoader workers (imagenet only).
        rank, world_size: DDP slice.
        channels_last: deliver batches in channels_last format.
        val_size: hold this many training images out as a validation split
            (:func:`split_validation`: stratified, seeded by ``val_seed`` only); they are
            removed before ``train_subset`` is drawn and served by ``bundle.val``.
        val_seed: seed of the validation split.
    """
    check_dataset_name(name)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for arg, v in (("train_subset", train_subset), ("test_subset", test_subset), ("eval_batch_size", eval_batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {v!r}")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a valid torch device") from None
    eval_bs = eval_batch_size or max(batch_size, 512)
    if name == "imagenet":
        if val_size is not None:
            raise ValueError("val_size is not supported for imagenet (its val/ folder is the evaluation set); "
                             "carve a validation folder by hand")
        return _imagenet(data_dir, batch_size, eval_bs, device, seed, workers, rank, world_size, channels_last)
    if name == "digits":
        x_tr, y_tr, x_te, y_te, ncls, mean, std = _digits(train_subset, seed)
        crop_pad, flip, size = 1, False, 8  # flipping a digit changes its meaning
    else:
        x_tr, y_tr, x_te, y_te, ncls, mean, std = _cifar(name, data_dir, download)
        crop_pad, flip, size = 4, True, x_tr.shape[-1]
    where = name if name == "digits" else f"{name} in {data_dir or os.path.join(os.environ.get('LOPFAST_DATA', 'data'), name)}"
    check_labels(y_tr, ncls, where)
    check_labels(y_te, ncls, where, "test")
    extra = {"mean": mean, "std": std}
    keep, val_index = np.arange(len(y_tr)), None
    if val_size is not None:
        keep, val_index = split_validation(y_tr, val_size, val_seed)
    train_index = keep[_subset_index(len(keep), train_subset, 1)]
    x_te, y_te = _subset(x_te, y_te, test_subset, 2)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    common = dict(rank=rank, world_size=world_size, channels_last=channels_last, seed=seed)
    train = TensorLoader(t(x_tr[train_index]), t(y_tr[train_index]), mean, std, batch_size, train=True,
                         crop_pad=crop_pad, flip=flip, **common)
    test = TensorLoader(t(x_te), t(y_te), mean, std, eval_bs, train=False, **common)
    val = None
    if val_index is not None:
        val = TensorLoader(t(x_tr[val_index]), t(y_tr[val_index]), mean, std, eval_bs, train=False, **common)
        extra.update(train_index=train_index, val_index=val_index, val_seed=val_seed)
    return DataBundle(name, train, test, int(x_tr.shape[1]), int(ncls), int(size), extra, val=val)


def _same_class_numbers(split, reference) -> None:
    # ImageFolder numbers each split's class folders on its own: a class missing from val/ would
    # shift every label after it
    if split.classes == reference.classes:
        return
    idx = [reference.class_to_idx[c] for c in split.classes]
    split.samples = [(path, idx[t]) for path, t in split.samples]
    split.imgs, split.targets = split.samples, [t for _, t in split.samples]
    split.classes, split.class_to_idx = list(reference.classes), dict(reference.class_to_idx)


def _imagenet(data_dir, batch_size, eval_bs, device, seed, workers, rank, world_size, channels_last) -> DataBundle:
    root = Path(data_dir or Path(os.environ.get("LOPFAST_DATA", "data")) / "imagenet")
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FileNotFoundError(
            f"imagenet not found in {root.resolve()}: expected image folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG; "
            "pass --data-dir"
        )
    try:
        import torchvision.datasets as tvd
        import torchvision.transforms as T
    except Exception as exc:
        raise ImportError(f"the imagenet loader needs torchvision, which could not be imported ({exc})") from exc
    check_image_folders(root / "train", root / "val", tuple(tvd.folder.IMG_EXTENSIONS), recursive=True)
    norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_ds = tvd.ImageFolder(str(root / "train"), T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    val_ds = tvd.ImageFolder(str(root / "val"), T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]),
                             allow_empty=True)
    _same_class_numbers(val_ds, train_ds)
    kw = dict(workers=workers, seed=seed, rank=rank, world_size=world_size, device=device, channels_last=channels_last)
    return DataBundle(
        "imagenet", FolderLoader(train_ds, batch_size, train=True, **kw), FolderLoader(val_ds, eval_bs, train=False, **kw),
        3, len(train_ds.classes), 224,
    )
