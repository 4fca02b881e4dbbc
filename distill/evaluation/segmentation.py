"""Zero-shot semantic segmentation from patch-text cosine similarity (the official TIPS notebook's protocol).

Per image: short side resized (bicubic) to ``image_size``; the model input rounded up to a multiple
of the patch size (bicubic); patch features read out through :meth:`DenseEncoder.encode_image`
(value trick ``tips`` by default, ``maskclip``, or the plain ``patch`` tokens, of any ``layer``),
L2-normalised; cosine with the class text embeddings.

* ``whole``: the ``(C, h, w)`` cosine map is upsampled bilinearly to the label size, argmax.
* ``slide``: windows of ``window`` px at ``stride``; each window's cosine map is upsampled to the
  window size, softmaxed over classes, accumulated and divided by the overlap count; the
  ``(C, H, W)`` map is upsampled bilinearly to the label size, argmax.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from cache.datasets import BadImageError

from .metrics import IGNORE_INDEX, ConfusionMatrix
from .text import ClassEmbeddings

logger = logging.getLogger(__name__)

READOUTS = ("tips", "maskclip", "patch")
MODES = ("whole", "slide")
RESIZE_BACKENDS = ("pil", "torch")


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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **kw: Any) -> SegmentationSettings:
        d = self.to_dict()
        d.update(kw)
        return SegmentationSettings(**d)


# ----------------------------------------------------------------------------------------- resizing
def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Target ``(H, W)`` with the short side = ``size`` (long side truncated, as torchvision/the notebook)."""
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize_short_side(image: torch.Tensor, size: int | None, backend: str = "pil") -> torch.Tensor:
    """Resize a ``(3, H, W)`` [0, 1] image so its short side is ``size`` (bicubic)."""
    if size is None:
        return image
    h, w = image.shape[-2:]
    nh, nw = short_side_size(h, w, size)
    if (nh, nw) == (h, w):
        return image
    if backend == "pil":
        arr = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out = Image.fromarray(arr).resize((nw, nh), Image.BICUBIC)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).float().div(255).to(image.device)
    if backend == "torch":
        out = F.interpolate(
            image[None].float(), size=(nh, nw), mode="bicubic", align_corners=False, antialias=True
        )
        return out[0].clamp(0, 1)
    raise ValueError(f"unknown resize backend {backend!r}; choose one of {RESIZE_BACKENDS}")


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


def dense_patch_features(
    model: Any,
    pixels: torch.Tensor,
    readout: str = "tips",
    layer: int | None = None,
    normalize: bool = True,
    *,
    text_space: bool = True,
) -> torch.Tensor:
    """Patch features ``(B, h, w, D)`` of ``(B, 3, H, W)`` [0, 1] pixels (any size: rounded up to the patch size).

    ``text_space``: map the tokens through the model's text interface (:func:`to_text_space`), so they
    compare with text embeddings (``D`` = ``model.text_dim``); ``False`` keeps the encoder's own tokens
    (``D`` = ``embed_dim``: linear probes, PCA pictures)."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; choose one of {READOUTS}")
    pixels = round_up_to_patch(pixels, int(model.patch_size))
    with torch.no_grad():
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


def whole_scores(
    model: Any, image: torch.Tensor, text: ClassEmbeddings, settings: SegmentationSettings
) -> torch.Tensor:
    """Cosine map ``(C, h, w)`` of one resized ``(3, H, W)`` image at the patch grid."""
    feats = dense_patch_features(model, image[None], settings.readout, settings.layer)[0]
    check_text_dim(model, text, feats.shape[-1])
    return text.scores(feats)


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
    """Averaged softmax map ``(C, H, W)`` of one resized ``(3, H, W)`` image (sliding windows)."""
    _, H, W = image.shape
    boxes = slide_windows(H, W, settings.window, settings.stride)
    probs = torch.zeros(text.num_classes, H, W, device=image.device)
    counts = torch.zeros(H, W, device=image.device)
    for s in range(0, len(boxes), settings.window_batch):
        chunk = boxes[s : s + settings.window_batch]
        crops = torch.stack(
            [image[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in chunk]
        )  # all windows share one size
        feats = dense_patch_features(model, crops, settings.readout, settings.layer)
        check_text_dim(model, text, feats.shape[-1])
        for (y1, y2, x1, x2), f in zip(chunk, feats):
            cos = text.scores(f)  # (C, h, w)
            cos = F.interpolate(cos[None], size=(y2 - y1, x2 - x1), mode="bilinear", align_corners=False)[0]
            probs[:, y1:y2, x1:x2] += cos.softmax(dim=0)
            counts[y1:y2, x1:x2] += 1
    return probs / counts


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
    out_size = tuple(out_size) if out_size is not None else tuple(image.shape[-2:])
    device = model_device(model)
    img = resize_short_side(image.to(device).float(), settings.image_size, settings.resize_backend)
    if settings.mode == "whole":
        scores = whole_scores(model, img, text, settings)
    else:
        scores = slide_scores(model, img, text, settings)
    scores = F.interpolate(scores[None], size=out_size, mode="bilinear", align_corners=False)[0]
    best, pred = scores.max(dim=0)
    if settings.background_threshold is not None:
        if not 0 <= settings.background_class < text.num_classes:
            raise ValueError(
                f"background_class {settings.background_class} is not a class id (0..{text.num_classes - 1})"
            )
        pred = torch.where(best < settings.background_threshold, settings.background_class, pred)
    return pred, scores


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
) -> dict[str, Any]:
    """Zero-shot segmentation metrics of ``model`` on a labelled ``dataset``.

    Returns a dict with ``metrics`` (see :func:`metrics.segmentation_metrics`), ``settings``,
    ``num_images`` and ``examples`` (the first ``keep_examples`` :class:`Example` objects).
    """
    settings = settings or SegmentationSettings()
    names = dataset_class_names(dataset)
    if text.num_classes != len(names):
        raise ValueError(
            f"text embeddings cover {text.num_classes} classes but the dataset lists {len(names)}; build them "
            "from the dataset's class list"
        )
    check_text_dim(model, text)
    if subsets is None:
        subsets = dataset_subsets(dataset)
    if settings.background_threshold is not None and not 0 <= settings.background_class < len(names):
        raise ValueError(
            f"background_class {settings.background_class} is not a class id (0..{len(names) - 1})"
        )
    n = len(dataset) if settings.max_images is None else min(len(dataset), settings.max_images)
    if n == 0:
        raise ValueError(f"dataset {_dataset_name(dataset)} is empty")
    cm = ConfusionMatrix(len(names), IGNORE_INDEX)
    examples: list[Example] = []
    dname = _dataset_name(dataset)
    text = text.to(model_device(model))
    try:
        it = tqdm(range(n), desc=desc, disable=not progress, leave=False)
    except ImportError:  # pragma: no cover
        it = range(n)
    skipped: list[dict[str, Any]] = []  # images that cannot be used: left out and listed, never the run's end
    for i in it:
        try:
            item = dataset[i]
        except BadImageError as e:
            skipped.append({"index": i, "kind": e.kind, "error": f"{type(e).__name__}: {e}"})
            logger.warning("%s item %d skipped (%s): %s", dname, i, e.kind, e)
            continue
        image, label, key = check_item(item, i, dname)
        pred, _ = predict(model, image, text, settings, out_size=tuple(label.shape))
        cm.update(pred.cpu(), label, where=f"{dname} item {key!r}")
        if len(examples) < keep_examples:
            examples.append(Example(key, image.cpu(), label.cpu(), pred.cpu()))
    if skipped:
        logger.warning("%s: %d of %d image(s) skipped and left out of the metrics", dname, len(skipped), n)
    metrics = cm.compute(names, subsets)
    return {
        "metrics": metrics,
        "settings": settings.to_dict(),
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
) -> list[dict[str, Any]]:
    """mIoU by depth: one evaluation per block (same readout); returns ``[{layer, miou, miou_<subset>...,
    pixel_accuracy}]`` (one ``miou_<subset>`` per class subset of the dataset, e.g. ``miou_objects``)."""
    rows = []
    for k in resolve_layers(model, layers):
        res = evaluate_segmentation(
            model, dataset, text, settings.replace(layer=k), progress=progress, desc=f"layer {k}"
        )
        m = res["metrics"]
        subsets = {key: v for key, v in m.items() if key.startswith("miou_")}
        rows.append({"layer": k, "miou": m["miou"], **subsets, "pixel_accuracy": m["pixel_accuracy"]})
    return rows
