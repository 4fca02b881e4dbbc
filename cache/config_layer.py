"""One config layer under every command: typed dataclasses, a YAML file, then dotted ``key=value`` overrides.

The shape of DINOv3's ``configs/config.py``: a command's config is a (nested) dataclass; it is built from
its defaults, then a YAML file (``--config FILE``), then the command's flags (aliases of config keys),
then dotted ``key=value`` overrides, last wins. **One value syntax everywhere**: the text after ``=`` is
read as a YAML value (``optim.lr=1e-3``, ``data.flip=false``, ``image_size=[448,448]``,
``dataset_kwargs={split: validation, size: 8}``). Strict: an unknown key is an error naming the key and
the nearest valid ones; values are checked against the field types. The resolved config is written
next to the command's outputs (:func:`save_config`).

Stage 1 (``cache``), stage 2 (``distill.config``), evaluation, export and the demo all load through
:func:`load_typed`; nothing here imports ``teachers``, ``students`` or ``distill``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import logging
import math
import os
import types
import typing
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

logger = logging.getLogger(__name__)

T = TypeVar("T")

# free-form keyword-argument mappings: a file, then flags, then overrides merge into them one level deep
KWARGS_KEYS = ("kwargs", "dataset_kwargs", "teacher_kwargs")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def nearest(key: str, valid: list[str], n: int = 3) -> list[str]:
    """The valid keys closest to ``key`` (difflib), best first."""
    return difflib.get_close_matches(key, valid, n=n, cutoff=0.5)


def unknown_key_error(key: str, valid: list[str], prefix: str = "") -> ValueError:
    """``unknown config key 'optim.lrr'; did you mean 'lr'? valid keys under 'optim': lr, ...``."""
    full = f"{prefix}.{key}" if prefix else key
    close = nearest(key, valid)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = f" under {prefix!r}" if prefix else ""
    return ValueError(f"unknown config key {full!r}{hint} valid keys{where}: {', '.join(valid)}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ``TypeError`` naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"config key {key!r}: {value!r} matches none of {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r} must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise TypeError(f"config key {key!r} must be a list, got {value!r}")
        (a,) = typing.get_args(tp) or (Any,)
        return [coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise TypeError(f"config key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        a = args[0] if args else Any
        return tuple(coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"config key {key!r} must be a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"config key {key!r} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"config key {key!r} must be a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """``cls(**data)`` with every key checked (unknown: an error naming the nearest valid keys) and every
    value coerced to its field's annotated type; nested dataclass fields take nested mappings."""
    if not isinstance(data, dict):
        raise TypeError(f"config {prefix or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for k in data:
        if k not in names:
            raise unknown_key_error(str(k), names, prefix)
    kwargs = {k: coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def merge_dicts(
    base: dict[str, Any], upd: dict[str, Any], *, shallow: tuple[str, ...] = KWARGS_KEYS
) -> dict[str, Any]:
    """``upd`` merged into ``base`` recursively (a config file, then flags, then dotted overrides);
    the keys in ``shallow`` hold free-form kwargs and are merged one level deep only."""
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v} if k in shallow else merge_dicts(out[k], v, shallow=shallow)
        else:
            out[k] = v
    return out


def parse_value(raw: str) -> Any:
    """The one value syntax: ``raw`` read as a YAML value (``1e-3``, ``false``, ``[448, 448]``, ``{a: 1}``);
    ``""`` stays the empty string."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(
            f"cannot read {raw!r} as a YAML value ({e}); quote strings with ':' or '#' in them"
        ) from e


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=1e-3", "data.flip=false"]`` -> nested dict; values parsed as YAML (:func:`parse_value`)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (dotted keys, e.g. optim.lr=1e-3)")
        key, raw = item.split("=", 1)
        val = parse_value(raw)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = val
    return out


def parse_kwargs(items: list[str] | None, what: str) -> dict[str, Any]:
    """``["model_name=vit_b", "img_size=448"]`` -> ``{"model_name": "vit_b", "img_size": 448}`` (YAML values,
    :func:`parse_value`). An item that is a JSON object (``'{"a": 1}'``, the former syntax) is still read,
    with a deprecation warning naming ``what``."""
    out: dict[str, Any] = {}
    for item in items or []:
        item = item.strip()
        if item.startswith("{"):
            out.update(json_object(item, what))
            continue
        if "=" not in item:
            raise ValueError(f"{what}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object given where the one syntax is ``key=value``: read, with a deprecation warning."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {text!r} is neither key=value nor a JSON object ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{what} must be key=value pairs (or a JSON object), got {text!r}")
    logger.warning(
        "%s: JSON %s is deprecated; write key=value pairs (YAML values), e.g. %s",
        what,
        text,
        " ".join(f"{k}={json.dumps(v)}" for k, v in obj.items()) or "key=value",
    )
    return obj


def parse_teacher_spec(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """A teacher named the one way, as datasets are (``kind:value``, then ``key=value`` kwargs):

    ``timm:vit_base_patch14_reg4_dinov2`` -> ``("timm", {"model_name": ...})`` (the value fills the builder's
    first argument, :func:`teachers.base.location_kwarg`); ``embedded`` -> ``("embedded", {})``;
    ``package.module:factory`` is left as it is (an import path). The former ``NAME:{json}`` is read with a
    deprecation warning. ``kwargs`` (``teacher_kwargs``) win over what the spec sets.
    """
    from tipsdistill.teachers import list_teachers, location_kwarg

    kw = dict(kwargs or {})
    text = str(spec).strip()
    name, sep, rest = text.partition(":")
    if not sep or name not in list_teachers():
        return text, kw  # a registry name, or package.module:factory (cache.extract resolves it)
    if not rest:
        raise ValueError(f"teacher spec {text!r} names nothing after '{name}:'; write {name} or {name}:VALUE")
    if rest.lstrip().startswith("{"):
        return name, {**json_object(rest, f"teacher spec {name}:"), **kw}
    return name, {location_kwarg(name): rest, **kw}


def load_file(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    """A YAML (or JSON) file holding one mapping; errors name the file and what it must hold."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{what} file {p} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {p} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_typed(
    cls: type[T],
    file: str | os.PathLike[str] | None = None,
    data: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    *,
    shallow: tuple[str, ...] = KWARGS_KEYS,
) -> T:
    """``cls`` from its defaults, then ``file`` (YAML), then ``data`` (a command's flags), then dotted
    ``overrides``; strict and typed (:func:`from_dict`). Calls ``validate()`` when ``cls`` has one."""
    merged: dict[str, Any] = load_file(file, cls.__name__) if file else {}
    if data:
        merged = merge_dicts(merged, data, shallow=shallow)
    if overrides:
        merged = merge_dicts(merged, parse_overrides(overrides), shallow=shallow)
    cfg = from_dict(cls, merged)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        out = validate()
        cfg = out if isinstance(out, cls) else cfg
    return cfg


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> dict[str, Any]:
    """The flags ``argv`` sets explicitly (``dest -> value``), argparse's defaults left out: a flag is an
    alias of a config key and must not overwrite the ``--config`` file's value unless it is typed.
    ``key=value`` overrides may sit between the flags (``parse_intermixed_args``)."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return vars(quiet.parse_intermixed_args(argv))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML-safe data (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def package_versions() -> dict[str, str]:
    """Versions of the packages a run's results depend on (``not installed`` when absent)."""
    out = {}
    for name in (
        "tipsdistill",
        "torch",
        "torchvision",
        "timm",
        "transformers",
        "deepspeed",
        "h5py",
        "safetensors",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_config(cfg: Any, path: str | os.PathLike[str], *, command: str = "") -> Path:
    """Write the resolved ``cfg`` as YAML to ``path`` (``cache_config.yaml``, ``eval_config.yaml``, ...),
    headed by a comment with the command, the git revision and the package versions; the file loads back
    with ``--config path``. URLs lose their secrets first (user names, passwords, token / signature query
    parameters: :func:`cache.locations.redact`), as everything a cache records: credentials come from the
    environment when the file is rerun."""
    from .format import git_revision
    from .locations import redact

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    head = [
        f"# resolved config of {command or type(cfg).__name__}; rerun with --config {p.name}",
        f"# git revision: {git_revision()}",
        "# versions: " + ", ".join(f"{k} {v}" for k, v in package_versions().items()),
    ]
    body = yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("\n".join(head) + "\n" + body, encoding="utf-8")
    os.replace(tmp, p)
    return p
