"""Model specs of the evaluation tools (``tipsdistill-eval``, ``scripts/probe.py``) -> DenseEncoders.

Named the one way, as teachers (``cache.config_layer.parse_teacher_spec``) and datasets are: ``kind:value``,
keyword arguments as ``key=value`` config keys (``tipsdistill-eval ... model_kwargs.NAME.key=value``).

``teacher:<teacher spec>``                    e.g. ``teacher:timm:vit_base_patch14_reg4_dinov2``,
                                              ``teacher:hf:google/siglip2-base-patch16-224``, ``teacher:embedded``
``student:<export dir>``                      a student export (``students.load_student``), a training
                                              checkpoint (``.../checkpoints/step_XXXXXXXX``, any ZeRO stage)
                                              or a run directory (``output_dir``)
``student:<dir>@<teacher>`` (or ``<dir>@<teacher>``)  the same student seen through one teacher's
                                              adaptor (several-teacher runs, ``Student.adaptor(teacher)``)
``python:<module>:<factory>``                 any callable returning a DenseEncoder
A bare existing directory is a checkpoint or a run directory (as above), else it is read by its
``config.json`` ``format``: a student export or an embedded-teacher folder; a bare teacher spec
(``embedded``, ``timm:MODEL``) is a teacher. A run directory gives its newest student: the newest complete
checkpoint, or ``export/`` when that holds a later step. The former JSON kwargs in a spec
(``teacher:timm:{"model_name": ...}``, ``python:m:f:{...}``) are read with a deprecation warning.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from tipsdistill import teachers
from tipsdistill.cache.config_layer import json_object, parse_teacher_spec
from tipsdistill.students import load_student
from tipsdistill.teachers.embedded import EmbeddedTeacher

from ..checkpoint import BEST, TAG_RE, checkpoint_dir, list_complete
from ..export import student_from_checkpoint

logger = logging.getLogger(__name__)

STUDENT_FORMAT = "tipsdistill-student/"
TEACHER_FORMAT = "tipsdistill-embedded-teacher/"


def folder_kind(folder: Path) -> str:
    """``"student"`` or ``"teacher"`` from the ``format`` of ``folder/config.json``."""
    conf = folder / "config.json"
    if not conf.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: pass a student export, an embedded-teacher folder or a model spec"
        )
    fmt = str(json.loads(conf.read_text()).get("format", ""))
    if fmt.startswith(STUDENT_FORMAT):
        return "student"
    if fmt.startswith(TEACHER_FORMAT):
        return "teacher"
    raise ValueError(
        f"{conf}: format {fmt!r} is neither {STUDENT_FORMAT}* nor {TEACHER_FORMAT}*; pass student:<dir> for "
        "a student export, or the teacher's spec"
    )


def is_run_or_checkpoint(folder: Path) -> bool:
    """A training checkpoint (``step_XXXXXXXX`` or ``best``) or a run directory (holding ``checkpoints/``)."""
    return bool(TAG_RE.match(folder.name)) or folder.name == BEST or checkpoint_dir(folder).is_dir()


def student_from_run(folder: str | Path) -> Any:
    """The student of a checkpoint directory, or the newest student of a run directory: its newest
    complete checkpoint, or its ``export/`` when that was written at a later step (``checkpoint.every``
    not dividing ``steps``)."""
    folder = Path(folder)
    if TAG_RE.match(folder.name) or folder.name == BEST:
        return student_from_checkpoint(folder)[0]
    found = list_complete(checkpoint_dir(folder))
    export = folder / "export"
    export_step = -1
    if (export / "config.json").is_file():
        export_step = int(
            (json.loads((export / "config.json").read_text()).get("metrics") or {}).get("step", -1)
        )
    if export_step >= 0 and (not found or export_step >= found[-1][0]):
        logger.info("%s: evaluating %s (step %d)", folder, export, export_step)
        return load_student(export)
    if not found:
        raise FileNotFoundError(
            f"{folder}: no complete checkpoint in {checkpoint_dir(folder)} and no export/; pass a student export, "
            "a checkpoint or a run directory that trained at least to its first checkpoint"
        )
    logger.info("%s: evaluating checkpoint %s", folder, found[-1][1])
    return student_from_checkpoint(found[-1][1])[0]


def _student(path: str) -> Any:
    folder = Path(path)
    return (
        student_from_run(folder) if folder.is_dir() and is_run_or_checkpoint(folder) else load_student(folder)
    )


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Build a DenseEncoder from a spec string (see the module docstring); ``kwargs`` go to the teacher
    builder or the ``python:`` factory."""
    kind, _, rest = spec.partition(":")
    kw = dict(kwargs or {})
    if kind == "teacher" and rest:
        name, teacher_kw = parse_teacher_spec(rest, kw)
        return teachers.build_teacher(name, **teacher_kw)
    base, at, adaptor = spec.rpartition("@")
    if at and base and adaptor and "/" not in adaptor and not Path(spec).exists():  # [student:]DIR@teacher
        model = build_model(base)
        if not hasattr(model, "adaptor"):
            raise ValueError(
                f"{spec}: @{adaptor} picks a teacher's adaptor of a student trained on several teachers; "
                f"{base} is a {type(model).__name__} without adaptors"
            )
        return model.adaptor(adaptor)
    if kind == "student" and rest:
        if kw:
            raise ValueError(f"a student ({spec}) takes no kwargs; got {sorted(kw)}")
        return _student(rest)
    if kind == "python" and rest:
        parts = rest.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"python spec needs python:<module>:<factory>, got {spec!r}")
        if len(parts) > 2 and parts[2]:
            kw = {**json_object(parts[2], f"kwargs of {parts[0]}.{parts[1]}"), **kw}
        fn = getattr(importlib.import_module(parts[0]), parts[1])
        return fn(**kw)
    folder = Path(spec)
    if folder.is_dir():
        if kw:
            raise ValueError(f"a model folder ({spec}) takes no kwargs; got {sorted(kw)}")
        if is_run_or_checkpoint(folder):
            return student_from_run(folder)
        return load_student(folder) if folder_kind(folder) == "student" else EmbeddedTeacher(folder)
    if "/" in spec and kind not in teachers.list_teachers():
        raise FileNotFoundError(
            f"model folder {spec} does not exist; pass an existing folder or a model spec"
        )
    return build_model(f"teacher:{spec}", kw)


def parse_models(items: list[str]) -> dict[str, str]:
    """``["NAME=SPEC", "SPEC", ...]`` -> ``{name: spec}`` (unnamed specs become ``model<i>``)."""
    out: dict[str, str] = {}
    for i, item in enumerate(items):
        name, sep, spec = item.partition("=")
        if not sep or ":" in name or "{" in name:
            name, spec = f"model{i}", item
        if name in out:
            raise ValueError(f"model name {name!r} given twice")
        out[name] = spec
    return out
