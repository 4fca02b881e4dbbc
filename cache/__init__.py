"""The HDF5 feature cache (stage 1): format, writer, reader and the extraction driver."""

from . import datasets as datasets
from .datasets import BadImageError, ImageFolderDataset, build_dataset, list_datasets, register_dataset
from .extract import CacheConfig, extract_features
from .reader import FeatureCache, open_cache
from .spec import CacheSpec
from .views import ViewSpec, apply_view, sample_views

try:  # registers the "synthetic" dataset when present
    from . import synthetic as _synthetic  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "BadImageError",
    "CacheConfig",
    "CacheSpec",
    "FeatureCache",
    "ImageFolderDataset",
    "ViewSpec",
    "apply_view",
    "build_dataset",
    "extract_features",
    "list_datasets",
    "open_cache",
    "register_dataset",
    "sample_views",
]
