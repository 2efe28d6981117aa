"""Settings declared once: each one's default, check, command-line flag and help in one place.

A setting is a field of a config dataclass (:class:`~lopfast.pipeline.config.RunConfig`,
:class:`~lopfast.pipeline.train.TrainConfig`, :class:`~lopfast.pipeline.runner.Plan`) declared
with :func:`setting`: the field's default, and in its metadata a :class:`Setting` holding the
check, the help, the flag group and, where the field's type does not say it, how a flag's text
becomes a value. Everything else is derived from that one declaration:

* the checks, the same at every entry: the config's constructor, ``from_dict`` (a ``--config``
  file), ``train(...)``, the command line: :func:`check_fields`;
* the command-line flags of each command, their help with the default: :func:`add_flags`;
* the table of ``docs/configuration.md`` (a test compares it with the declarations): :func:`markdown_table`.

A setting every training stage shares is declared once on
:class:`~lopfast.pipeline.train.TrainSettings`, which ``RunConfig`` and ``TrainConfig`` both
extend: it is then a flag, a key of ``config.json`` and a field of what ``train()`` takes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from lopfast.checks import (
    InvalidArgument,
    InvalidArgumentType,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    check_str_list,
    closest,
    range_words,
)

__all__ = ["GROUP_COMMANDS", "Check", "Setting", "Settings", "add_flags", "boolean", "check_fields", "choice",
           "csv_list", "custom", "declared", "flags", "from_dict", "integer", "json_object", "like", "markdown_table",
           "names", "number", "optional", "setting", "text"]

#: which commands show the flags of each group (a setting's ``commands`` narrows it)
GROUP_COMMANDS: Dict[str, Tuple[str, ...]] = {
    "run": ("demo", "pretrain", "prune", "run", "sweep"),
    "model and data": ("demo", "pretrain", "prune", "run", "sweep"),
    "training": ("demo", "pretrain", "prune", "run", "sweep"),
    "pruning": ("demo", "prune", "run", "sweep"),
    "recovery": ("demo", "run", "sweep"),
}


# ---------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Check:
    """A setting's check: ``check(value, name)`` returns the value (normalised) or raises
    :class:`~lopfast.checks.InvalidArgument` naming ``name``; ``accepted`` says in words what passes;
    ``options``: the values a choice accepts (its flag shows them)."""

    fn: Callable[[Any, str], Any]
    accepted: str
    options: Tuple[Any, ...] = ()

    def __call__(self, value: Any, name: str) -> Any:
        return self.fn(value, name)


def integer(*, min: Optional[int] = None, max: Optional[int] = None) -> Check:
    """An int (not a bool) in ``[min, max]``."""
    return Check(lambda v, n: check_int(v, n, min=min, max=max), range_words("int", min, max))


def number(*, min: Optional[float] = None, max: Optional[float] = None, min_open: bool = False,
           max_open: bool = False, accepted: Optional[str] = None, hint: str = "") -> Check:
    """A finite int or float (not a bool) in the interval."""
    words = accepted or range_words("number", min, max, min_open, max_open)
    return Check(lambda v, n: check_number(v, n, min=min, max=max, min_open=min_open, max_open=max_open,
                                           accepted=accepted, hint=hint), words)


def boolean() -> Check:
    """True or False."""
    return Check(check_bool, "True or False")


def choice(*options: Any) -> Check:
    """One of ``options``."""
    return Check(lambda v, n: check_choice(v, n, options), "one of " + ", ".join(repr(o) for o in options), options)


def text(*, empty: bool = False) -> Check:
    """A string (non-empty unless ``empty``)."""
    return Check(lambda v, n: check_str(v, n, empty=empty), "a string" if empty else "a non-empty string")


def names(*, empty: bool = False, unique: bool = True, among: Optional[Sequence[str]] = None) -> Check:
    """A list of names (a comma-separated string is split); each one of ``among`` when given."""
    def fn(v, n):
        v = check_str_list(v, n, empty=empty, unique=unique)
        for item in v if among is not None else ():
            check_choice(item, n, tuple(among))
        return v

    words = "a list of names" if among is None else "a list of " + ", ".join(repr(o) for o in among)
    return Check(fn, ("a possibly empty " if empty else "a non-empty ") + words[2:])


def optional(check: Check) -> Check:
    """``check``, or None (the setting's "use the default" value)."""
    return Check(lambda v, n: None if v is None else check(v, n), f"{check.accepted}, or None")


def custom(fn: Callable[[Any, str], Any], accepted: str) -> Check:
    """A check written out: ``fn(value, name) -> value``, raising InvalidArgument naming ``name``."""
    return Check(fn, accepted)


# ---------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Setting:
    """What a field's declaration holds besides its default (see :func:`setting`)."""

    check: Check
    help: str
    group: Optional[str] = None
    flag: Optional[str] = ""
    parse: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    default_text: Optional[str] = None
    commands: Optional[Tuple[str, ...]] = None

    def flag_for(self, name: str) -> Optional[str]:
        """The command-line flag (``--name-with-dashes`` unless declared otherwise), or None."""
        if self.group is None or self.flag is None:
            return None
        return self.flag or "--" + name.replace("_", "-")

    def shown_in(self, command: str) -> bool:
        """Whether ``command`` has this setting's flag."""
        return self.flag_for("x") is not None and command in (self.commands or GROUP_COMMANDS[self.group])


def setting(default: Any = MISSING, *, check: Check, help: str, group: Optional[str] = None, flag: Optional[str] = "",
            parse: Optional[Callable[[str], Any]] = None, metavar: Optional[str] = None,
            default_text: Optional[str] = None, commands: Optional[Sequence[str]] = None,
            default_factory: Any = MISSING, **field_kw) -> Any:
    """Declare a setting as a dataclass field: its default (or ``default_factory``), its ``check``,
    ``help`` (one line, without the default: that is added where it is shown), the flag ``group``
    (None: no flag, a Python-only setting), the ``flag`` (default ``--name-with-dashes``; None:
    none), ``parse`` (the flag's text to a value, when the field's type does not say it),
    ``default_text`` (how the default reads, when its value does not say it: a preset's number),
    ``commands`` (which commands show the flag; default: its group's)."""
    meta = Setting(check, help, group, flag, parse, metavar, default_text,
                   tuple(commands) if commands is not None else None)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"setting": meta}, **field_kw)


def like(cls, name: str, default: Any = MISSING, **changes) -> Any:
    """The declaration of setting ``name`` of ``cls`` again, for a config that gives it another
    ``default`` (or group, help ...): the same check and flag, one declaration."""
    f = cls.__dataclass_fields__[name]
    meta = dataclasses.replace(f.metadata["setting"], **changes)
    if default is MISSING:
        default = f.default
    return dataclasses.field(default=default, metadata={"setting": meta})


class Settings:
    """Base of a config dataclass whose fields are declared settings: checked when it is made
    (each by its declaration, then :meth:`_check_together`), and again by :meth:`validate`."""

    def __post_init__(self) -> None:
        self._check()

    def validate(self):
        """Check every setting (and those that depend on each other); raise
        :class:`~lopfast.checks.InvalidArgument` naming the bad one. Returns self."""
        self._check()
        return self

    def _check(self) -> None:
        check_fields(self)
        self._check_together()

    def _check_together(self) -> None:
        """The checks that involve several settings (none here)."""


def declared(cls_or_obj) -> List[Tuple[dataclasses.Field, Setting]]:
    """The declared settings of a config class (or instance), in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls_or_obj) if "setting" in f.metadata]


def check_fields(obj: Any) -> None:
    """Run every declared setting's check on ``obj`` and store the normalised values. A field of
    a config class without a declaration is an error: no setting escapes its check."""
    for f in dataclasses.fields(obj):
        if "setting" not in f.metadata:
            raise TypeError(f"{type(obj).__name__}.{f.name} is not declared with lopfast.pipeline.settings.setting() "
                            "(its check, help and flag)")
        object.__setattr__(obj, f.name, f.metadata["setting"].check(getattr(obj, f.name), f.name))


def from_dict(cls, d: Any, source: Optional[str] = None):
    """``cls(**d)`` with unknown keys refused ("did you mean"), naming ``source`` (a file) when given;
    a bad value's error names its key (and the file)."""
    where = f" in {source}" if source else ""
    if not isinstance(d, dict) or not all(isinstance(k, str) for k in d):
        raise InvalidArgumentType("config", d, f"a dict of settings (as in config.json){where}")
    keys = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(d) - keys)
    if unknown:
        near = {k: closest(k, keys) for k in unknown}
        hint = "".join(f" ({k!r}: did you mean {c!r}?)" for k, c in near.items() if c)
        raise ValueError(f"unknown config keys {unknown}{where}{hint}; valid keys: {sorted(keys)}")
    if not source:
        return cls(**d)
    try:
        return cls(**d)
    except InvalidArgument as exc:
        if exc.name not in d:
            raise
        raise type(exc)(exc.name, exc.value, exc.accepted, _joined(exc.hint, f"key {exc.name!r} of {source}")) \
            from None


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def default_words(f: dataclasses.Field, s: Setting) -> str:
    """How a setting's default reads in help and docs."""
    if s.default_text is not None:
        return s.default_text
    if f.default is MISSING and f.default_factory is MISSING:
        return "required"
    value = f.default if f.default is not MISSING else f.default_factory()
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, dict):
        return json.dumps(value) if value else "{}"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------- command line
def csv_list(kind):
    """A flag's comma-separated list of ``kind`` (``--methods ft,lop``; empty items dropped)."""
    def parse(s: str):
        items = [x.strip() for x in s.split(",") if x.strip()]
        try:
            return [kind(x) for x in items]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind.__name__}, got {s!r}")
    parse.__name__ = f"list of {kind.__name__}"
    return parse


def json_object(s: str) -> dict:
    """A flag's JSON object (``--model-kwargs '{"width": 16}'``)."""
    try:
        v = json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({exc})")
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


_PARSE = {"int": int, "float": float, "str": str, "List[str]": csv_list(str), "List[float]": csv_list(float),
          "Tuple[int, ...]": csv_list(int), "dict": json_object}


def _annotation(f: dataclasses.Field) -> str:
    ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    ann = ann.replace("typing.", "")
    return ann[len("Optional["):-1] if ann.startswith("Optional[") else ann


def add_flags(groups: Dict[str, Any], classes: Iterable[type], command: str) -> None:
    """Add the flag of every setting of ``classes`` that ``command`` shows to its argparse group
    (``groups[name]``). Unset flags stay absent from the parsed namespace (``argparse.SUPPRESS``),
    so ``--config`` files and command defaults show through."""
    for cls in classes:
        for f, s in declared(cls):
            if not s.shown_in(command):
                continue
            kw: Dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS)
            ann = _annotation(f)
            default = default_words(f, s)
            if ann == "bool" and f.default is False:
                kw.update(action="store_true", help=s.help)
            elif ann == "bool":
                kw.update(action=argparse.BooleanOptionalAction, help=f"{s.help} (default: {default})")
            else:
                parse = s.parse or _PARSE.get(ann)
                if parse is None:
                    raise TypeError(f"setting {f.name}: say how its flag's text becomes a {ann} (parse=...)")
                kw.update(type=parse, help=f"{s.help} (default: {default})")
                if s.metavar or s.check.options:
                    kw["metavar"] = s.metavar or "{" + ",".join(map(str, s.check.options)) + "}"
            groups[s.group].add_argument(s.flag_for(f.name), **kw)


def flags(classes: Iterable[type]) -> Dict[str, str]:
    """{setting name: its flag} over ``classes``."""
    return {f.name: s.flag_for(f.name) for cls in classes for f, s in declared(cls) if s.flag_for(f.name)}


# ---------------------------------------------------------------------------- docs
def markdown_table(rows: Iterable[Tuple[dataclasses.Field, Setting]], shared: Sequence[str] = ()) -> str:
    """A markdown table of settings: name (the ``config.json`` key and Python argument), flag,
    default, what is accepted, what it does; names in ``shared`` are marked with a dagger."""
    out = ["| setting | flag | default | accepted | what it does |", "|---|---|---|---|---|"]
    for f, s in rows:
        flag = s.flag_for(f.name)
        where = f"`{flag}`" if flag else "(no flag)"
        if flag and s.commands:
            where += " (" + ", ".join(s.commands) + ")"
        name = f"`{f.name}`" + (" †" if f.name in shared else "")
        out.append(f"| {name} | {where} | {_cell(default_words(f, s))} | {_cell(s.check.accepted)} | {_cell(s.help)} |")
    return "\n".join(out)


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")
