"""Measure patch-text alignment: zero-shot segmentation (mIoU), per-layer curves, image-text retrieval,
zero-shot classification, reports.

The protocol is the official TIPS zero-shot notebook's (docs/evaluation.md has the user guide).
"""

from .benchmarks import BACKGROUND_PRESETS, BENCHMARKS, MMSEG_SUBDIRS, BenchmarkDataset, convert_coco_object
from .classification import classification_accuracy, classification_report
from .datasets import (
    ADE20K,
    ADE150_CLASSES,
    CaptionFolder,
    ImageNetVal,
    KarpathyCaptions,
    SegmentationFolder,
    load_eval_dataset,
)
from .imagenet_classes import IMAGENET_CLASSNAMES
from .metrics import IGNORE_INDEX, ConfusionMatrix, segmentation_metrics
from .report import compare_models
from .retrieval import retrieval_recall, retrieval_report
from .segmentation import (
    SegmentationSettings,
    dense_patch_features,
    evaluate_segmentation,
    layer_curve,
    predict,
    resize_short_side,
    round_up_to_patch,
    slide_windows,
)
from .templates import OPENAI_IMAGENET_TEMPLATES, TCL_TEMPLATES, get_templates, load_class_names
from .text import (
    ClassEmbeddings,
    encode_class_names,
    load_text_embeddings,
    resolve_class_embeddings,
    save_text_embeddings,
)

__all__ = [
    "ADE150_CLASSES",
    "ADE20K",
    "BACKGROUND_PRESETS",
    "BENCHMARKS",
    "BenchmarkDataset",
    "MMSEG_SUBDIRS",
    "CaptionFolder",
    "ClassEmbeddings",
    "ConfusionMatrix",
    "IGNORE_INDEX",
    "IMAGENET_CLASSNAMES",
    "ImageNetVal",
    "KarpathyCaptions",
    "OPENAI_IMAGENET_TEMPLATES",
    "SegmentationFolder",
    "SegmentationSettings",
    "TCL_TEMPLATES",
    "classification_accuracy",
    "classification_report",
    "compare_models",
    "convert_coco_object",
    "dense_patch_features",
    "encode_class_names",
    "evaluate_segmentation",
    "get_templates",
    "layer_curve",
    "load_class_names",
    "load_eval_dataset",
    "load_text_embeddings",
    "predict",
    "resize_short_side",
    "resolve_class_embeddings",
    "retrieval_recall",
    "retrieval_report",
    "round_up_to_patch",
    "save_text_embeddings",
    "segmentation_metrics",
    "slide_windows",
]
