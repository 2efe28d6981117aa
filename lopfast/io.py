"""Pickle-free save/load of pruned, expanded or contracted models.

A file holds only tensors and plain data, so it loads with ``torch.load(weights_only=True)``
and never executes code: the ``state_dict`` and its metadata (per-module versions, e.g.
MNASNet's ``_version``), the *structure* (for every parametrised layer its class and
constructor hyper-parameters, e.g. the pruned channel counts or an ExpandedConv2d's rate), the
plain attributes of every module (``out_channels``, ``normalized_shape``, ``num_features``,
``num_heads``, ``head_dim``, ...), and the caller's metadata. Loading rebuilds a model, either
the freshly built original the caller passes or one made by a registered builder, then:

1. replaces each layer whose class changed (e.g. a conv that is now an ``ExpandedConv2d``) or
   whose stored hyper-parameters differ, for the exact torch layer classes it knows;
2. sets back every stored plain attribute that differs, on layers of any class (timm's
   ``BatchNormAct2d``, ``LayerNorm2d``, attention blocks, ...), so their forward uses the
   pruned sizes;
3. gives every parameter and buffer whose stored shape differs (raw ``nn.Parameter`` s such as
   ConvNeXt's ``layer_scale`` / ``gamma``, a ViT's ``cls_token``) an empty tensor of that shape;
4. loads the state_dict strictly, with its metadata, taking the stored tensors themselves.

The same container holds every file lopfast writes (teachers, stage outputs, training
checkpoints: :func:`save_checkpoint`): one dict with a format marker, a version and the SHA-256
digest of its content, written atomically and checked at every load (docs/files.md).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn

from lopfast.checks import InvalidArgument, InvalidArgumentType, check_bool, nonfinite
from lopfast.files import write_atomic
from lopfast.layers import ExpandedConv2d, ExpandedLinear

FORMAT = "lopfast-model"
CHECKPOINT_FORMAT = "lopfast-checkpoint"
# 2: adds the per-module plain attributes and the state_dict metadata (version 1 files still load);
# 3: every file carries the digest of its content, checkpoints are lopfast files too
VERSION = 3

PathLike = Union[str, "os.PathLike[str]"]


class ModelFileError(ValueError):
    """A model file is unreadable, tampered, truncated, holds pickled objects, or does not fit
    the model it is loaded into. The message names the path."""


_ARCHITECTURES: Dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str, builder: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Register ``builder(**arch_kwargs) -> nn.Module`` so ``load(path)`` can rebuild ``name``.

    Save with ``lopfast.save(model, path, arch=name, arch_kwargs={...})``. Re-registering a
    name raises ValueError unless ``overwrite=True``.
    """
    _register(_ARCHITECTURES, "name", "architecture", name, builder, overwrite)


def _register(table: Dict[str, Callable[..., nn.Module]], argname: str, what: str, key: str,
              builder: Callable[..., nn.Module], overwrite: bool) -> None:
    # one set of checks for the exact-name and the prefix registries
    if not isinstance(key, str) or not key:
        raise TypeError(f"{argname} must be a non-empty str, got {key!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable, got {type(builder).__name__}")
    if key in table and not overwrite and table[key] is not builder:
        raise ValueError(f"{what} {key!r} is already registered; pass overwrite=True to replace it")
    table[key] = builder


def registered_architectures() -> Dict[str, Callable[..., nn.Module]]:
    """A copy of the name -> builder registry."""
    return dict(_ARCHITECTURES)


_PREFIXES: Dict[str, Callable[..., nn.Module]] = {}


def register_architecture_prefix(prefix: str, builder: Callable[..., nn.Module], *, overwrite: bool = False) -> None:
    """Register ``builder(name, **arch_kwargs) -> nn.Module`` for every ``arch`` starting with ``prefix``.

    ``lopfast.pipeline`` registers ``"tv:"`` (torchvision) and ``"timm:"`` this way, so a file
    saved with ``arch="timm:convnext_atto"`` loads with ``lopfast.load(path)``. The builder gets
    the whole name, prefix included. An exact name registered with :func:`register_architecture`
    wins over a prefix.
    """
    _register(_PREFIXES, "prefix", "architecture prefix", prefix, builder, overwrite)


# ---------------------------------------------------------------------------- layer specs
_CONV_TYPES = {c.__name__: c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                        nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)}
_BN_TYPES = {c.__name__: c for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


def _lst(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def layer_spec(module: nn.Module) -> Dict[str, Any]:
    """The class and constructor hyper-parameters of ``module`` as plain data.

    Layers of other classes give ``{"type": <qualified name>, "known": False}``: they are
    checked on load (same class at the same path) but not rebuilt.
    """
    t = type(module)
    if t is ExpandedConv2d:
        m = module
        return {"type": "ExpandedConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": _lst(m.kernel_size), "stride": _lst(m.stride), "padding": _lst(m.padding),
                "dilation": _lst(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode, "rate": float(m.rate), "init": m.init, "mode": m.mode}
    if t is ExpandedLinear:
        m = module
        return {"type": "ExpandedLinear", "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None, "rate": float(m.rate), "depth": m.depth, "init": m.init,
                "mode": m.mode}
    if t.__name__ in _CONV_TYPES and t is _CONV_TYPES[t.__name__]:
        m = module
        spec = {"type": t.__name__, "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": _lst(m.kernel_size), "stride": _lst(m.stride), "padding": _lst(m.padding),
                "dilation": _lst(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
        if m.transposed:
            spec["output_padding"] = _lst(m.output_padding)
        return spec
    if t is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if t.__name__ in _BN_TYPES and t is _BN_TYPES[t.__name__]:
        m = module
        return {"type": t.__name__, "num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                "affine": m.affine, "track_running_stats": m.track_running_stats}
    if t is nn.LayerNorm:
        m = module
        return {"type": "LayerNorm", "normalized_shape": list(m.normalized_shape), "eps": m.eps,
                "elementwise_affine": m.elementwise_affine,
                "bias": getattr(m, "bias", None) is not None}
    if t is nn.GroupNorm:
        m = module
        return {"type": "GroupNorm", "num_groups": m.num_groups, "num_channels": m.num_channels,
                "eps": m.eps, "affine": m.affine}
    if t is nn.PReLU:
        return {"type": "PReLU", "num_parameters": module.num_parameters}
    if t is nn.Embedding:
        m = module
        return {"type": "Embedding", "num_embeddings": m.num_embeddings, "embedding_dim": m.embedding_dim,
                "padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
                "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse}
    return {"type": f"{t.__module__}.{t.__qualname__}", "known": False}


def _t(v):
    return tuple(v) if isinstance(v, list) else v


def build_layer(spec: Dict[str, Any], device="meta") -> nn.Module:
    """Instantiate the layer described by ``spec`` (see :func:`layer_spec`) on ``device``."""
    s = dict(spec)
    kind = s.pop("type")
    f = {"device": device}
    if kind == "ExpandedConv2d":
        mode = s.pop("mode")
        m = ExpandedConv2d(s["in_channels"], s["out_channels"], _t(s["kernel_size"]), _t(s["stride"]),
                           _t(s["padding"]), _t(s["dilation"]), s["groups"], s["bias"], s["padding_mode"],
                           rate=s["rate"], init=s["init"], **f)
        m.mode = mode
        return m
    if kind == "ExpandedLinear":
        m = ExpandedLinear(s["in_features"], s["out_features"], s["bias"], rate=s["rate"], depth=s["depth"],
                           init=s["init"], **f)
        m.mode = s["mode"]
        return m
    if kind in _CONV_TYPES:
        extra = {"output_padding": _t(s["output_padding"])} if "output_padding" in s else {}
        return _CONV_TYPES[kind](s["in_channels"], s["out_channels"], _t(s["kernel_size"]), _t(s["stride"]),
                                 _t(s["padding"]), dilation=_t(s["dilation"]), groups=s["groups"], bias=s["bias"],
                                 padding_mode=s["padding_mode"], **extra, **f)
    if kind == "Linear":
        return nn.Linear(s["in_features"], s["out_features"], s["bias"], **f)
    if kind in _BN_TYPES:
        return _BN_TYPES[kind](s["num_features"], s["eps"], s["momentum"], s["affine"], s["track_running_stats"], **f)
    if kind == "LayerNorm":
        kw = {} if s["bias"] or not s["elementwise_affine"] else {"bias": False}
        return nn.LayerNorm(_t(s["normalized_shape"]), s["eps"], s["elementwise_affine"], **kw, **f)
    if kind == "GroupNorm":
        return nn.GroupNorm(s["num_groups"], s["num_channels"], s["eps"], s["affine"], **f)
    if kind == "PReLU":
        return nn.PReLU(s["num_parameters"], **f)
    if kind == "Embedding":
        return nn.Embedding(s["num_embeddings"], s["embedding_dim"], s["padding_idx"], s["max_norm"],
                            s["norm_type"], s["scale_grad_by_freq"], s["sparse"], **f)
    raise ValueError(f"cannot build a layer of type {kind!r}")


def model_structure(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{path: layer_spec}`` for every module that owns parameters or buffers.

    The submodules of an expanded layer are its own business: only the layer is recorded.
    """
    out = {}
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            out[name] = layer_spec(m)
    return out


# ---------------------------------------------------------------------------- attributes
# the bookkeeping every nn.Module has; ``training`` is saved once for the whole model
_MODULE_KEYS = frozenset(nn.Module().__dict__) | {"training"}


def _is_plain(value, depth: int = 0) -> bool:
    # exact types: subclasses (str enums, named tuples) would need their class to unpickle
    if value is None or type(value) in (bool, int, float, str):
        return True
    if depth > 4:
        return False
    if type(value) in (list, tuple, torch.Size):  # torch.Size is stored as a plain tuple
        return all(_is_plain(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _plain_copy(value):
    if isinstance(value, tuple):  # tuple and torch.Size
        return tuple(_plain_copy(v) for v in value)
    if isinstance(value, list):
        return [_plain_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def module_attributes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """``{path: {attribute: value}}``: the plain-data instance attributes of every module.

    Pruning changes sizes that layers keep as attributes and use in ``forward`` (a LayerNorm's
    ``normalized_shape``, an attention block's ``num_heads`` / ``head_dim``, a BatchNorm
    subclass's ``num_features``); the file records them all so :func:`load` can set them back on
    layers of any class. Values that are not plain data (modules, tensors, callables) are not
    recorded: they are rebuilt by the architecture's builder.
    """
    out = {}
    for name, m in model.named_modules():
        attrs = {k: _plain_copy(v) for k, v in vars(m).items() if k not in _MODULE_KEYS and _is_plain(v)}
        if attrs:
            out[name] = attrs
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _restore_attributes(path: str, model: nn.Module, attributes: Dict[str, Dict[str, Any]]) -> None:
    for name, attrs in attributes.items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise ModelFileError(f"{path}: stored module {name!r} does not exist in the model; "
                                 "pass a freshly built model of the saved architecture") from None
        current = vars(m)
        for k, v in attrs.items():
            # only attributes the layer has: a different library version may have dropped one
            if k in current and _is_plain(current[k]) and not _same(current[k], v):
                object.__setattr__(m, k, v)


def _resize_tensors(path: str, model: nn.Module, state_dict: Dict[str, torch.Tensor],
                    structure: Dict[str, Dict[str, Any]]) -> None:
    """Give every parameter / buffer whose stored shape differs an empty (meta) tensor of that shape.

    Layers of the classes :func:`layer_spec` describes are left alone: their stored
    hyper-parameters fix their shapes, and weights that disagree with them are refused.
    """
    for key, value in state_dict.items():
        owner_name, _, attr = key.rpartition(".")
        if structure.get(owner_name, {}).get("known", True) is not False and owner_name in structure:
            continue
        try:
            owner = model.get_submodule(owner_name)
        except AttributeError:
            continue  # reported by the strict load_state_dict
        for table in (owner._parameters, owner._buffers):
            old = table.get(attr)
            if old is None or tuple(old.shape) == tuple(value.shape):
                continue
            new = torch.empty(value.shape, dtype=value.dtype, device="meta")
            table[attr] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new


# ---------------------------------------------------------------------------- metadata
def _check_plain(value, where: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata {where} has a non-str key {k!r}; only plain data can be saved")
            _check_plain(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"metadata {where} is a {type(value).__name__}; only plain data (str, int, float, bool, None, "
                    "lists, dicts with str keys) can be saved without pickling")


# ---------------------------------------------------------------------------- the file container
# One container for every file lopfast writes (models, teachers, stage outputs, training
# checkpoints): torch's zip archive holding one dict of tensors and plain data, with a "format"
# marker, a "version" and, from version 3, a "digest" of everything else in it. Written through
# the one atomic writer; read with weights_only=True and the digest checked at every load.


def _feed(h, obj) -> None:
    # a canonical, typed encoding: the digest of a payload is the same before torch.save and
    # after torch.load (lists and tuples alike, dict order ignored, floats exact)
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        h.update(b"I%s;" % int.__repr__(obj).encode())
    elif isinstance(obj, float):
        h.update(b"F%s;" % float.__repr__(obj).encode())
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(b"S%d:" % len(data))
        h.update(data)
    elif isinstance(obj, torch.Tensor):
        _feed_tensor(h, obj)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d[" % len(obj))
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            kh = hashlib.sha256()
            _feed(kh, k)
            items.append((kh.digest(), v))
        items.sort(key=lambda kv: kv[0])
        h.update(b"D%d{" % len(items))
        for k, v in items:
            h.update(k)
            _feed(h, v)
        h.update(b"}")
        extra = getattr(obj, "__dict__", None)  # a state_dict's _metadata (module versions) travels with it
        if extra:
            h.update(b"A")
            _feed(h, dict(extra))
    elif isinstance(obj, (torch.dtype, torch.device)):
        h.update(b"O%s;" % str(obj).encode())
    else:
        raise TypeError(f"a {type(obj).__name__} cannot be stored in a lopfast file (tensors and plain data only)")


def _feed_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"a {t.layout} / quantized tensor cannot be stored in a lopfast file (dense tensors only)")
    t = t.cpu().resolve_conj().resolve_neg().contiguous()
    h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def content_digest(payload: Any) -> str:
    """``"sha256:<hex>"`` of ``payload``: every tensor's dtype, shape and bytes and every plain value, with
    the names that hold them. Independent of dict order and of the device the tensors are on."""
    h = hashlib.sha256()
    _feed(h, payload)
    return "sha256:" + h.hexdigest()


def write_payload(path: PathLike, payload: Dict[str, Any], *, what: str = "model file",
                  make_dirs: bool = False) -> None:
    """Write ``payload`` (a dict of tensors and plain data) as a lopfast file: its digest recorded
    under ``"digest"`` (any digest already there is replaced), written atomically with
    :func:`lopfast.files.write_atomic` (a failed write leaves the old file). ``what`` names the kind
    of file in errors."""
    if not isinstance(payload, dict):
        raise TypeError(f"payload must be a dict, got {type(payload).__name__}")
    body = {k: v for k, v in payload.items() if k != "digest"}
    body["digest"] = content_digest(body)  # computed before the key exists: it covers everything else
    write_atomic(path, lambda f: torch.save(body, f), what=what, make_dirs=make_dirs)


def read_payload(path: PathLike, map_location=None, *, what: str = "model file") -> Dict[str, Any]:
    """Read any file lopfast writes and check its content; returns the payload dict.

    Refused with :class:`ModelFileError` naming ``path``: not a zip archive (empty, truncated,
    another kind of file), pickled objects other than tensors and plain data (``weights_only``),
    content that does not match its recorded digest, a current-version file without one, and, for
    files written before lopfast recorded digests, a record whose zip CRC-32 fails.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what}: {path!r}")
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: is a directory, not a {what}")
    if not os.path.isfile(path):  # a FIFO or a device would block or never end
        raise ModelFileError(f"{path}: not a regular file")
    if isinstance(map_location, str):
        try:
            torch.device(map_location)
        except (RuntimeError, TypeError):
            raise InvalidArgument("map_location", map_location, "a torch device ('cpu', 'cuda:0', ...), "
                                  "a torch.device, a dict or a callable, as for torch.load") from None
    if not zipfile.is_zipfile(path):
        # lopfast always writes torch's zip format: anything else is not one of its files
        # (and torch.load would misreport random bytes as "pickled objects")
        raise ModelFileError(f"{path}: not a lopfast {what} (not the zip archive lopfast and torch.save write: "
                             "empty, truncated, or another kind of file)")
    payload = _torch_load(path, map_location, what)
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: not a lopfast {what} (it holds a {type(payload).__name__}, not a dict)")
    _verify(path, payload, what)
    return payload


def _torch_load(path: str, map_location, what: str):
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: refused to load: the file contains pickled objects other than tensors "
                             f"and plain data (weights_only=True): {_first_line(e)}") from None
    except RuntimeError as e:
        if "map_location" in str(e):  # saved on a device this machine lacks
            raise ModelFileError(f"{path}: the tensors were saved on a device that is not available here; "
                                 f"pass map_location='cpu': {_first_line(e)}") from None
        raise ModelFileError(f"{path}: not a readable lopfast {what} (truncated or corrupt?): "
                             f"{type(e).__name__}: {_first_line(e)}") from None
    except Exception as e:  # truncated/corrupt archives also surface as EOFError, OSError, zip errors...
        raise ModelFileError(f"{path}: not a readable lopfast {what} (truncated or corrupt?): "
                             f"{type(e).__name__}: {_first_line(e)}") from None


def _verify(path: str, payload: Dict[str, Any], what: str) -> None:
    recorded = payload.get("digest")
    if recorded is None:
        version = payload.get("version")
        if payload.get("format") in (FORMAT, CHECKPOINT_FORMAT) and isinstance(version, int) and version >= 3:
            raise ModelFileError(f"{path}: a version-{version} lopfast {what} without its digest (removed or "
                                 "damaged): its content cannot be checked")
        _check_zip_crcs(path, what)  # an older file: the check it can have
        return
    try:
        actual = content_digest({k: v for k, v in payload.items() if k != "digest"})
    except TypeError:
        actual = None
    if actual != recorded:
        raise ModelFileError(f"{path}: damaged: its content does not match the digest recorded when it was written "
                             "(bytes changed on disk or in a copy, or the file was edited); copy it again, or delete "
                             "it and rerun what wrote it")


def _check_zip_crcs(path: str, what: str) -> None:
    # torch's reader skips the CRC-32 every zip record carries; Python's zipfile checks it
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ModelFileError(f"{path}: damaged {what}: {type(e).__name__}: {_first_line(e)}") from None
    if bad is not None:
        raise ModelFileError(f"{path}: damaged {what}: record {bad!r} fails its CRC check (bytes changed on disk or "
                             "in a copy); copy it again, or delete it and rerun what wrote it")


def _is_old_checkpoint(payload: Dict[str, Any]) -> bool:
    # checkpoints of lopfast versions before they carried a format marker
    return "format" not in payload and {"epoch", "model", "optimizer"} <= set(payload)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Write a training checkpoint: ``state`` (tensors and plain data) in lopfast's file format, its
    digest recorded, missing folders created, atomically (the previous checkpoint stays whole
    until the new one is complete)."""
    write_payload(path, {**state, "format": CHECKPOINT_FORMAT, "version": VERSION}, what="checkpoint",
                  make_dirs=True)


def load_checkpoint(path: PathLike, map_location="cpu") -> Dict[str, Any]:
    """Read a training checkpoint (:func:`save_checkpoint`, or one an older lopfast wrote), its content
    checked as :func:`read_payload` does; a model file or another file is refused naming ``path``."""
    ck = read_payload(path, map_location, what="checkpoint")
    path = os.fspath(path)
    if ck.get("format") == FORMAT:
        raise ModelFileError(f"{path}: a model file, not a training checkpoint (ckpt.pt beside it holds the "
                             "training state)")
    if ck.get("format") != CHECKPOINT_FORMAT and not _is_old_checkpoint(ck):
        raise ModelFileError(f"{path}: not a lopfast training checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    version = ck.get("version", 2)
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION:
        raise ModelFileError(f"{path}: unsupported checkpoint version {version!r} (this lopfast reads up to "
                             f"{VERSION})")
    return ck


# ---------------------------------------------------------------------------- save / load
def save(model: nn.Module, path: PathLike, **metadata) -> None:
    """Save ``model`` to ``path`` without pickled classes (loadable with weights_only=True).

    ``metadata`` must be plain data; ``arch`` (str) and ``arch_kwargs`` (dict) name a
    builder registered with :func:`register_architecture` so that ``load(path)`` can rebuild
    the model by itself. The file records the digest of its content, checked by every load
    (docs/files.md). It is written atomically (temporary file, then rename), as
    ``torch.save`` users expect: an existing file keeps its permission bits, a new one gets
    the umask's (0644 under the usual 022), and a symlink is written through (its target is
    replaced, the link stays). Errors name ``path``, never the temporary file; a failed save
    leaves an existing file untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    _check_plain(metadata, "")
    if "arch" in metadata and not isinstance(metadata["arch"], str):
        raise TypeError(f"metadata arch must be a str, got {type(metadata['arch']).__name__}")
    if "arch_kwargs" in metadata and not isinstance(metadata["arch_kwargs"], dict):
        raise TypeError(f"metadata arch_kwargs must be a dict, got {type(metadata['arch_kwargs']).__name__}")
    state_dict = model.state_dict()
    sd_meta = getattr(state_dict, "_metadata", None) or {}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "structure": model_structure(model),
        "attributes": module_attributes(model),
        "training": bool(model.training),
        # plain tensors: a Parameter would still load, but plain is what weights_only is sure of
        "state_dict": {k: v.detach() for k, v in state_dict.items() if isinstance(v, torch.Tensor)},
        # per-module versions ({"version": 2}): layers such as MNASNet's upgrade older layouts on
        # load when the version is missing, and refuse to guess
        "state_dict_metadata": {k: dict(v) for k, v in sd_meta.items() if _is_plain(dict(v))},
        "metadata": dict(metadata),
    }
    try:
        write_payload(path, payload, what="model file")
    except IsADirectoryError:
        raise InvalidArgument("path", os.fspath(path), "a file path, not a directory") from None


def read(path: PathLike, map_location=None) -> Dict[str, Any]:
    """Read and validate a lopfast model file; returns its payload dict. Never unpickles objects.

    The content is checked first (:func:`read_payload`: the digest, or the zip CRCs of a file
    written before files carried one), then the layout of a model file.
    """
    payload = read_payload(path, map_location, what="model file")
    path = os.fspath(path)
    if payload.get("format") == CHECKPOINT_FORMAT or _is_old_checkpoint(payload):
        raise ModelFileError(f"{path}: a training checkpoint (weights, optimizer, epoch), not a model file; load the "
                             "model.pt its stage writes when it ends, or resume the run")
    if payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a lopfast model file (no format marker {FORMAT!r}); "
                             "was it written by lopfast.save?")
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version > VERSION or version < 1:
        raise ModelFileError(f"{path}: unsupported lopfast model file version {version!r} (this lopfast reads "
                             f"up to {VERSION})")
    sd, structure, meta = payload.get("state_dict"), payload.get("structure"), payload.get("metadata")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ModelFileError(f"{path}: malformed state_dict (expected str -> tensor)")
    if not isinstance(structure, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("type"), str) for k, v in structure.items()):
        raise ModelFileError(f"{path}: malformed structure table")
    if not isinstance(meta, dict):
        raise ModelFileError(f"{path}: malformed metadata (expected a dict)")
    attributes = payload.setdefault("attributes", {})
    if not isinstance(attributes, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and all(isinstance(a, str) for a in v)
            for k, v in attributes.items()):
        raise ModelFileError(f"{path}: malformed attributes table")
    sd_meta = payload.setdefault("state_dict_metadata", {})
    if not isinstance(sd_meta, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in sd_meta.items()):
        raise ModelFileError(f"{path}: malformed state_dict metadata")
    return payload


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load(path: PathLike, model: Optional[nn.Module] = None, map_location=None, *,
         allow_nonfinite: bool = False) -> nn.Module:
    """Load a model saved by :func:`save`.

    Args:
        path: the file.
        model: a freshly built *original* (unpruned, unexpanded) instance of the
            architecture; its layers are replaced or resized where the stored structure
            differs (modified in place and returned). Without it, the metadata's ``arch`` is
            built with the registered builder (``arch_kwargs``): a zoo name, ``tv:<name>``,
            ``timm:<name>`` or a name registered with :func:`register_architecture`.
        map_location: as for ``torch.load`` (``None`` keeps the saved devices).
        allow_nonfinite: load weights that hold NaN / inf (refused by default: a diverged run
            or a damaged file; pass True to inspect one).

    Raises ModelFileError (a ValueError naming the path) for corrupt, truncated or
    pickle-carrying files, for content that does not match the file's digest, for stored
    weights with NaN / inf (unless ``allow_nonfinite``) and for files that do not fit
    ``model``. The saved metadata is
    ``lopfast.io.read(path)["metadata"]``.
    """
    check_bool(allow_nonfinite, "allow_nonfinite")
    if model is not None and not isinstance(model, nn.Module):
        raise InvalidArgumentType("model", model, "an nn.Module (a freshly built original) or None")
    payload = read(path, map_location=map_location)
    path = os.fspath(path)
    if not allow_nonfinite:
        bad = nonfinite(payload["state_dict"].items())
        if bad:
            raise ModelFileError(f"{path}: the stored weights hold NaN or infinite values (in "
                                 f"{', '.join(bad[:5])}{f' and {len(bad) - 5} more' if len(bad) > 5 else ''}): a "
                                 "diverged run or a damaged file; lopfast.load(path, allow_nonfinite=True) loads "
                                 "it anyway (to inspect it)")
    meta = payload["metadata"]
    if model is None:
        model = _build_from_metadata(path, meta)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
    for name, spec in payload["structure"].items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ModelFileError(f"{path}: stored layer {name!r} does not exist in the model given; "
                                 "pass a freshly built model of the saved architecture") from None
        if layer_spec(current) == spec:
            continue
        if spec.get("known") is False:
            raise ModelFileError(f"{path}: layer {name!r} is a {type(current).__name__} in the model given but was "
                                 f"saved as {spec['type']}, which lopfast cannot rebuild")
        try:
            new = build_layer(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{path}: invalid structure entry for layer {name!r}: {type(e).__name__}: {e}") from None
        new.train(current.training)
        if name == "":
            model = new
        else:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    _restore_attributes(path, model, payload["attributes"])
    _resize_tensors(path, model, payload["state_dict"], payload["structure"])
    state_dict = OrderedDict(payload["state_dict"])
    state_dict._metadata = OrderedDict((k, dict(v)) for k, v in payload["state_dict_metadata"].items())  # type: ignore[attr-defined]
    try:
        # assign=True takes the stored tensors themselves, which materialises the meta layers
        model.load_state_dict(state_dict, strict=True, assign=True)
    except (RuntimeError, ValueError, KeyError) as e:  # a layer's own loader may raise any of them
        raise ModelFileError(f"{path}: the stored weights do not fit the model: {e}") from None
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ModelFileError(f"{path}: no stored values for {leftover[:5]}")
    model.train(bool(payload.get("training", model.training)))
    return model


def _build_from_metadata(path: str, meta: Dict[str, Any]) -> nn.Module:
    arch = meta.get("arch")
    kwargs = meta.get("arch_kwargs") or {}
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: the file names no architecture (metadata 'arch'); pass model=<freshly "
                             "built original> to load it")
    if not isinstance(kwargs, dict):
        raise ModelFileError(f"{path}: metadata 'arch_kwargs' must be a dict")
    builder = _ARCHITECTURES.get(arch)
    if builder is None:
        for prefix, family in _PREFIXES.items():
            if arch.startswith(prefix):
                builder = lambda _f=family, **kw: _f(arch, **kw)  # noqa: E731
                break
    if builder is None:
        builder = _torchvision_builder(arch)
    if builder is None:
        raise ModelFileError(f"{path}: architecture {arch!r} is not registered (lopfast.io.register_architecture) "
                             "and torchvision does not provide it; pass model= instead")
    model = builder(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder registered for {arch!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _torchvision_builder(arch: str):
    name = arch[len("torchvision."):] if arch.startswith("torchvision.") else arch
    try:  # imported lazily: torchvision is optional and heavy
        import torchvision
    except Exception:
        return None
    try:
        if name not in torchvision.models.list_models():
            return None
    except AttributeError:  # very old torchvision
        return getattr(torchvision.models, name, None)
    return lambda **kw: torchvision.models.get_model(name, **kw)
