"""Feature batches for stage 2, read in the training process, aligned with the sampler.

The DataLoader workers decode and augment images only; the cached teacher features of the same
samples never travel through worker IPC. :class:`FeatureFeeder` walks the sampler's order (this
rank's :meth:`distill.data.ResumableSampler.order` per epoch, in batches, the last partial batch
dropped, as the DataLoader does) in a background thread and reads each batch with
:meth:`cache.FeatureCache.read_batch` (storage dtype, parallel ``os.preadv``) into a ring of reusable
(pinned with CUDA) buffers, ``depth`` batches ahead. The main process knows each batch's indices
before its images arrive, so resuming at ``(epoch, consumed)`` restarts the thread at the same place,
and :meth:`attach` checks that the image batch and the feature batch hold the same samples.

:meth:`attach` also packs what the device needs to build the targets (the crop rois, flips and the
samples' order by sampling ratio) into the same buffer, so one host-to-device copy per batch carries
everything (:meth:`cache.reader.FeatureBatch.to_device`, a side CUDA stream); the targets are built
on the device by :class:`distill.targets.CachedTargets` / :class:`distill.targets.CachedText`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np
import torch

from tipsdistill.cache import FeatureBatch, FeatureCache

from .data import ResumableSampler, ratio_order, replay_views

logger = logging.getLogger(__name__)

# per-row fields the training process adds to each feature buffer (filled by attach)
EXTRA = {"t_roi": ((4,), torch.float32), "t_flip": ((), torch.bool), "t_order": ((), torch.int64)}


class FeatureFeeder:
    """Background reader of the feature batches of one rank's training batches.

    Args:
        cache: the feature cache (indices are cache item indices = :class:`DistillDataset` indices).
        sampler: this rank's sampler; only its (stateless) ``order(epoch)`` is read.
        batch_size: samples per batch (the DataLoader's, ``drop_last``).
        fields: cache fields to read (``patch``, ``cls``, ``text`` ...; :meth:`FeatureCache.read_batch`).
        views: ``None`` (one view stored), ``"first"`` (crop targets: the full-image view 0) or
            ``"replay"`` (the view each sample's crop replays, :func:`distill.data.replay_views`).
        seed: the data seed (replayed views are drawn from it).
        depth: batches read ahead.
    """

    # buffers beyond the queue's `depth`: the trainer holds one, the thread fills one, one spare, so no
    # buffer is refilled while a step may still read it
    SPARE_BUFFERS = 3

    def __init__(
        self,
        cache: FeatureCache,
        sampler: ResumableSampler,
        batch_size: int,
        *,
        fields: tuple[str, ...],
        views: str | None = None,
        seed: int = 0,
        depth: int = 2,
    ) -> None:
        if views not in (None, "first", "replay"):
            raise ValueError(f"views={views!r}: choose None, 'first' or 'replay'")
        self.cache, self.sampler, self.batch = cache, sampler, int(batch_size)
        self.fields, self.views, self.seed = tuple(fields), views, int(seed)
        self.depth = max(1, int(depth))
        self._slots = [
            cache.alloc_batch(self.batch, self.fields, views=views is not None, extra=EXTRA)
            for _ in range(self.depth + self.SPARE_BUFFERS)
        ]
        self._pos = (0, 0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        self.wait_s = 0.0  # seconds the trainer waited in next() for a feature batch
        self.read_s = 0.0  # seconds the thread spent reading (read_batch), summed over restarts
        self.rows_read = 0  # samples the thread read

    def seek(self, epoch: int, consumed: int) -> None:
        """Restart at sample ``consumed`` of ``epoch`` (what the loader resumes at)."""
        self.close()
        self._pos = (int(epoch), int(consumed))

    def next(self) -> FeatureBatch:
        """The next feature batch (blocks until the thread has read it)."""
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        got = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(got, BaseException):
            self._thread = None
            raise RuntimeError(f"the feature reader thread failed: {got}") from got
        return got

    def attach(self, batch: dict[str, Any], fb: FeatureBatch, epoch: int) -> dict[str, Any]:
        """Put feature batch ``fb`` into the image batch ``batch`` (``batch["features"]``), after checking
        they hold the same samples of the same epoch; moves the crop geometry into ``fb``'s buffer."""
        want = batch["index"].tolist()
        if fb.indices.tolist() != want or fb.epoch != epoch:
            raise RuntimeError(
                f"feature batch (epoch {fb.epoch}, samples {fb.indices.tolist()[:8]}...) does not match the "
                f"image batch (epoch {epoch}, samples {want[:8]}...); the feeder and the DataLoader must "
                "follow the same sampler"
            )
        host = batch.setdefault("host", {})
        if self.views == "replay" and host.get("t_view") != fb.views.tolist():
            raise RuntimeError(
                f"the worker replayed views {host.get('t_view')}, the feeder read {fb.views.tolist()}"
            )
        n = fb.size
        if "t_roi" in batch:
            fb.tensors["t_roi"][:n] = batch.pop("t_roi")
            fb.tensors["t_flip"][:n] = batch.pop("t_flip")
            ratios = host["t_ratio"]
            if len(set(ratios)) > 1:
                fb.tensors["t_order"][:n] = torch.tensor(ratio_order(ratios), dtype=torch.int64)
        if "text" in self.fields:
            host["text_valid"] = {
                g: fb.tensors[f"text_valid/{g}"][:n].tolist() for g in self.cache.granularities
            }
        batch["features"] = fb
        return batch

    # ------------------------------------------------------------------------------------ thread
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(
            target=self._run, args=(*self._pos, self._stop, self._queue), name="feature-feeder", daemon=True
        )
        self._thread.start()

    def _run(self, epoch: int, consumed: int, stop: threading.Event, q: queue.Queue) -> None:
        k, B = 0, self.batch
        V = self.cache.num_views
        try:
            while not stop.is_set():
                order = self.sampler.order(epoch)
                for start in range(consumed, len(order) - B + 1, B):
                    idx = order[start : start + B]
                    views = None
                    if self.views == "replay":
                        views = replay_views(self.seed, epoch, idx, V)
                    elif self.views == "first":
                        views = np.zeros(len(idx), np.int64)
                    slot = self._slots[k % len(self._slots)]
                    k += 1
                    t0 = time.perf_counter()
                    self.cache.read_batch(idx, self.fields, views=views, out=slot)
                    self.read_s += time.perf_counter() - t0
                    self.rows_read += len(idx)
                    slot.epoch = epoch
                    slot.views = views
                    while not stop.is_set():
                        try:
                            q.put(slot, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                epoch, consumed = epoch + 1, 0
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            logger.exception("feature reader thread failed")
            q.put(e)

    def close(self) -> None:
        """Stop the thread (the buffers stay allocated for a restart)."""
        if self._thread is not None:
            self._stop.set()
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join()
            self._thread = None


def feeder_for(dataset: Any, sampler: ResumableSampler, batch_size: int, depth: int) -> FeatureFeeder | None:
    """The :class:`FeatureFeeder` of a :class:`distill.data.DistillDataset` over a cache (the fields
    ``dataset.batch_features``), else ``None`` (no cache: online teacher or pretraining)."""
    if hasattr(dataset, "make_feeder"):  # hook: a dataset with its own reader (distill.multi, several caches)
        return dataset.make_feeder(sampler, batch_size, depth)
    fields = tuple(getattr(dataset, "batch_features", ()) or ())
    if not fields:
        return None
    views = None
    if dataset.views and any(f in fields for f in ("patch", "cls", "value_patch")):
        views = "replay" if dataset.target == "replay" else "first"
    return FeatureFeeder(
        dataset.cache, sampler, batch_size, fields=fields, views=views, seed=dataset.seed, depth=depth
    )
