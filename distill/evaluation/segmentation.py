"""Zero-shot semantic segmentation from patch-text cosine similarity (the official TIPS notebook's protocol).

Per image: short side resized (bicubic) to ``image_size``; the model input rounded up to a multiple
of the patch size (bicubic); patch features read out through :meth:`DenseEncoder.encode_image`
(value trick ``tips`` by default, ``maskclip``, or the plain ``patch`` tokens, of any ``layer``),
L2-normalised; cosine with the class text embeddings.

* ``whole``: the ``(C, h, w)`` cosine map is upsampled bilinearly to the label size, argmax.
* ``slide``: windows of ``window`` px at ``stride``; each window's cosine map is upsampled to the
  window size, softmaxed over classes, accumulated and divided by the overlap count; the
  ``(C, H, W)`` map is upsampled bilinearly to the label size, argmax.

Those are the defaults (the ``tips`` protocol); every other rule of the published protocols (``tcl``,
``sclip``: :mod:`.protocols`) is a :class:`SegmentationSettings` knob: the mmseg resize rule, raw score
averaging over windows, a logit scale, softmax over every synonym, SCLIP's area filter, a background
class without text (TCL). Images are evaluated in batches (``image_batch``: same-size images in whole
mode, windows of several images in slide mode), under bf16 autocast on request (``amp``), and split
over the ranks of ``torch.distributed`` (``evaluate_segmentation(distributed=True)``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from tipsdistill.cache.config_layer import nearest
from tipsdistill.cache.datasets import BadImageError

from .metrics import IGNORE_INDEX, ConfusionMatrix
from .text import ClassEmbeddings

logger = logging.getLogger(__name__)

READOUTS = ("tips", "maskclip", "patch")
MODES = ("whole", "slide")
RESIZE_BACKENDS = ("pil", "torch")
RESIZE_RULES = ("notebook", "mmseg")
INTERPOLATIONS = ("bicubic", "bilinear")
SYNONYM_REDUCTIONS = ("cosine", "softmax")
AMPS = ("none", "bf16")


@dataclass
class SegmentationSettings:
    """Every knob of the zero-shot segmentation protocol (defaults = the official notebook).

    Attributes:
        image_size: short side after resizing (``None`` keeps the dataset's size).
        mode: ``whole`` or ``slide``.
        window, stride: slide-mode window side and stride in pixels (of the resized image).
        readout: ``tips`` (value trick, residual + MLP kept), ``maskclip`` (value projection only),
            or ``patch`` (the block's output tokens).
        layer: block index (0-based, negative from the end); ``None`` = last block.
        templates: template set name (``tcl``, ``openai``, ``none``) or a template file.
        background_threshold: if set, pixels whose best score is below it get ``background_class``
            (score = cosine in whole mode, averaged softmax probability in slide mode).
        background_class: label id of the background class.
        resize_backend: ``pil`` (notebook: PIL bicubic on the 8-bit image) or ``torch`` (bicubic, antialias).
        window_batch: windows encoded per forward in slide mode (numerically the same as one by one).
        max_images: evaluate only the first N images (``None`` = all).
        resize_rule: ``notebook`` (short side = ``image_size``, long side truncated) or ``mmseg``
            (mmcv ``imrescale`` with scale ``(max_long_side, image_size)``: factor
            ``min(max_long_side / long, image_size / short)``, sides rounded half up; TCL, SCLIP).
        max_long_side: the long-side cap of the ``mmseg`` rule (2048 in every mmseg test pipeline).
        resize_interpolation: ``bicubic`` (notebook) or ``bilinear`` (mmcv's default). The ``torch``
            backend antialiases bicubic (as PIL) and not bilinear (as OpenCV's ``INTER_LINEAR``, mmcv's
            resize).
        window_softmax: slide mode: softmax over classes per window before averaging (notebook);
            ``False`` averages the raw scores (mmseg ``slide_inference``: TCL, SCLIP).
        logit_scale: temperature of the softmax over classes: per window when ``window_softmax``
            (``None`` = 1, the notebook), else applied to the final map after upsampling to the label
            size (SCLIP: ``softmax(logit_scale * cos)``; ``None`` = no softmax).
        synonym_reduce: ``cosine`` (a class scores the max cosine of its names, before any softmax) or
            ``softmax`` (SCLIP: softmax over every name, then the max per class; needs ``logit_scale``
            and, in slide mode, ``window_softmax=False``).
        area_threshold: SCLIP's ``area_thd``: non-background classes predicted on less than this
            fraction of the image's non-background predicted pixels are dropped (scores zeroed).
        background_text: ``False``: the background class gets no text score but the constant
            ``background_threshold`` (TCL's ``with_bg``): it wins where no class scores above it.
        background_names: names (synonyms) that replace the background class's name in the text
            (SCLIP's VOC21 / COCO-Object background words).
        amp: ``none`` or ``bf16`` (autocast of the encoder forward; scores stay float32).
        image_batch: images evaluated together (whole mode: same-size images in one forward; slide
            mode: windows of several images share forwards of ``window_batch``); ``1`` is the one
            image at a time path. Results equal the unbatched path up to float rounding.
    """

    image_size: int | None = 448
    mode: str = "slide"
    window: int = 448
    stride: int = 336
    readout: str = "tips"
    layer: int | None = None
    templates: str = "tcl"
    background_threshold: float | None = None
    background_class: int = 0
    resize_backend: str = "pil"
    window_batch: int = 8
    max_images: int | None = None
    resize_rule: str = "notebook"
    max_long_side: int = 2048
    resize_interpolation: str = "bicubic"
    window_softmax: bool = True
    logit_scale: float | None = None
    synonym_reduce: str = "cosine"
    area_threshold: float | None = None
    background_text: bool = True
    background_names: list[str] | None = None
    amp: str = "none"
    image_batch: int = 8
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.background_names is not None:
            if isinstance(self.background_names, str):
                self.background_names = [n.strip() for n in self.background_names.split(",")]
            self.background_names = [str(n) for n in self.background_names]
        self.validate()

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.readout not in READOUTS:
            raise ValueError(f"unknown readout {self.readout!r}; choose one of {READOUTS}")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ValueError(
                f"unknown resize_backend {self.resize_backend!r}; choose one of {RESIZE_BACKENDS}"
            )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window ({self.window}) and stride ({self.stride}) must be positive")
        if self.stride > self.window:
            raise ValueError(f"stride {self.stride} > window {self.window} would leave pixels uncovered")
        if self.window_batch < 1:
            raise ValueError("window_batch must be >= 1")
        if self.image_batch < 1:
            raise ValueError("image_batch must be >= 1")
        for value, allowed, what in (
            (self.resize_rule, RESIZE_RULES, "resize_rule"),
            (self.resize_interpolation, INTERPOLATIONS, "resize_interpolation"),
            (self.synonym_reduce, SYNONYM_REDUCTIONS, "synonym_reduce"),
            (self.amp, AMPS, "amp"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {what} {value!r}; choose one of {allowed}")
        if self.max_long_side < 1:
            raise ValueError(f"max_long_side must be positive, got {self.max_long_side}")
        if self.logit_scale is not None and not self.logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {self.logit_scale}")
        if self.synonym_reduce == "softmax" and (
            self.logit_scale is None or (self.mode == "slide" and self.window_softmax)
        ):
            raise ValueError(
                "synonym_reduce='softmax' (softmax over every name, then the max per class, as SCLIP) needs "
                "logit_scale set and, in slide mode, window_softmax=False (raw scores averaged over windows)"
            )
        if self.area_threshold is not None and not 0 <= self.area_threshold < 1:
            raise ValueError(f"area_threshold must be in [0, 1), got {self.area_threshold}")
        if not self.background_text and self.background_threshold is None:
            raise ValueError(
                "background_text=False gives the background class the constant score background_threshold; "
                "set background_threshold (TCL: 0.4)"
            )
        if self.background_names is not None and not all(n.strip() for n in self.background_names):
            raise ValueError(f"background_names must be non-empty names, got {self.background_names}")

    def uses_background(self) -> bool:
        """Whether a rule reads ``background_class`` (a threshold, the area filter or the constant score)."""
        return (
            self.background_threshold is not None
            or self.area_threshold is not None
            or not self.background_text
            or self.background_names is not None
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **kw: Any) -> SegmentationSettings:
        d = self.to_dict()
        d.update(kw)
        return SegmentationSettings(**d)


# every knob of the protocol, by name: the keys of tipsdistill-eval's ``settings.*``, of a training run's
# ``eval.settings.*`` and of a protocol's values (``extra`` is the record of where they came from)
SETTING_KEYS = tuple(f.name for f in fields(SegmentationSettings) if f.name != "extra")


def check_setting_keys(values: Mapping[str, Any], where: str) -> None:
    """Raise ``ValueError`` naming an unknown knob of ``values`` and the nearest valid ones (``where``:
    the config section, e.g. ``eval.settings``)."""
    unknown = sorted(str(k) for k in values if k not in SETTING_KEYS)
    if unknown:
        close = [c for k in unknown for c in nearest(k, list(SETTING_KEYS))]
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"unknown setting(s) {unknown} in {where}{hint} SegmentationSettings has {list(SETTING_KEYS)}"
        )


def training_settings(values: Mapping[str, Any], image_size: int) -> SegmentationSettings:
    """A training run's ``eval.settings`` as :class:`SegmentationSettings`: ``image_size`` 0 (or absent) is
    the training ``image_size``, ``window`` 0 the image size, ``stride`` 0 three quarters of the window."""
    check_setting_keys(values, "eval.settings")
    v = dict(values)
    size = v.get("image_size") or image_size
    window = v.get("window") or size
    v.update(image_size=size, window=window, stride=v.get("stride") or max(1, window * 3 // 4))
    try:
        return SegmentationSettings(**v)
    except (TypeError, ValueError) as e:
        raise ValueError(f"eval.settings: {e}") from e


# ----------------------------------------------------------------------------------------- resizing
def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Target ``(H, W)`` with the short side = ``size`` (long side truncated, as torchvision/the notebook)."""
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def mmseg_size(h: int, w: int, size: int, max_long_side: int = 2048) -> tuple[int, int]:
    """Target ``(H, W)`` of mmcv's ``imrescale(img, (max_long_side, size))`` (mmseg ``Resize`` with
    ``keep_ratio=True``): factor ``min(max_long_side / long, size / short)``, sides rounded half up."""
    scale = min(max_long_side / max(h, w), size / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_short_side(
    image: torch.Tensor,
    size: int | None,
    backend: str = "pil",
    *,
    rule: str = "notebook",
    max_long_side: int = 2048,
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Resize a ``(3, H, W)`` [0, 1] image so its short side is ``size`` (``rule``: :func:`short_side_size`
    or :func:`mmseg_size`); bicubic (antialiased) or bilinear (not antialiased with ``torch``, as OpenCV)."""
    if size is None:
        return image
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose one of {INTERPOLATIONS}")
    h, w = image.shape[-2:]
    if rule == "notebook":
        nh, nw = short_side_size(h, w, size)
    elif rule == "mmseg":
        nh, nw = mmseg_size(h, w, size, max_long_side)
    else:
        raise ValueError(f"unknown resize rule {rule!r}; choose one of {RESIZE_RULES}")
    if (nh, nw) == (h, w):
        return image
    if backend == "pil":
        arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        resample = Image.BICUBIC if interpolation == "bicubic" else Image.BILINEAR
        out = Image.fromarray(arr).resize((nw, nh), resample)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div(255).to(image.device)
    if backend == "torch":
        out = F.interpolate(
            image[None].float(),
            size=(nh, nw),
            mode=interpolation,
            align_corners=False,
            antialias=interpolation == "bicubic",
        )
        return out[0].clamp(0, 1)
    raise ValueError(f"unknown resize backend {backend!r}; choose one of {RESIZE_BACKENDS}")


def resize_image(image: torch.Tensor, settings: SegmentationSettings) -> torch.Tensor:
    """``(3, H, W)`` image resized as ``settings`` say (size, rule, backend, interpolation)."""
    return resize_short_side(
        image,
        settings.image_size,
        settings.resize_backend,
        rule=settings.resize_rule,
        max_long_side=settings.max_long_side,
        interpolation=settings.resize_interpolation,
    )


def round_up_to_patch(pixels: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Resize ``(B, 3, H, W)`` so both sides are the next multiple of ``patch_size`` (bicubic, as the
    notebook), clamped to [0, 1] (the encoders' input contract)."""
    H, W = pixels.shape[-2:]
    nH, nW = math.ceil(H / patch_size) * patch_size, math.ceil(W / patch_size) * patch_size
    if (nH, nW) == (H, W):
        return pixels
    return F.interpolate(pixels, size=(nH, nW), mode="bicubic", align_corners=False).clamp(0, 1)


# -------------------------------------------------------------------------------------- features
def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def to_text_space(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """``model``'s tokens ``(..., D)`` mapped into its text space (``DenseEncoder.project_to_text``: the
    text interface a student of another width than its teacher's text carries); as is for a model
    without one (a plain module, or tokens already in the text space)."""
    project = getattr(model, "project_to_text", None)
    return tokens if project is None else project(tokens)


def text_width(model: Any) -> int | None:
    """Width of ``model``'s text space (``text_dim``, else ``embed_dim``); ``None`` when it says neither."""
    d = getattr(model, "text_dim", None)
    return int(d) if d is not None else getattr(model, "embed_dim", None)


def resolve_readout(model: Any, readout: str) -> str:
    """The readout ``model`` can give for ``readout``: itself when the model has it (``model.readouts``,
    default all of :data:`READOUTS`); for ``tips`` on a model without self-attention, its ``maskclip``
    readout when it has one (a feature-map student: the attention pool's values of every token,
    :meth:`students.featuremap.FeatureMapStudent.pool_values`), else ``patch`` (its projected dense tokens)."""
    own = tuple(getattr(model, "readouts", READOUTS))
    if readout in own:
        return readout
    if readout == "tips" and "maskclip" in own:
        return "maskclip"
    if readout in READOUTS and "patch" in own:
        return "patch"
    raise ValueError(f"{type(model).__name__} has no {readout!r} readout; it has {list(own)}")


def dense_patch_features(
    model: Any,
    pixels: torch.Tensor,
    readout: str = "tips",
    layer: int | None = None,
    normalize: bool = True,
    *,
    text_space: bool = True,
    amp: str = "none",
) -> torch.Tensor:
    """Patch features ``(B, h, w, D)`` float32 of ``(B, 3, H, W)`` [0, 1] pixels (any size: rounded up to
    the patch size).

    ``text_space``: map the tokens through the model's text interface (:func:`to_text_space`), so they
    compare with text embeddings (``D`` = ``model.text_dim``); ``False`` keeps the encoder's own tokens
    (``D`` = ``embed_dim``: linear probes, PCA pictures). ``amp="bf16"``: the forward (and the text
    interface) under bfloat16 autocast on the pixels' device; the features return in float32."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
    if amp not in AMPS:
        raise ValueError(f"unknown amp {amp!r}; choose one of {AMPS}")
    readout = resolve_readout(model, readout)
    pixels = round_up_to_patch(pixels, int(model.patch_size))
    with (
        torch.no_grad(),
        torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"),
    ):
        if readout == "patch":
            feats = model.encode_image(pixels, layer=layer).patch
        else:
            out = model.encode_image(pixels, value_trick=True, value_readout=readout, layer=layer)
            if out.value_patch is None:
                raise ValueError(
                    f"{type(model).__name__}.encode_image(value_trick=True) returned no value_patch"
                )
            feats = out.value_patch
        if text_space:
            feats = to_text_space(model, feats)
    feats = feats.float()
    return F.normalize(feats, dim=-1) if normalize else feats


def check_text_dim(model: Any, text: ClassEmbeddings, feat_dim: int | None = None) -> None:
    d = feat_dim if feat_dim is not None else text_width(model)
    if d is not None and int(d) != text.dim:
        raise ValueError(
            f"text embeddings have dim {text.dim} but {type(model).__name__}'s patch features have dim {d} in its "
            "text space; patch-text cosine needs one shared space: evaluate with the text the model was trained "
            "against (a student distilled with caption embeddings of that width carries a projection to them: "
            "student text_dim), its own text tower, or text embeddings of dim {d}".replace("{d}", str(d))
        )


def _text_rows(text: ClassEmbeddings, feats: torch.Tensor, settings: SegmentationSettings) -> torch.Tensor:
    """Scores ``(R, ...)`` of L2-normalised features ``(..., D)``: one row per class (max over its
    names) or, with ``synonym_reduce="softmax"``, one row per name (reduced after the softmax)."""
    if settings.synonym_reduce == "softmax":
        return text.name_scores(feats)
    return text.scores(feats)


def _whole_maps(
    model: Any, images: list[torch.Tensor], text: ClassEmbeddings, settings: SegmentationSettings
) -> list[torch.Tensor]:
    """Score maps ``(R, h, w)`` at the patch grid of resized ``(3, H, W)`` images; same-size images share
    forwards of up to ``image_batch``."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(tuple(im.shape), []).append(i)
    maps: list[torch.Tensor | None] = [None] * len(images)
    for idx in groups.values():
        for s in range(0, len(idx), settings.image_batch):
            chunk = idx[s : s + settings.image_batch]
            feats = dense_patch_features(
                model,
                torch.stack([images[i] for i in chunk]),
                settings.readout,
                settings.layer,
                amp=settings.amp,
            )
            check_text_dim(model, text, feats.shape[-1])
            for i, f in zip(chunk, feats):
                maps[i] = _text_rows(text, f, settings)
    return maps  # type: ignore[return-value]


def _slide_maps(
    model: Any, images: list[torch.Tensor], text: ClassEmbeddings, settings: SegmentationSettings
) -> list[torch.Tensor]:
    """Window-averaged score maps ``(R, H, W)`` of resized ``(3, H, W)`` images. Every window of one
    image has one size, so windows of several images share forwards of up to ``window_batch`` (each
    image's windows still accumulate in the notebook's order)."""
    jobs_by_shape: dict[tuple[int, int], list[tuple[int, tuple[int, int, int, int]]]] = {}
    for i, im in enumerate(images):
        H, W = im.shape[-2:]
        for box in slide_windows(H, W, settings.window, settings.stride):
            y1, y2, x1, x2 = box
            jobs_by_shape.setdefault((y2 - y1, x2 - x1), []).append((i, box))
    rows = len(text.class_index) if settings.synonym_reduce == "softmax" else text.num_classes
    acc = [torch.zeros(rows, *im.shape[-2:], device=im.device) for im in images]
    counts = [torch.zeros(*im.shape[-2:], device=im.device) for im in images]
    for jobs in jobs_by_shape.values():
        for s in range(0, len(jobs), settings.window_batch):
            chunk = jobs[s : s + settings.window_batch]
            crops = torch.stack([images[i][:, y1:y2, x1:x2] for i, (y1, y2, x1, x2) in chunk])
            feats = dense_patch_features(model, crops, settings.readout, settings.layer, amp=settings.amp)
            check_text_dim(model, text, feats.shape[-1])
            for (i, (y1, y2, x1, x2)), f in zip(chunk, feats):
                cos = _text_rows(text, f, settings)  # (R, h, w)
                cos = F.interpolate(cos[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[
                    0
                ]
                if settings.window_softmax:
                    cos = (cos if settings.logit_scale is None else cos * settings.logit_scale).softmax(dim=0)
                acc[i][:, y1:y2, x1:x2] += cos
                counts[i][y1:y2, x1:x2] += 1
    return [a / c for a, c in zip(acc, counts)]


def whole_scores(
    model: Any, image: torch.Tensor, text: ClassEmbeddings, settings: SegmentationSettings
) -> torch.Tensor:
    """Cosine map ``(C, h, w)`` of one resized ``(3, H, W)`` image at the patch grid (``(K, h, w)``, one
    row per name, with ``synonym_reduce="softmax"``)."""
    return _whole_maps(model, [image], text, settings)[0]


def slide_windows(H: int, W: int, side: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes ``(y1, y2, x1, x2)`` exactly as the notebook's ``predict_slide`` loop."""
    h_grids = max(H - side + stride - 1, 0) // stride + 1
    w_grids = max(W - side + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + side, H), min(x1 + side, W)
            y1, x1 = max(y2 - side, 0), max(x2 - side, 0)
            boxes.append((y1, y2, x1, x2))
    return boxes


def slide_scores(
    model: Any, image: torch.Tensor, text: ClassEmbeddings, settings: SegmentationSettings
) -> torch.Tensor:
    """Averaged softmax map ``(C, H, W)`` of one resized ``(3, H, W)`` image (sliding windows); raw
    averaged scores with ``window_softmax=False``."""
    return _slide_maps(model, [image], text, settings)[0]


def check_background(settings: SegmentationSettings, num_classes: int) -> None:
    if settings.uses_background() and not 0 <= settings.background_class < num_classes:
        raise ValueError(
            f"background_class {settings.background_class} is not a class id (0..{num_classes - 1})"
        )


def finish_scores(
    scores: torch.Tensor,
    out_size: tuple[int, int],
    text: ClassEmbeddings,
    settings: SegmentationSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class map ``(H_out, W_out)`` int64 and class scores ``(C, H_out, W_out)`` from a score map
    ``(R, H, W)`` (:func:`whole_scores` / :func:`slide_scores`): bilinear upsampling to ``out_size``,
    the final softmax (``logit_scale`` outside per-window softmax), the max over names
    (``synonym_reduce="softmax"``), the background rules (constant background score, SCLIP's area
    filter, threshold), argmax."""
    scores = F.interpolate(scores[None], size=tuple(out_size), mode="bilinear", align_corners=False)[0]
    if settings.logit_scale is not None and not (settings.mode == "slide" and settings.window_softmax):
        scores = (scores * settings.logit_scale).softmax(dim=0)
    if settings.synonym_reduce == "softmax":
        scores = text.reduce_names(scores)
    C = scores.shape[0]
    check_background(settings, C)
    bg = settings.background_class
    if not settings.background_text:  # TCL: a constant background channel instead of its text
        scores[bg] = float(settings.background_threshold)  # type: ignore[arg-type]
    if settings.area_threshold is not None:  # SCLIP: drop classes on a small share of the foreground
        area = torch.bincount(scores.argmax(dim=0).reshape(-1), minlength=C).to(scores.dtype)
        area[bg] = 0
        keep = area > settings.area_threshold * area.sum()
        keep[bg] = True
        scores = scores * keep.to(scores.dtype)[:, None, None]
    best, pred = scores.max(dim=0)
    if settings.background_threshold is not None:
        pred = torch.where(best < settings.background_threshold, bg, pred)
    return pred, scores


def predict_batch(
    model: Any,
    images: Sequence[torch.Tensor],
    text: ClassEmbeddings,
    settings: SegmentationSettings,
    out_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`predict` of several ``(3, H, W)`` [0, 1] images (any sizes) with shared forwards
    (``image_batch`` same-size images in whole mode, ``window_batch`` windows of any of them in slide
    mode); returns ``[(class map (H_out, W_out), scores (C, H_out, W_out))]`` in input order."""
    sizes = (
        [tuple(o) for o in out_sizes] if out_sizes is not None else [tuple(im.shape[-2:]) for im in images]
    )
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} output sizes")
    device = model_device(model)
    resized = [resize_image(im.to(device).float(), settings) for im in images]
    if settings.mode == "whole":
        maps = _whole_maps(model, resized, text, settings)
    else:
        maps = _slide_maps(model, resized, text, settings)
    return [finish_scores(m, size, text, settings) for m, size in zip(maps, sizes)]


def predict(
    model: Any,
    image: torch.Tensor,
    text: ClassEmbeddings,
    settings: SegmentationSettings,
    out_size: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class map ``(H_out, W_out)`` int64 and score map ``(C, H_out, W_out)`` of one ``(3, H, W)`` [0, 1] image.

    ``out_size`` defaults to the input image size (the label size in evaluation).
    """
    return predict_batch(model, [image], text, settings, None if out_size is None else [out_size])[0]


# ------------------------------------------------------------------------------------ evaluation
def dataset_class_names(dataset: Any) -> list[str]:
    names = getattr(dataset, "class_names", None)
    if names is None:
        raise ValueError(
            f"dataset {type(dataset).__name__} has no class_names; segmentation datasets must list their classes"
        )
    return [n if isinstance(n, str) else list(n)[0] for n in names]


def dataset_subsets(dataset: Any) -> dict[str, list[int]]:
    out = {}
    for attr, name in (("object_class_ids", "objects"), ("background_class_ids", "background")):
        ids = getattr(dataset, attr, None)
        if ids is not None and len(ids):
            out[name] = [int(i) for i in ids]
    return out


def _dataset_name(dataset: Any) -> str:
    try:
        ident = dataset.identity()
        return str(ident.get("name", type(dataset).__name__))
    except Exception:
        return type(dataset).__name__


@dataclass
class Example:
    key: str
    image: torch.Tensor  # (3, H, W) [0, 1] at label size
    label: torch.Tensor  # (H, W) int64
    pred: torch.Tensor  # (H, W) int64


def check_item(item: dict[str, Any], index: int, dataset_name: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    key = str(item.get("key", index))
    if "label" not in item or item["label"] is None:
        raise ValueError(
            f"{dataset_name} item {key!r} has no 'label'; zero-shot segmentation needs label maps"
        )
    image, label = item["image"], torch.as_tensor(item["label"])
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{dataset_name} item {key!r}: image must be (3, H, W), got {tuple(image.shape)}")
    if label.ndim != 2:
        raise ValueError(f"{dataset_name} item {key!r}: label must be (H, W), got {tuple(label.shape)}")
    if tuple(label.shape) != tuple(image.shape[-2:]):
        raise ValueError(
            f"{dataset_name} item {key!r}: label is {tuple(label.shape)} but the image is "
            f"{tuple(image.shape[-2:])}; label maps must have the image's size (re-export the label PNG at the "
            "image resolution, nearest-neighbour)"
        )
    return image, label.long(), key


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised ``torch.distributed`` group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _keep_item(item: Any) -> Any:
    """DataLoader ``collate_fn`` of single items: as they are (module level: picklable)."""
    return item


@dataclass
class _Bad:
    """An item that could not be read (``cache.datasets.BadImageError``): its kind and message."""

    kind: str
    error: str


class _Guarded(torch.utils.data.Dataset):
    """``dataset[indices[j]]``, or a :class:`_Bad` for an image that cannot be used (picklable, so it
    crosses DataLoader workers with its kind)."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Any:
        try:
            return self.dataset[self.indices[j]]
        except BadImageError as e:
            return _Bad(e.kind, f"{type(e).__name__}: {e}")


def _items(dataset: Any, indices: list[int], num_workers: int):
    """``(index, item)`` of ``indices`` in order, read by ``num_workers`` DataLoader workers (0: here);
    an image that cannot be used comes as a :class:`_Bad` item."""
    guarded = _Guarded(dataset, indices)
    if num_workers <= 0:
        for j, i in enumerate(indices):
            yield i, guarded[j]
        return
    loader = torch.utils.data.DataLoader(
        guarded,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep_item,
    )
    yield from zip(indices, loader)


def _sum_over_ranks(mat: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``mat`` summed over the ranks (NCCL needs it on the GPU, gloo takes it where it is)."""
    on = mat.to(device) if dist.get_backend() == "nccl" else mat.clone()
    dist.all_reduce(on)
    return on.cpu()


def evaluate_segmentation(
    model: Any,
    dataset: Any,
    text: ClassEmbeddings,
    settings: SegmentationSettings | None = None,
    *,
    subsets: dict[str, Sequence[int]] | None = None,
    keep_examples: int = 0,
    progress: bool = True,
    desc: str = "segmentation",
    distributed: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Zero-shot segmentation metrics of ``model`` on a labelled ``dataset``.

    ``settings.image_batch`` images are predicted together (:func:`predict_batch`); ``num_workers``
    DataLoader workers read them. ``distributed``: with an initialised ``torch.distributed`` group,
    rank ``r`` of ``N`` evaluates images ``r, r + N, ...`` and the confusion matrices are summed over
    the ranks (the kept examples gathered), so every rank returns the metrics of all images.

    Returns a dict with ``metrics`` (see :func:`metrics.segmentation_metrics`), ``settings`` (with the
    readout used: :func:`resolve_readout`), ``readout_requested`` (the settings' own), ``num_images``, ``confusion_matrix`` ``(C, C)`` and ``examples`` (the first ``keep_examples``
    :class:`Example` objects).
    """
    settings = settings or SegmentationSettings()
    asked = settings.readout
    settings = settings.replace(readout=resolve_readout(model, asked))
    if settings.readout != asked:
        logger.warning(
            "%s has no %r readout (no attention value trick): evaluated with the %r readout (recorded in the settings)",
            type(model).__name__,
            asked,
            settings.readout,
        )
    names = dataset_class_names(dataset)
    if text.num_classes != len(names):
        raise ValueError(
            f"text embeddings cover {text.num_classes} classes but the dataset lists {len(names)}; build them "
            "from the dataset's class list"
        )
    check_text_dim(model, text)
    if subsets is None:
        subsets = dataset_subsets(dataset)
    check_background(settings, len(names))
    n = len(dataset) if settings.max_images is None else min(len(dataset), settings.max_images)
    if n == 0:
        raise ValueError(f"dataset {_dataset_name(dataset)} is empty")
    rank, world = dist_rank_world() if distributed else (0, 1)
    mine = list(range(rank, n, world))
    cm = ConfusionMatrix(len(names), IGNORE_INDEX)
    kept: list[tuple[int, Example]] = []
    dname = _dataset_name(dataset)
    device = model_device(model)
    text = text.to(device)
    bar = tqdm(total=len(mine), desc=desc, disable=not progress or rank != 0, leave=False)

    def run(batch: list[tuple[int, torch.Tensor, torch.Tensor, str]]) -> None:
        outs = predict_batch(model, [b[1] for b in batch], text, settings, [tuple(b[2].shape) for b in batch])
        for (i, image, label, key), (pred, _) in zip(batch, outs):
            cm.update(pred.cpu(), label, where=f"{dname} item {key!r}")
            if i < keep_examples:
                kept.append((i, Example(key, image.cpu(), label.cpu(), pred.cpu())))
        bar.update(len(batch))

    skipped: list[dict[str, Any]] = []  # images that cannot be used: left out and listed, never the run's end
    batch: list[tuple[int, torch.Tensor, torch.Tensor, str]] = []
    for i, item in _items(dataset, mine, num_workers):
        if isinstance(item, _Bad):
            skipped.append({"index": i, "kind": item.kind, "error": item.error})
            logger.warning("%s item %d skipped (%s): %s", dname, i, item.kind, item.error)
            continue
        image, label, key = check_item(item, i, dname)
        batch.append((i, image, label, key))
        if len(batch) == settings.image_batch:
            run(batch)
            batch = []
    if batch:
        run(batch)
    bar.close()
    if world > 1:
        cm.mat = _sum_over_ranks(cm.mat, device)
        every_skipped: list[Any] = [None] * world
        dist.all_gather_object(every_skipped, skipped)
        skipped = sorted((e for part in every_skipped for e in part), key=lambda e: e["index"])
        if keep_examples > 0:
            every: list[Any] = [None] * world
            dist.all_gather_object(every, kept)
            kept = [e for part in every for e in part]
    examples = [ex for _, ex in sorted(kept, key=lambda t: t[0])][:keep_examples]
    if skipped:
        logger.warning("%s: %d of %d image(s) skipped and left out of the metrics", dname, len(skipped), n)
    metrics = cm.compute(names, subsets)
    return {
        "metrics": metrics,
        "settings": settings.to_dict(),
        "readout_requested": asked,
        "num_images": n - len(skipped),
        "skipped": skipped,
        "confusion_matrix": cm.mat,
        "examples": examples,
    }


def resolve_layers(model: Any, layers: Sequence[int] | str | None) -> list[int]:
    """``"all"`` -> every block ``0..L-1``; a list is checked against ``model.num_layers``."""
    L = int(getattr(model, "num_layers", 0) or 0)
    if layers is None:
        return []
    if isinstance(layers, str):
        if layers != "all":
            return [int(x) for x in layers.split(",") if x.strip()]
        if L <= 0:
            raise ValueError(f"{type(model).__name__} does not report num_layers; pass explicit layer ids")
        return list(range(L))
    out = [int(x) for x in layers]
    for k in out:
        if L and not -L <= k < L:
            raise ValueError(f"layer {k} out of range for {type(model).__name__} with {L} blocks")
    return out


def layer_curve(
    model: Any,
    dataset: Any,
    text: ClassEmbeddings,
    settings: SegmentationSettings,
    layers: Sequence[int] | str = "all",
    progress: bool = True,
    *,
    distributed: bool = False,
    num_workers: int = 0,
) -> list[dict[str, Any]]:
    """mIoU by depth: one evaluation per block (same readout); returns ``[{layer, miou, miou_<subset>...,
    pixel_accuracy}]`` (one ``miou_<subset>`` per class subset of the dataset, e.g. ``miou_objects``)."""
    rows = []
    for k in resolve_layers(model, layers):
        res = evaluate_segmentation(
            model,
            dataset,
            text,
            settings.replace(layer=k),
            progress=progress,
            desc=f"layer {k}",
            distributed=distributed,
            num_workers=num_workers,
        )
        m = res["metrics"]
        subsets = {key: v for key, v in m.items() if key.startswith("miou_")}
        rows.append({"layer": k, "miou": m["miou"], **subsets, "pixel_accuracy": m["pixel_accuracy"]})
    return rows
