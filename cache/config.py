"""Stage 1's settings: :class:`CacheConfig`, everything an extraction run is told.

Written next to the cache (``cache_config.json``) and recorded in every shard's ``config`` attribute.
Stage 1 never changes a config in place: ``cache.plan`` resolves its automatic values (threads,
workers, autocast, TF32) into a new copy held by the frozen :class:`cache.plan.ShardPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config_layer import from_dict
from .datasets import RESIZE_MODES

STORAGE_DTYPES = ("float16", "int8")
# "fork" would hand the writer's open HDF5 file and its lock to the workers: a killed run's
# leftover workers would then keep the shard locked (docs/cache.md "What happens when it crashes")
WORKER_STARTS = ("forkserver", "spawn", "fork")
AUTOCASTS = ("auto", "none", "bf16", "fp16")
IMAGE_SOURCES = ("folder", "webdataset", "table", "hf")  # datasets that decode + resize to the cache's rule


@dataclass
class CacheConfig:
    """Everything stage 1 needs; written next to the cache (``cache_config.json`` with the cache's record,
    and ``cache_config.yaml`` by ``tipsdistill-cache``, which ``--config`` reruns)."""

    out: str = "cache"
    teacher: str = "timm"  # registry name (teachers.list_teachers()) or "package.module:factory"
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "folder"  # registry name (cache.datasets.list_datasets()) or "package.module:factory"
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | list[int] = 224
    resize: str = "short_crop"  # short_crop | exact | none
    storage: str = "float16"  # float16 | int8 (per-token scale)
    # reduced-dimension storage (cache/reduce.py): patch tokens as reduce_dim PCA coefficients (0: full dim),
    # the basis fitted on the first reduce_fit_images images (at most reduce_fit_tokens tokens, seeded)
    reduce_dim: int = 0
    reduce_fit_images: int = 1024
    reduce_fit_tokens: int = 262144
    reduce_seed: int = 0
    reduce_wait_s: float = 3600.0  # ranks > 0: how long to wait for rank 0's basis file
    value_trick: bool = False
    value_readout: str = "tips"
    layer: int | None = None
    views: int = 1
    view_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    view_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    flip_prob: float = 0.5
    first_view_full: bool = True
    view_seed: int = 0
    granularities: list[str] | None = None  # None: alt/short/detailed when the teacher has text; []: none
    batch_size: int = 32
    num_workers: int = -1  # DataLoader workers decoding images; -1: fitted to the cores (cache/resources.py)
    num_threads: int = 0  # torch intra-op threads; 0: fitted to the free cores (or OMP_NUM_THREADS)
    queue_size: int = 4
    flush_interval_s: float = 2.0
    device: str | None = None  # default accelerate's device for this process (cuda:LOCAL_RANK, else cpu)
    # the teacher's precision on CUDA (cache.plan.resolve_autocast): auto is accelerate's mixed precision
    # when it says bf16/fp16, else bf16 on a GPU that has it, float32 on the CPU; none: float32
    autocast: str = "auto"  # auto | none | bf16 | fp16 (CUDA only)
    # TF32 matmuls and convolutions on CUDA (cache.plan.resolve_tf32); None: on unless autocast is none
    tf32: bool | None = None
    min_side: int | None = None  # images with a shorter side are skipped; default one patch
    # images with more pixels are skipped before they are decoded (too_large); None: Pillow's
    # Image.MAX_IMAGE_PIXELS (cache.datasets.pixel_cap), 0: no cap
    max_pixels: int | None = None
    space_margin: float = 1.05  # refuse when estimate * margin exceeds the free disk space
    progress: bool = True
    # faults (docs/cache.md "What happens when it crashes")
    worker_start: str = "forkserver"  # DataLoader workers: forkserver | spawn never inherit the shard / lock
    fsync: bool = True  # fsync features before their done flags (survives a machine crash, not only a kill)
    lock_wait_s: float = 30.0  # a dead run's leftover processes holding the shard lock: wait this long
    # several ranks: how long a rank looks for rank 0's check file in --out before it says --out is not
    # shared by every node (cache.launch.check_shared_out); an NFS client may take up to a minute
    shared_out_wait_s: float = 60.0
    repair: bool = (
        False  # check every done sample's checksum first; repair a damaged shard, keeping intact samples
    )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheConfig:
        """Strict and typed (:func:`cache.config_layer.from_dict`): an unknown key names the nearest valid ones."""
        return from_dict(cls, d)

    def validate(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.storage not in STORAGE_DTYPES:
            raise ValueError(f"storage must be one of {STORAGE_DTYPES}, got {self.storage!r}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.num_workers < -1 or self.num_threads < 0:
            raise ValueError(
                f"num_workers must be >= -1 (-1: auto) and num_threads >= 0 (0: auto), got {self.num_workers}, {self.num_threads}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.reduce_dim < 0:
            raise ValueError(f"reduce_dim must be >= 0 (0: full dimension), got {self.reduce_dim}")
        if self.reduce_dim and (self.reduce_fit_images < 1 or self.reduce_fit_tokens < 2):
            raise ValueError(
                f"reduce_fit_images ({self.reduce_fit_images}) must be >= 1 and reduce_fit_tokens "
                f"({self.reduce_fit_tokens}) >= 2 to fit a PCA basis"
            )
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}")
        if self.shared_out_wait_s < 0:
            raise ValueError(f"shared_out_wait_s must be >= 0 seconds, got {self.shared_out_wait_s}")
        if self.worker_start not in WORKER_STARTS:
            raise ValueError(f"worker_start must be one of {WORKER_STARTS}, got {self.worker_start!r}")
