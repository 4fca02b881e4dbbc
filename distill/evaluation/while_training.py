"""Patch-text alignment measured while training (``eval.every=N``): zero-shot segmentation of the student.

The same code as ``tipsdistill-eval`` (:func:`~distill.evaluation.segmentation.evaluate_segmentation`,
the same class lists and templates), on the first ``eval.max_images`` images of a held-out labelled
set (``eval.dataset``, any dataset ``tipsdistill-eval --dataset`` takes). The class-name text
embeddings are computed once at the start (on rank 0, broadcast) from ``eval.text_embeddings``,
``eval.text_model`` or, by default, the teacher: the online teacher's text tower, or the teacher the
cache recorded (rebuilt for this once and dropped). With ``loss.text_source=student`` the student's
own (trained) tower is used and re-encoded at every evaluation.

The student is evaluated as a plain copy outside the engine: at every evaluation each rank copies the
trained parameters into it (gathered under ZeRO-3, in fp32 also under bf16), evaluates its share of
the images (image ``i`` on rank ``i % world``), and the confusion matrices are summed over ranks, so
every rank gets the same metrics as one process evaluating every image. The training RNG stream is
left untouched (``torch.random.fork_rng``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .datasets import build_eval_dataset
from .metrics import ConfusionMatrix
from .segmentation import (
    check_text_dim,
    dataset_class_names,
    dataset_subsets,
    evaluate_segmentation,
    resolve_readout,
    training_settings,
)
from .templates import normalise_class_list
from .text import ClassEmbeddings, resolve_class_embeddings

logger = logging.getLogger(__name__)

REPORTED = ("miou", "pixel_accuracy", "mean_accuracy")


class _Share(torch.utils.data.Dataset):
    """Images ``indices`` of a segmentation dataset, keeping its class lists and name."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[self.indices[i]]

    def identity(self) -> dict[str, Any]:
        ident = getattr(self.dataset, "identity", None)
        return ident() if callable(ident) else {"name": type(self.dataset).__name__}


def _teacher_for_text(
    cfg: Any, online_teacher: nn.Module | None, cache_meta: dict[str, Any] | None, cache_path: str = ""
):
    """The default text source: the online teacher, else the teacher recorded in the cache (``cache_path``:
    its name in messages, ``cfg.cache.path`` by default)."""
    where = cache_path or cfg.cache.path
    if online_teacher is not None:
        if not getattr(online_teacher, "has_text", False):
            raise ValueError(
                f"eval.every={cfg.eval.every}: the online teacher {cfg.teacher.name!r} has no text tower for the "
                "class names; set eval.text_model=SPEC (a model with a text tower) or eval.text_embeddings=FILE"
            )
        return online_teacher
    spec = (cache_meta or {}).get("teacher_spec")
    if not spec:
        raise ValueError(
            f"eval.every={cfg.eval.every} needs class-name text embeddings, and the cache {where or '(none)'} "
            "does not record how to rebuild its teacher (it was built from a teacher object); set "
            "eval.text_model=SPEC (as tipsdistill-eval --text-model, e.g. teacher:embedded) or "
            "eval.text_embeddings=FILE (one row per class)"
        )
    from tipsdistill.cache.build import make_teacher

    if not isinstance(spec, dict):
        raise ValueError(
            f"the cache {where}'s teacher_spec attribute is {spec!r}, not {{'teacher': NAME, 'kwargs': {{...}}}}; "
            "set eval.text_model=SPEC or eval.text_embeddings=FILE"
        )
    logger.info("eval: class-name embeddings from the cache's teacher %s (built once)", spec.get("teacher"))
    # a registry name only, unless the user trusts the cache (its teacher_spec is a file's content, not theirs)
    return make_teacher(
        spec.get("teacher"),
        spec.get("kwargs") or {},
        trust_code=bool(getattr(cfg.eval, "trust_remote_code", False)),
        where=f"the cache {where or '(given)'} (attribute teacher_spec)",
    )


def _label(source: dict[str, Any]) -> str:
    """A short name of a ``ClassEmbeddings.source`` (file path or the text model's name)."""
    ident = source.get("identity") or {}
    return str(source.get("path") or ident.get("name") or ident.get("class") or source.get("kind", "?"))


class TrainingEval:
    """Zero-shot segmentation of the student during training; built once before the first step.

    Args:
        cfg: the run's ``TrainConfig`` (``cfg.eval`` holds the settings).
        student: the student *before* it goes into the engine (a plain copy is kept for evaluation).
        device: this rank's device.
        online_teacher: the live teacher of ``teacher.source=online`` (its text tower), if any.
        cache_meta: the cache's metadata (``teacher_spec`` rebuilds its teacher), if any; with several
            teachers, the text-aligned teacher's cache (``cache_path``: its path, named in messages).
        adaptor: evaluate the student through this adaptor (``eval.adaptor``: ``student.adaptor(name)`` of
            a several-teacher run, in that teacher's token space), as ``tipsdistill-eval ...@name``.
    """

    def __init__(
        self,
        cfg: Any,
        student: nn.Module,
        *,
        device: torch.device,
        online_teacher: nn.Module | None = None,
        cache_meta: dict[str, Any] | None = None,
        adaptor: str | None = None,
        cache_path: str = "",
    ) -> None:
        e = cfg.eval
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.device = device
        settings = training_settings(e.settings, cfg.data.image_size)
        self.model = copy.deepcopy(student).float().to(device).eval()  # plain copy: no engine, no ZeRO hooks
        for p in self.model.parameters():
            p.requires_grad_(False)
        # what is measured: the copy, or its view through a teacher's adaptor (follows the copied weights)
        self.view = self.model.adaptor(adaptor) if adaptor else self.model
        self.adaptor = adaptor
        # a student without attention (feature-map students) reads its pooled values (resolve_readout)
        self.settings = dataclasses.replace(settings, readout=resolve_readout(self.view, settings.readout))
        self.dataset = build_eval_dataset(e.dataset, dict(e.dataset_kwargs))
        self.names = dataset_class_names(self.dataset)
        self.subsets = dataset_subsets(self.dataset)
        self.classes = normalise_class_list(getattr(self.dataset, "class_synonyms", None) or self.names)
        self.num_images = min(len(self.dataset), e.max_images)
        if self.num_images == 0:
            raise ValueError(f"eval.dataset={e.dataset!r} ({e.dataset_kwargs}) is empty")
        self.metric = e.metric
        known = list(REPORTED) + [f"miou_{s}" for s in self.subsets]
        if self.metric not in known:
            raise ValueError(
                f"eval.metric={self.metric!r} is not reported for eval.dataset={e.dataset!r}; choose one of {known}"
            )
        self.student_text = (
            not adaptor
            and cfg.loss.text_source == "student"
            and not e.text_embeddings
            and not e.text_model
            and getattr(student, "has_text", False)
        )
        self.text: ClassEmbeddings | None = None
        if not self.student_text:
            self.text = self._shared_text(cfg, online_teacher, cache_meta, cache_path)
            check_text_dim(self.view, self.text)
        logger.info(
            "eval every %d steps%s: %s on %d image(s) of %s, %s readout, text %s; best by %s",
            e.every,
            f" through the {adaptor!r} adaptor" if adaptor else "",
            self.settings.mode,
            self.num_images,
            e.dataset,
            self.settings.readout,
            "of the student's own tower" if self.student_text else f"from {_label(self.text.source)}",
            self.metric,
        )

    def _shared_text(
        self, cfg: Any, online_teacher: nn.Module | None, cache_meta: dict | None, cache_path: str = ""
    ) -> ClassEmbeddings:
        e = cfg.eval
        box: list[Any] = [None]
        if self.rank == 0:
            if e.text_embeddings:
                box[0] = resolve_class_embeddings(self.classes, text_embeddings=e.text_embeddings)
            else:
                if e.text_model:
                    from .models import build_model

                    tower = build_model(e.text_model).to(self.device).eval()
                else:
                    tower = (
                        _teacher_for_text(cfg, online_teacher, cache_meta, cache_path).to(self.device).eval()
                    )
                box[0] = resolve_class_embeddings(
                    self.classes, text_model=tower, templates=self.settings.templates, cache_dir=None
                ).to("cpu")
                del tower
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    @torch.no_grad()
    def _copy_weights(self, student: nn.Module, gather: Callable, ema: nn.Module | None = None) -> None:
        src = list(student.parameters())
        with gather(src):
            for dst, p in zip(self.model.parameters(), src):
                dst.copy_(p.detach().to(dst.dtype))
        for dst, b in zip(self.model.buffers(), student.buffers()):
            dst.copy_(b.detach().to(dst.dtype))
        if ema is not None:  # the full EMA copy's image side (what the run exports), by parameter name
            own = dict(self.model.named_parameters())
            for name, p in ema.named_parameters():
                own[name].copy_(p.detach().to(own[name].dtype))

    def __call__(
        self, student: nn.Module, *, gather: Callable, ema: nn.Module | None = None
    ) -> dict[str, float | None]:
        """Every rank: copy the trained student (its image side from ``ema``, the full EMA copy, when
        given: the weights the run exports), evaluate this rank's images, sum over ranks; returns
        ``{"eval/miou": %, "eval/miou_<subset>": %, "eval/pixel_accuracy": %, "eval/mean_accuracy": %,
        "eval/s": seconds}`` (the same on every rank; a metric is None where it is undefined)."""
        t0 = time.time()
        self._copy_weights(student, gather, ema)
        text = self.text
        mine = list(range(self.rank, self.num_images, self.world))
        mat = torch.zeros(len(self.names), len(self.names), dtype=torch.long)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if self.student_text:
                text = resolve_class_embeddings(
                    self.classes, text_model=self.model, templates=self.settings.templates, cache_dir=None
                )
            if mine:
                res = evaluate_segmentation(
                    self.view, _Share(self.dataset, mine), text, self.settings, subsets={}, progress=False
                )
                mat = res["confusion_matrix"].clone()
        if self.world > 1:
            on = mat.to(self.device)
            dist.all_reduce(on)
            mat = on.cpu()
        cm = ConfusionMatrix(len(self.names))
        cm.mat = mat
        m = cm.compute(self.names, self.subsets)
        # None where undefined (no pixel of any class of a subset among the images evaluated)
        out: dict[str, float | None] = {f"eval/{k}": m[k] for k in REPORTED}
        out.update({f"eval/miou_{s}": m[f"miou_{s}"] for s in self.subsets})
        out["eval/s"] = time.time() - t0
        return out

    @property
    def key(self) -> str:
        """The ``log.jsonl`` / tracker key of the best-checkpoint metric."""
        return f"eval/{self.metric}"
