"""The HDF5 feature cache (stage 1): format, writer, reader and the extraction driver."""

from . import datasets as datasets
from .dataset_spec import DatasetSpec, build_from_spec, parse_dataset_spec, source_for_cache
from .datasets import BadImageError, ImageFolderDataset, build_dataset, list_datasets, register_dataset
from .extract import CacheConfig, extract_features
from .hf_stream import HFStreamingDataset
from .reader import FeatureBatch, FeatureCache, open_cache
from .shards import WebDatasetShards
from .spec import CacheSpec
from .tables import HFImageDataset, TableDataset
from .views import ViewSpec, apply_view, sample_views

try:  # registers the "synthetic" dataset when present
    from . import synthetic as _synthetic  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = [
    "BadImageError",
    "CacheConfig",
    "DatasetSpec",
    "HFImageDataset",
    "HFStreamingDataset",
    "TableDataset",
    "WebDatasetShards",
    "build_from_spec",
    "parse_dataset_spec",
    "source_for_cache",
    "CacheSpec",
    "FeatureBatch",
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
