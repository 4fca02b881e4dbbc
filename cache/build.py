"""Teachers and datasets from their specs: registry names, dataset shorthands, and (only when the user
typed them, or trusts the file that names them) ``package.module:factory`` import paths."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from tipsdistill import teachers  # noqa: F401  (importing the package registers every teacher adapter)
from tipsdistill.teachers.base import Teacher, build_teacher, list_teachers

from .dataset_spec import build_from_spec, is_shorthand
from .datasets import build_dataset


def load_object(spec: str) -> Callable[..., Any]:
    """``"package.module:attr"`` -> the attribute (a factory)."""
    mod, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"cannot import module {mod!r} of {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {mod!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


class UntrustedCodeError(ValueError):
    """A teacher spec names Python code (``package.module:factory``) where only registry names are trusted."""


def make_teacher(spec: str, kwargs: dict[str, Any], *, trust_code: bool = False, where: str = "") -> Teacher:
    """Build a teacher from a registry name (``teachers.list_teachers()``) or, only with ``trust_code``,
    from ``"package.module:factory"``.

    Importing a module and calling a factory runs code, so a spec that comes from a file someone else
    made (a cache's ``teacher_spec`` attribute) is rebuilt from registry names only unless the user
    opts in, as transformers asks for ``trust_remote_code``; ``where`` names that file and the opt-in
    in the error. A spec the user typed (stage 1's ``--teacher``) passes ``trust_code=True``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"teacher spec {spec!r}{' in ' + where if where else ''} is not a name")
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"teacher kwargs {kwargs!r}{' in ' + where if where else ''} are not a mapping of keyword arguments"
        )
    if ":" in spec:
        if not trust_code:
            raise UntrustedCodeError(
                f"teacher {spec!r}{' recorded in ' + where if where else ''} is a Python import path: rebuilding "
                "it would import that module and call it, running code named by a file. Only registry teachers "
                f"({', '.join(list_teachers())}) are rebuilt from such files. If you trust the file and the module, "
                "opt in explicitly (eval.trust_remote_code=true for stage 2, like transformers' trust_remote_code), "
                "or name a text model yourself (eval.text_model=SPEC / eval.text_embeddings=FILE)"
            )
        teacher = load_object(spec)(**kwargs)
        if not isinstance(teacher, Teacher):
            raise ValueError(f"{spec} returned {type(teacher).__name__}, not a teachers.Teacher")
        return teacher.freeze()
    return build_teacher(spec, **kwargs)


def make_dataset(spec: str, kwargs: dict[str, Any]) -> Dataset:
    if is_shorthand(spec):  # wds:..., parquet:..., hf:..., name:{json}
        return build_from_spec(spec, **kwargs)
    if ":" in spec:
        return load_object(spec)(**kwargs)
    return build_dataset(spec, **kwargs)
