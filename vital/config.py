"""Configuration: a CFG dataclass becomes an argument parser.

Precedence is defaults < ``--json_cfg FILE`` < command line. Unknown keys in the JSON file fail and
name the valid ones. ``--dump_cfg FILE`` writes the resolved configuration (loadable again with
``--json_cfg``). Also here: run-folder creation (a finished run is never overwritten), determinism,
device resolution and the metadata written next to every result.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import torch

from vital.cache import write_json

__all__ = ["opt", "parse_cfg", "packaged", "check_cfg", "recipe_values", "with_recipe", "cfg_to_dict", "dump_cfg", "load_json_cfg", "make_run_dir",
           "set_determinism", "resolve_device", "run_metadata", "ConfigError", "Overrides",
           "check_overrides"]

# Keys that steer parsing itself; they are accepted on the command line but never stored.
_META_KEYS = ("json_cfg", "dump_cfg")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what is valid."""


def opt(default, help: str, **kw):
    """A CFG field with a help line: ``steps: int = opt(400, "optimisation steps")``.

    Keywords go into the field's metadata: ``choices=[...]``; for bool fields
    ``negative_flags=("--no_x",)`` adds extra spellings of ``--no-<field>``. The valid range is
    declared here too and checked by :func:`check_cfg` (for every element of a list field):
    ``low=`` / ``high=`` (inclusive bounds), ``positive=True`` (> 0).
    """
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _field_kind(cfg_cls, field: dataclasses.Field):
    """(base type, is_sequence) of a field, resolving string annotations."""
    hints = typing.get_type_hints(cfg_cls)
    tp = hints[field.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        tp = args[0]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (list, tuple):
        return (args[0] if args else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _build_parser(cfg_cls, description: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description or cfg_cls.__doc__,
                                     argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--json_cfg", metavar="FILE",
                        help="load settings from a JSON file (the command line overrides it)")
    parser.add_argument("--dump_cfg", metavar="FILE",
                        help="write the resolved configuration as JSON to FILE and exit")
    for field in dataclasses.fields(cfg_cls):
        base, seq = _field_kind(cfg_cls, field)
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{field.metadata.get('help', '')} (default: {default!r})"
        choices = field.metadata.get("choices")
        name = f"--{field.name}"
        if base is bool and not seq:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text)
            for flag in field.metadata.get("negative_flags", ()):  # e.g. --no_determinism
                parser.add_argument(flag, dest=field.name, action="store_false",
                                    help=f"same as --no-{field.name}")
        elif seq:
            parser.add_argument(name, nargs="*", type=base, help=help_text, choices=choices)
        else:
            parser.add_argument(name, type=base, help=help_text, choices=choices)
    return parser


# Folders of data files that ship inside the package (vital/presets, vital/input_prompts).
PACKAGE_DATA = ("presets", "input_prompts")


def packaged(path: str | os.PathLike) -> Path:
    """``path``, or the file of that name that ships inside the package when ``path`` is a
    relative ``presets/...`` or ``input_prompts/...`` path not found from the working
    directory: ``--json_cfg presets/quickstart_efficientnet.json`` works from any folder, in a
    checkout and in an installed package alike. Anything else is returned unchanged."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in PACKAGE_DATA:
        return path
    from importlib.resources import files
    shipped = Path(str(files("vital").joinpath(*path.parts)))
    return shipped if shipped.exists() else path


def load_json_cfg(cfg_cls, path: str | os.PathLike) -> dict:
    """Read a JSON config (``presets/...`` also from the package: :func:`packaged`); unknown
    keys fail and name the valid ones."""
    path = packaged(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give a JSON file (e.g. one written "
                          f"by --dump_cfg)")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); save it as "
                          f"UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"config file {path} is not valid JSON: {err}") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object, got {type(data).__name__}")
    valid = [f.name for f in dataclasses.fields(cfg_cls)]
    unknown = [k for k in data if k not in valid and k not in _META_KEYS]
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ConfigError(f"unknown key(s) in {path}: {said}. Valid keys: {', '.join(valid)}")
    return {k: v for k, v in data.items() if k not in _META_KEYS}


def coerce(cfg_cls, values: dict) -> dict:
    """Give JSON values the field's type (lists for sequence fields, float for ints in float fields)."""
    out = {}
    fields = {f.name: f for f in dataclasses.fields(cfg_cls)}
    for key, value in values.items():
        base, seq = _field_kind(cfg_cls, fields[key])
        items = value if seq and isinstance(value, (list, tuple)) else [value]
        if base in (int, float) and any(isinstance(v, bool) for v in items):
            raise ConfigError(f"bad value for {key!r}: {value!r} is true/false, not a number")
        try:
            if seq and value is not None:   # None stays None: check_cfg says what is valid
                value = [base(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
            elif value is not None and base in (int, float, str):
                if base is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError(f"{value} is not an integer")
                value = base(value)
            elif base is bool and not isinstance(value, bool):
                value = _parse_bool(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
            raise ConfigError(f"bad value for {key!r}: {value!r} ({err})") from None
        out[key] = value
    return out


def _split_top(text: str) -> list[str]:
    """Split at commas outside brackets and quotes: "a=[1,2],b=x" -> ["a=[1,2]", "b=x"]."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


class Overrides:
    """Settings of a CFG as a field type: a JSON object, or ``key=value,key=value`` on the
    command line (values are read as JSON when they parse, else as text); checked against a
    CFG's fields with ``check_overrides``."""

    def __new__(cls, value) -> dict:
        if isinstance(value, dict):
            return dict(value)
        if not isinstance(value, str):
            raise argparse.ArgumentTypeError(f"settings must be an object or key=value text, "
                                             f"got {value!r}")
        out = {}
        for item in filter(None, (s.strip() for s in _split_top(str(value)))):
            key, sep, text = item.partition("=")
            if not sep:
                raise argparse.ArgumentTypeError(f"settings item {item!r} is not key=value")
            try:
                out[key.strip()] = json.loads(text)
            except json.JSONDecodeError:
                out[key.strip()] = text
        return out


def check_overrides(cfg_cls, overrides: dict, what: str, fixed: dict[str, str] | None = None) -> dict:
    """``overrides`` (an ``Overrides`` dict) checked against ``cfg_cls``'s fields and coerced to
    their types: an unknown key names the valid ones, a key in ``fixed`` (key -> who sets it)
    says who sets it instead."""
    fixed = fixed or {}
    valid = [f.name for f in dataclasses.fields(cfg_cls) if f.name not in fixed]
    unknown = [k for k in overrides if k not in valid and k not in fixed]
    if unknown:
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ConfigError(f"unknown setting(s) {said} in {what}; valid {cfg_cls.__name__} keys: "
                          f"{', '.join(valid)}")
    taken = [k for k in overrides if k in fixed]
    if taken:
        raise ConfigError(f"{what} sets {taken[0]!r}, which {fixed[taken[0]]} sets; drop it there")
    return coerce(cfg_cls, overrides)


def recipe_values(cfg_cls, name: str | None = None) -> dict:
    """The settings of a recipe (a named set of defaults, ``cfg_cls.RECIPES[name]``; ``None`` =
    the class's default ``recipe`` field). Precedence: defaults < recipe < --json_cfg <
    command line, so a recipe only fills what the user did not set."""
    recipes = getattr(cfg_cls, "RECIPES", None)
    if not recipes:
        return {}
    if name is None:
        name = next(f.default for f in dataclasses.fields(cfg_cls) if f.name == "recipe")
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r}; valid: {', '.join(recipes)}")
    return dict(recipes[name])


class RecipeDefaults:
    """A CFG whose class has ``RECIPES``, built in Python, gets its recipe's settings for every
    field it was not given, with the scripts' precedence (defaults < recipe < given values):
    ``ClassCFG(recipe="paper", target="tabby")`` renders with the paper's settings. The fields
    given are seen in ``__new__`` (which receives the constructor's arguments; a dataclass
    generates only ``__init__``), so a subclass's own dataclass ``__init__`` keeps working, and
    ``dataclasses.replace`` (which passes every field) never re-applies a recipe."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        self.__dict__["_given"] = frozenset(names[:len(args)]) | frozenset(kwargs)
        return self

    def __post_init__(self):
        given = self.__dict__.pop("_given", None)
        if given is None or not getattr(type(self), "RECIPES", None):
            return
        left = {k: v for k, v in recipe_values(type(self), self.recipe).items()
                if k not in given}
        for key, value in coerce(type(self), left).items():
            setattr(self, key, value)


def with_recipe(cfg_cls, recipe: str | None = None, /, **overrides):
    """A CFG built in Python with the same precedence as the scripts: defaults < recipe <
    ``overrides`` (``with_recipe(ClassCFG, "paper", target="tabby")``); a ``recipe`` key among
    the overrides names the recipe too."""
    recipe = overrides.get("recipe", recipe)
    values = {**recipe_values(cfg_cls, recipe), **overrides}
    if recipe is not None:
        values["recipe"] = recipe
    return cfg_cls(**coerce(cfg_cls, values))


def _optional(cfg_cls, field: dataclasses.Field) -> bool:
    """Whether ``None`` is a valid value of the field (``X | None`` annotation)."""
    tp = typing.get_type_hints(cfg_cls)[field.name]
    return type(None) in typing.get_args(tp)


def _range_problem(value, meta: dict) -> str | None:
    """What is wrong with one number under the field's declared range, or None."""
    low, high = meta.get("low"), meta.get("high")
    if meta.get("positive") and not value > 0:   # written so that NaN fails too
        return "a number > 0"
    if low is not None and high is not None and not low <= value <= high:
        return f"in {low}..{high}"
    if low is not None and not value >= low:
        return f">= {low}"
    if high is not None and not value <= high:
        return f"<= {high}"
    return None


def _declared_default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else None


def _check_conflicts(cfg) -> None:
    """``CONFLICTS`` of a CFG class: pairs of options that ask for different things; both away
    from their defaults is one sentence instead of one of them silently ignored."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for first, second, why in getattr(type(cfg), "CONFLICTS", ()):
        if all(getattr(cfg, n) != _declared_default(fields[n]) for n in (first, second)):
            raise ConfigError(f"--{first} and --{second} both given: {why}; give one of them")


def check_cfg(cfg) -> None:
    """Check every field of a CFG against its declared type and range (``opt(low=, high=,
    positive=)``); the first problem raises :class:`ConfigError` naming the option, the value and
    what is valid. ``parse_cfg`` calls it; so does the runner for CFGs built in Python."""
    cls = type(cfg)
    _check_conflicts(cfg)
    for field in dataclasses.fields(cls):
        value, meta = getattr(cfg, field.name), field.metadata
        base, seq = _field_kind(cls, field)
        if value is None:
            if _optional(cls, field):
                continue
            raise ConfigError(f"--{field.name} must be {'a list' if seq else base.__name__}, "
                              f"got null / None")
        items = list(value) if seq and isinstance(value, (list, tuple)) else [value]
        for item in items:
            numeric = isinstance(item, (int, float)) and not isinstance(item, bool)
            if base in (int, float) and not numeric or base is int and isinstance(item, float):
                raise ConfigError(f"--{field.name} must be {base.__name__}, got {item!r}")
            problem = _range_problem(item, meta) if numeric else None
            choices = meta.get("choices")
            if choices is not None and item not in choices:   # argparse checks the command line only
                problem = f"one of {', '.join(map(str, choices))}"
            if problem:
                help_text = meta.get("help", "")
                raise ConfigError(f"--{field.name} {item!r} is not valid: it must be {problem}"
                                  + (f" ({help_text})" if help_text else ""))


def parse_cfg(cfg_cls, argv: list[str] | None = None, description: str | None = None):
    """Resolve a CFG from defaults, ``--json_cfg`` and ``argv``; handle ``--dump_cfg``.

    Returns the CFG instance. With ``--dump_cfg FILE`` the resolved config is written and the
    process exits (status 0), so ``--dump_cfg`` then ``--json_cfg`` round-trips.
    """
    parser = _build_parser(cfg_cls, description)
    args = vars(parser.parse_args(argv))
    values = {}
    try:
        if "json_cfg" in args:
            values.update(load_json_cfg(cfg_cls, args["json_cfg"]))
        values.update({k: v for k, v in args.items() if k not in _META_KEYS})
        values = {**recipe_values(cfg_cls, values.get("recipe")), **values}
        cfg = cfg_cls(**coerce(cfg_cls, values))
        check_cfg(cfg)
        if "dump_cfg" in args:
            dump_cfg(cfg, args["dump_cfg"])
    except ConfigError as err:
        parser.error(str(err))
    if "dump_cfg" in args:
        print(f"wrote {args['dump_cfg']}")
        sys.exit(0)
    return cfg


def cfg_to_dict(cfg) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def dump_cfg(cfg, path: str | os.PathLike) -> None:
    """Write the resolved CFG as JSON; a path that cannot be written -> ConfigError."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, cfg_to_dict(cfg))
    except OSError as err:
        raise ConfigError(f"cannot write the configuration to {path}: "
                          f"{err.strerror or err}") from None


def make_run_dir(out_dir: str | os.PathLike, run_name: str) -> Path:
    """Create ``out_dir/run_name``; if it exists, take ``run_name_2``, ``_3``... (never overwrite)."""
    base = Path(out_dir)
    safe = "".join(c if c.isalnum() or c in "-_.=+" else "_" for c in run_name).strip("._") or "run"
    try:
        base.mkdir(parents=True, exist_ok=True)
        for k in range(1, 10_000):
            path = base / (safe if k == 1 else f"{safe}_{k}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:   # a file in the way, a read-only or full disk
        raise ConfigError(f"cannot create the run folder under {base}: "
                          f"{err.strerror or err}") from None
    raise ConfigError(f"too many runs named {safe!r} in {base}")


def set_determinism(seed: int, deterministic: bool = True, hard: bool = False) -> None:
    """Seed every generator; ``deterministic`` fixes cuDNN; ``hard`` forbids nondeterministic ops
    and runs CPU work on one thread (bit-identical PNGs, slower)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic or hard:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if hard:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        # multi-threaded CPU kernels (e.g. convolution backward) may sum in a different order
        # from run to run: one thread makes CPU runs bit-identical (measured on EfficientNet-Lite0)
        torch.set_num_threads(1)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is available; use cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _installed_version(package: str) -> str | None:
    """The installed version of ``package`` from its metadata: importing torchvision only for
    its version costs ~1.9 s per run (it pulls in torch._dynamo)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(cfg, argv: list[str] | None = None, **extra) -> dict:
    """Resolved config plus argv, versions and git commit: what config.json stores."""
    return {
        "cfg": cfg_to_dict(cfg),
        "argv": list(sys.argv if argv is None else argv),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torchvision": _installed_version("torchvision"),
                     "numpy": np.__version__},
        "git_commit": _git_commit(),
        **extra,
    }


def parse_units(tokens, count: int, what: str = "neuron") -> list[int]:
    """Unit indices from what a user wrote: numbers, ranges ``a-b`` (both ends included) and
    ``all`` (every one of ``count``), e.g. ``["3", "17", "40"]``, ``["0-63"]``, ``["all"]``,
    in the order given. A unit named twice, out of range or unreadable is a ConfigError that
    says what is valid."""
    out: list[int] = []
    for token in tokens:
        text = str(token).strip().lower()
        if text == "all":
            out += range(count)
            continue
        low, dash, high = text.partition("-")
        try:
            first, last = (int(low), int(high)) if dash and low else (int(text), int(text))
        except ValueError:
            raise ConfigError(f"{what} {token!r} is not a number, a range like 0-63 or 'all'"
                              ) from None
        if first > last:
            raise ConfigError(f"{what} range {token!r} runs backwards; write {last}-{first}")
        out += range(first, last + 1)
    bad = sorted({u for u in out if not 0 <= u < count})
    if bad:
        raise ConfigError(f"{what}s {bad[:5]}{' ...' if len(bad) > 5 else ''} are out of range: "
                          f"valid 0..{count - 1} ({count} {what}s)")
    twice = sorted({u for u in out if out.count(u) > 1})
    if twice:
        raise ConfigError(f"{what}s {twice[:5]} are named twice; name each once")
    return out
