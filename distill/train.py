"""Stage 2: the DeepSpeed training loop (distillation from a cache or a live teacher, or pretraining).

``train(cfg, resume=None)`` runs one process of a (possibly multi-process) job. It reads top to bottom
in ``_train``: :func:`setup` (task, data, the cache opened once, the resume check) -> :func:`build_engine`
-> :func:`resume_from_checkpoint` -> :func:`open_outputs`, then per step :func:`train_step`,
:func:`save_due`, :func:`log_step` (with :func:`maybe_eval`) and the checkpoint, then :func:`finish`; the
loop's state is one :class:`RunState`.

- distributed set-up (``cache.launch.process_place``, stage 1's answer too): under ``srun`` (one task
  per process) the SLURM task variables are translated; without a launcher the single-process env
  vars (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) are set for the
  user; with ``torchrun`` / ``deepspeed`` they come from the launcher. Backend nccl on CUDA, gloo otherwise;
- ``deepspeed.initialize`` with ZeRO stage 0-3 (or a user DeepSpeed JSON), fp32 or bf16, gradient
  accumulation and clipping; a client ``torch.optim.AdamW`` with parameter groups (no weight decay
  on norms, biases, tokens and position embeddings);
- the loop owns every schedule (``distill.schedules.Schedules``, step-indexed, built once): before each
  optimizer step it sets lr and weight decay on the param groups and passes the teacher temperature
  into the task (``engine(batch, teacher_temp=...)``); after it, the EMA momentum into the EMA updates
  (head-only EMA, or the full EMA teacher), read from the trained parameters gathered under ZeRO-3
  with ``deepspeed.zero.GatheredParameters``;
- every micro step is seeded from ``(seed, step, micro, rank)`` and every sample from
  ``(seed, epoch, index)``, so ``--resume auto`` continues bit-identically;
- a non-finite loss term stops the run (all ranks agree) naming the step and the term, before the
  backward pass and without saving anything;
- rank 0: tqdm progress (step, loss, lr, samples/s), ``log.jsonl`` with every loss term and the same
  values in every tracker of ``log.trackers`` (``distill.tracking``: TensorBoard by default, W&B,
  MLflow), ``config.yaml`` + ``run_info.json``, and at the end the exported student (``export/``, or
  ``export_step_XXXXXXXX/`` when the run stopped before ``cfg.steps``);
- ``eval.every=N``: zero-shot segmentation of the student every N steps
  (``distill.evaluation.while_training``), logged with the losses; the best checkpoint by
  ``eval.metric`` is kept as ``checkpoints/best`` apart from keep-last-K, and restored on resume;
- ``accelerate launch`` (``configs/accelerate/*.yaml``) starts the processes like ``torchrun``; the
  engine stays DeepSpeed, configured by ``engine.*`` (accelerate's DeepSpeed plugin is refused,
  see :func:`check_accelerate_env` and docs/training.md "accelerate launch").
- a checkpoint saved with other processes or another ZeRO stage resumes through ``distill.reshard``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from tipsdistill.cache import open_cache
from tipsdistill.cache.format import cache_identity
from tipsdistill.cache.launch import process_place
from tipsdistill.cache.resources import apply_threads, fit_threads, workers_setting

from . import checkpoint as ckpt
from .config import TrainConfig, config_to_dict, save_resolved
from .data import collate, collate_packed, sample_seed, unpack_tensors
from .export import export_model, export_student
from .feeder import feeder_for
from .multi import build_multi_task
from .reshard import load_resharded, remap_position
from .resume import (
    LOG_NAME,
    PREEMPT_SIGNALS,
    PreemptionWatch,
    check_resume,
    lock_run_dir,
    preempt_exit_code,
    record_start,
    rewrite_log,
)
from .schedules import Schedules
from .task import BuiltTask, build_task
from .tracking import Trackers, tracker_names

# deepspeed is imported inside the functions that use it: it reads DS_ACCELERATOR when imported,
# which setup_env() sets first

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or Inf."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_env() -> dict[str, str]:
    """Export the distributed variables DeepSpeed reads, from this process's place in the job
    (:func:`cache.launch.process_place`: the launcher's, SLURM's task variables translated, or one
    process with a free port); returns what was set here."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    place = process_place(os.environ, group=True)  # stage 2's processes always meet in one group
    alone = place.launcher == "none"
    want = {
        "RANK": str(place.rank),
        "LOCAL_RANK": str(place.local_rank),
        "WORLD_SIZE": str(place.world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()) if alone else "29500",
    }
    set_now = {k: v for k, v in want.items() if k not in os.environ}
    os.environ.update(set_now)
    if alone:
        logger.info(
            "no launcher found: running one process (set %s)",
            ", ".join(f"{k}={v}" for k, v in set_now.items()),
        )
    return set_now


def check_accelerate_env(cfg: TrainConfig) -> None:
    """Under ``accelerate launch``: stage 2 drives DeepSpeed itself from the run config, so accelerate's
    DeepSpeed plugin is refused, and a ``--mixed_precision`` that disagrees with ``engine.precision``
    too (``no``, accelerate's default, says nothing)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ValueError(
            "this accelerate config enables accelerate's DeepSpeed plugin (distributed_type: DEEPSPEED); "
            "tipsdistill-train drives DeepSpeed itself from the run config: launch with a config of "
            "configs/accelerate/ (distributed_type: MULTI_GPU) and set engine.zero_stage, engine.precision or "
            "engine.deepspeed_config"
        )
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mp not in ("", "no") and mp != cfg.engine.precision:
        raise ValueError(
            f"accelerate launch says mixed_precision={mp}, but engine.precision={cfg.engine.precision}; stage 2's "
            "precision is the DeepSpeed engine's: set engine.precision=bf16 (fp16 is not supported) or launch "
            "with --mixed_precision no"
        )


def device_for_rank() -> torch.device:
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        d = torch.device("cuda", process_place(group=True).local_rank)
        torch.cuda.set_device(d)
        return d
    return torch.device("cpu")


def build_ds_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """DeepSpeed config from the run config, or the user's JSON with batch sizes filled in."""
    ds: dict[str, Any] = {}
    if cfg.engine.deepspeed_config:
        with open(cfg.engine.deepspeed_config) as f:
            ds = json.load(f)
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.data.batch_size)
    ds.setdefault("gradient_accumulation_steps", cfg.optim.accum_steps)
    ds.setdefault(
        "train_batch_size", ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
    )
    if cfg.optim.clip_grad > 0:
        ds.setdefault("gradient_clipping", cfg.optim.clip_grad)
    zero = ds.setdefault("zero_optimization", {"stage": cfg.engine.zero_stage})
    zero.setdefault("stage", cfg.engine.zero_stage)
    if cfg.engine.precision == "bf16":
        ds.setdefault("bf16", {"enabled": True})
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    if "optimizer" in ds or "scheduler" in ds:
        raise ValueError(
            f"{cfg.engine.deepspeed_config}: drop 'optimizer'/'scheduler'; the toolkit builds AdamW with "
            "parameter groups and schedules (optim.*)"
        )
    if (
        ds["train_micro_batch_size_per_gpu"] != cfg.data.batch_size
        or ds["gradient_accumulation_steps"] != cfg.optim.accum_steps
    ):
        raise ValueError(
            f"DeepSpeed JSON batch settings (micro {ds['train_micro_batch_size_per_gpu']}, accumulation "
            f"{ds['gradient_accumulation_steps']}) disagree with data.batch_size={cfg.data.batch_size} / "
            f"optim.accum_steps={cfg.optim.accum_steps}; set them in one place"
        )
    return ds


def param_groups(
    model: torch.nn.Module, weight_decay: float, *, decay_tokens: bool = False
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on 1-d parameters (norms, biases, LayerScale) and, unless
    ``decay_tokens`` (DINO / iBOT / DINOv2), on the class/register tokens and position embeddings (timm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        is_token = "token" in leaf or "pos_embed" in leaf
        if p.ndim <= 1 or name.endswith(".bias") or (is_token and not decay_tokens):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]


def _gather_ctx(zero_stage: int):
    """Callable ``params -> context`` materialising ZeRO-3 partitioned parameters (no-op otherwise)."""
    if zero_stage == 3:
        import deepspeed

        return lambda params: deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return lambda params: contextlib.nullcontext()


def register_zero3_external(
    task: torch.nn.Module, probe_batch: dict[str, Any], *, teacher_temp: float
) -> int:
    """Under ZeRO-3, parameters read outside their own module's ``forward`` (patch-embed weights used
    through ``F.conv2d``, cls/reg/mask tokens, position tables) must be registered as external
    parameters of the root, or they stay partitioned. Found with one probe forward: every parameter
    whose owning module's forward never ran. Returns how many were registered."""
    import deepspeed

    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _inp: called.add(id(mod))) for m in task.modules()]
    buffers = {n: b.clone() for n, b in task.named_buffers()}
    was_training = task.training
    try:
        task.eval()  # no center updates
        with torch.no_grad():
            task(probe_batch, teacher_temp=teacher_temp)
    finally:
        for h in hooks:
            h.remove()
        task.train(was_training)
        with torch.no_grad():
            for n, b in task.named_buffers():
                b.copy_(buffers[n])

    n = 0
    for m in task.modules():
        if id(m) in called:
            continue
        for p in m.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(task, p)
            n += 1
    return n


def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to_device"):  # a feature batch (cache.reader.FeatureBatch): one copy, side stream
        return batch.to_device(device)
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


def _worker_ignores_preemption(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM / SIGUSR1 to the main process (it finishes the step and writes a
    checkpoint; a worker killed by the same signal would end the run without it)."""
    for name in PREEMPT_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class _Loader:
    """Endless, resumable iteration over epochs: tracks ``(epoch, consumed)`` of this rank."""

    def __init__(self, dataset, sampler, cfg: TrainConfig) -> None:
        self.dataset, self.sampler, self.cfg = dataset, sampler, cfg
        self.batch = cfg.data.batch_size
        if len(sampler.order()) < self.batch:
            raise ValueError(
                f"dataset has {len(dataset)} samples ({len(sampler.order())} per rank), fewer than one batch "
                f"(data.batch_size={self.batch}); lower the batch size or add data"
            )
        nw = workers_setting(cfg.data.num_workers, "data.num_workers")
        if nw < 0:  # auto, not resolved by train() (a loader built directly): fitted now
            nw = fit_threads(workers=nw, cuda=torch.cuda.is_available(), probe_s=0).workers
        # one loader for the whole run: with workers they persist across epochs; the sampler (main
        # process) carries the epoch and the resume position, the items carry (epoch, index)
        self.per_epoch = len(sampler.order())
        self._dl = DataLoader(
            dataset,
            batch_size=self.batch,
            sampler=sampler.endless(self.batch),  # never stops: no stall at epoch boundaries
            num_workers=nw,
            collate_fn=collate_packed if nw > 0 else collate,  # one tensor per batch crosses processes
            drop_last=True,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=cfg.data.prefetch_factor if nw > 0 else None,
            persistent_workers=nw > 0,
            worker_init_fn=_worker_ignores_preemption if nw > 0 else None,
        )
        self.epoch, self.consumed = 0, 0
        self._it = None
        # cached features read in this process, batch by batch in the sampler's order (distill.feeder)
        self.feeder = feeder_for(dataset, sampler, self.batch, cfg.cache.prefetch)

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def seek(self, epoch: int, consumed: int) -> None:
        self.epoch, self.consumed = int(epoch), int(consumed)
        self._it = None
        if self.feeder is not None:
            self.feeder.seek(self.epoch, self.consumed)

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self.sampler.set_epoch(self.epoch, self.consumed)
            self._it = iter(self._dl)
        b = unpack_tensors(next(self._it))
        if self.feeder is not None:
            b = self.feeder.attach(b, self.feeder.next(), self.epoch)
        self.consumed += self.batch
        if self.consumed + self.batch > self.per_epoch:  # the rest of the epoch is not a full batch
            self.epoch, self.consumed = self.epoch + 1, 0
        return b


def _all_reduce_terms(
    terms: dict[str, torch.Tensor], world: int, rank: int = 0
) -> tuple[list[str], torch.Tensor]:
    """The terms' names (sorted) and their mean over ranks, then one flag per rank (> 0: that rank's own
    terms were not finite), ``(T + world,)`` float32 on the device, in the same all-reduce: no host copy
    here (the values are read back by :func:`_drain_terms` at the logging interval)."""
    names = sorted(terms)
    local = torch.stack([terms[k].detach().float().reshape(()) for k in names])
    flags = torch.zeros(world, dtype=local.dtype, device=local.device)
    flags[rank] = (~torch.isfinite(local)).any().to(local.dtype)
    vals = torch.cat([local, flags])
    if world > 1:
        dist.all_reduce(vals)
        vals /= world
    return names, vals


def _batch_keys(batch: Any) -> list[str]:
    """The sample keys of a stage-2 batch (``batch["key"]``), to name them when its loss is not finite."""
    keys = batch.get("key") if isinstance(batch, dict) else None
    return [str(k) for k in keys] if isinstance(keys, (list, tuple)) else []


def _drain_terms(
    pending: list[tuple[int, int, list[str], torch.Tensor, list[str]]], accum: int, every: int, rank: int = 0
) -> list[dict[str, float]]:
    """Read the pending ``(step, micro, names, values, keys)`` back with ONE host copy; per optimizer step the
    mean of each term over its micro steps. A non-finite term raises :class:`TrainingDiverged` naming the
    first such step, micro step and term, the ranks whose own batch gave it and this rank's sample keys of
    that batch (checked here, at the logging interval and before every checkpoint, so a diverged run never
    saves)."""
    if not pending:
        return []
    rows = torch.stack([v for _, _, _, v, _ in pending]).cpu().tolist()
    per_step: dict[int, dict[str, float]] = {}
    for (st, micro, names, _, keys), full in zip(pending, rows):
        row, flags = full[: len(names)], full[len(names) :]
        bad = [(k, v) for k, v in zip(names, row) if not math.isfinite(v)]
        if bad:
            pending.clear()
            ranks = [r for r, f in enumerate(flags) if f > 0]
            mine = rank in ranks
            shown = ", ".join(keys[:16]) + (f" ... ({len(keys)} in all)" if len(keys) > 16 else "")
            raise TrainingDiverged(
                f"loss term {bad[0][0]!r} is {bad[0][1]} at step {st} (micro step {micro}); the batch of "
                f"rank(s) {ranks or '?'} gave it; this rank's ({rank}) batch "
                f"{'(non-finite here) ' if mine else '(finite here) '}held the samples [{shown}]. Stopping without "
                f"saving (last complete checkpoint stays valid; terms are checked every log.every={every} steps "
                "and before each checkpoint). Check those samples (tipsdistill-cache --verify --out CACHE flags "
                "non-finite cached features), lower optim.lr or raise optim.warmup_steps"
            )
        acc = per_step.setdefault(st, {})
        for k, v in zip(names, row):
            acc[k] = acc.get(k, 0.0) + v / accum
    pending.clear()
    return list(per_step.values())


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    *,
    max_steps: int | None = None,
    allow_changes: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Run (or resume) training; returns ``{"step", "final": {term: value}, "export": path, "engine",
    "preempted": signal name or None}``.

    ``max_steps`` stops early after that many optimizer steps (schedules still follow ``cfg.steps``);
    used to simulate interruption. ``allow_changes``: config keys (or sections, or ``all``) and
    ``cache.<identity field>`` a resume may change (``distill.resume.check_resume``). The run holds
    ``output_dir/run.lock`` throughout; SIGTERM / SIGUSR1 stop it at the next step boundary with a
    checkpoint (``preempted`` names the signal; no export).
    """
    check_accelerate_env(cfg)
    names = tracker_names(cfg.log)  # an unknown or not-installed tracker fails before anything starts
    setup_env()
    import deepspeed

    device = device_for_rank()
    # intra-op threads (and data.num_workers=auto) fitted to the cores this process may use (cache/resources.py)
    threads = fit_threads(
        workers=cfg.data.num_workers, threads=cfg.engine.cpu_threads, cuda=device.type == "cuda"
    )
    apply_threads(threads)
    cfg.data.num_workers = threads.workers
    backend = cfg.engine.dist_backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    lock = lock_run_dir(Path(cfg.output_dir))  # one run per output_dir (every rank fails if another holds it)
    try:
        return _train(cfg, resume, max_steps, tuple(allow_changes), names, device, rank, world)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class RunState:
    """Everything the loop carries: what :func:`setup` builds (task, data, engine), the counters a
    checkpoint saves (``step``, ``samples_seen``, ``best``), the loss terms not yet read back
    (``pending``) and per optimizer step (``history``), and the outputs (log file, trackers, bar)."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    rank: int
    world: int
    built: BuiltTask
    loader: _Loader
    cache_ident: dict[str, Any] | None
    found: tuple[str, str] | None = None  # the checkpoint resumed from: (checkpoint dir, tag)
    states: dict[str, Any] | None = None  # its model states, read once for the resume check
    evaluator: Any = None  # distill.evaluation.while_training.TrainingEval when eval.every > 0
    engine: Any = None
    groups: list[dict[str, Any]] = field(default_factory=list)  # AdamW parameter groups (param_groups)
    zero_stage: int = 0
    schedules: Schedules | None = None
    gather: Callable[[Any], Any] = contextlib.nullcontext
    step: int = 0
    stop: int = 0  # the step this start ends at (cfg.steps, or earlier with max_steps)
    samples_seen: int = 0
    best: dict[str, Any] | None = None  # {"step", "metric", "value"} of checkpoints/best
    history: list[dict[str, float]] = field(default_factory=list)
    pending: list[tuple[int, int, list[str], torch.Tensor, list[str]]] = field(default_factory=list)
    t_last: float = 0.0
    log_f: Any = None
    trackers: Trackers | None = None
    bar: Any = None
    preempted: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.accum_steps * self.world

    def client_state(self) -> dict[str, Any]:
        """The state at the current step, saved with its checkpoints (:func:`_client_state`)."""
        return _client_state(
            self.cfg,
            self.step,
            self.built,
            self.loader,
            self.best,
            samples_seen=self.samples_seen,
            world=self.world,
            cache_ident=self.cache_ident,
        )


def _train(
    cfg: TrainConfig,
    resume: str | None,
    max_steps: int | None,
    allow_changes: tuple[str, ...],
    names: list[str],
    device: torch.device,
    rank: int,
    world: int,
) -> dict[str, Any]:
    """:func:`train` after the distributed set-up, holding the run directory's lock: the loop."""
    run = setup(cfg, resume, allow_changes, device, rank, world)
    build_engine(run)
    if run.found is not None:
        resume_from_checkpoint(run)
    open_outputs(run, names, max_steps)
    watch = PreemptionWatch(world)  # SIGTERM / SIGUSR1: a checkpoint at the next step boundary, then exit
    try:
        while run.step < run.stop:
            vals = train_step(run)
            run.preempted = watch.poll()  # every rank agrees (distill.resume.PreemptionWatch)
            save_now = save_due(run)
            log_step(run, vals, save_now=save_now)  # reads the loss terms back before any save
            if save_now:
                ckpt.save(
                    run.engine, run.out, run.step, run.client_state(), keep_last=cfg.checkpoint.keep_last
                )
            if run.preempted is not None:
                logger.warning(
                    "%s: stopped after step %d with a checkpoint; exit code %d asks the scheduler to requeue; "
                    "--resume auto continues",
                    run.preempted,
                    run.step,
                    preempt_exit_code(run.preempted),
                )
                break
    finally:
        watch.close()
        close_outputs(run)
    return finish(run)


def setup(
    cfg: TrainConfig,
    resume: str | None,
    allow_changes: tuple[str, ...],
    device: torch.device,
    rank: int,
    world: int,
) -> RunState:
    """The task (model, heads, losses, data) and the data loader, the cache opened once; a resume's
    checkpoint found and compared with this start (config, cache identity) before anything is written;
    rank 0 writes the resolved config, this start's record and the skipped keys."""
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    found = ckpt.resolve_resume(resume, out)
    if found is None and ckpt.list_complete(ckpt.checkpoint_dir(out)):
        raise ValueError(
            f"{out} already holds checkpoints of another run; pass --resume auto to continue it or choose "
            "another output_dir"
        )
    cache = open_cache(cfg.cache.path) if cfg.cache.path else None
    if cfg.multi_teacher:  # hook (distill.multi): several caches, each one's identity by teacher name
        built = build_multi_task(cfg, device=device, rank=rank, world=world)
        cache_ident = {name: t["cache_identity"] for name, t in built.info["teachers"].items()}
    else:
        built = build_task(cfg, device=device, rank=rank, world=world, cache=cache)
        cache_ident = cache_identity(cache.meta) if cache is not None else None
    accepted: list[tuple[str, Any, Any]] = []
    states: dict[str, Any] | None = None
    if found is not None:
        path = Path(found[0]) / found[1]
        states = ckpt.read_model_states(path)
        saved = ckpt.client_state(states)
        accepted = check_resume(
            path, saved, config_to_dict(cfg), cache_ident, world=world, allow=allow_changes
        )
        # a rollback (an older checkpoint of this run): the newer ones of the abandoned timeline go aside
        ckpt.set_aside_newer(out, int(saved.get("step", ckpt.layout(path, states)["step"])))
    if rank == 0:
        _record_start(cfg, out, built, found, states, accepted, cache_ident, world)
    run = RunState(
        cfg,
        out,
        device,
        rank,
        world,
        built,
        _Loader(built.dataset, built.sampler, cfg),
        cache_ident,
        found,
        states,
    )
    if cfg.eval.every > 0:  # before the engine: the evaluator keeps a plain copy of the student
        from .evaluation.while_training import TrainingEval

        online = cfg.teacher.source == "online"
        # several teachers: the text-aligned teacher's cache names the text (eval.adaptor: the view measured)
        text_teacher = getattr(built.task, "text_teacher", None)
        run.evaluator = TrainingEval(
            cfg,
            built.student,
            device=device,
            online_teacher=built.task.targets.modules().get("teacher") if online else None,
            cache_meta=cache.meta if cache is not None else built.text_cache_meta,
            adaptor=cfg.eval.adaptor or None,
            cache_path=built.info["teachers"][text_teacher]["path"] if text_teacher else "",
        )
    return run


def _record_start(
    cfg: TrainConfig,
    out: Path,
    built: BuiltTask,
    found: tuple[str, str] | None,
    states: dict[str, Any] | None,
    accepted: list[tuple[str, Any, Any]],
    cache_ident: dict[str, Any] | None,
    world: int,
) -> None:
    """Rank 0: ``config.yaml`` + ``run_info.json``, ``starts/NNN-step_*.yaml`` and ``skipped_keys.txt``."""
    out.mkdir(parents=True, exist_ok=True)
    resumed_from = str(Path(found[0]) / found[1]) if found is not None else None
    extra = {
        "world_size": world,
        "task": built.info,
        "resumed_from": resumed_from,
        "cache_identity": cache_ident,
    }
    save_resolved(cfg, out, extra=extra)
    start_step = int(ckpt.client_state(states).get("step", 0)) if states is not None else 0
    record_start(out, config_to_dict(cfg), step=start_step, resumed_from=resumed_from, accepted=accepted)
    if getattr(built.dataset, "skipped_keys", None):
        (out / "skipped_keys.txt").write_text("\n".join(built.dataset.skipped_keys) + "\n")


def build_engine(run: RunState) -> None:
    """AdamW with parameter groups, the schedules, the ZeRO-3 external parameters (one probe batch) and
    ``deepspeed.initialize``."""
    import deepspeed

    cfg, task = run.cfg, run.built.task
    ds_cfg = build_ds_config(cfg, run.world)
    run.zero_stage = int(ds_cfg["zero_optimization"].get("stage", 0))
    run.groups = param_groups(task, cfg.optim.weight_decay, decay_tokens=cfg.optim.decay_tokens)
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "apply_wd"} for g in run.groups],
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    run.schedules = Schedules(cfg)  # every schedule of the run: lr, weight decay, EMA momentum, teacher temp
    if run.zero_stage == 3:
        # probe on a tiny batch to find parameters read outside their module's forward
        probe = _to_device(run.loader.next(), run.device)
        run.loader.seek(0, 0)
        torch.manual_seed(sample_seed(cfg.seed, 99991))
        n_ext = register_zero3_external(task, probe, teacher_temp=run.schedules.teacher_temp(0))
        logger.info("ZeRO-3: %d parameters registered as external to the root module", n_ext)
    run.engine, _, _, _ = deepspeed.initialize(
        model=task, optimizer=optimizer, config=ds_cfg, dist_init_required=False
    )
    run.gather = _gather_ctx(run.zero_stage)


def resume_from_checkpoint(run: RunState) -> None:
    """Load the checkpoint ``run.found``: DeepSpeed's own load for the same layout, ``distill.reshard``
    for other processes or another ZeRO stage; then the counters, the EMA state, the data position and
    the best as of that step (a best saved after it is redone by the replayed steps)."""
    cfg, found = run.cfg, run.found
    path = Path(found[0]) / found[1]
    src = ckpt.layout(path, run.states)
    run.states = None  # the engine loads its own copy
    if (src["world_size"], src["zero_stage"]) == (run.world, run.zero_stage):
        client = ckpt.load(run.engine, *found)
        data = client["data"]
        ckpt.set_rng_state(client["rng"])
    else:
        by_id = {id(p): n for n, p in run.engine.module.named_parameters()}
        order = [by_id[id(p)] for g in run.groups for p in g["params"]]
        work_dir = run.out / ".reshard" / found[1]
        client = load_resharded(
            run.engine, path, zero_stage=run.zero_stage, param_order=order, work_dir=work_dir
        )
        data = remap_position(
            client["data"],
            old_world=src["world_size"],
            new_world=run.world,
            new_batch=cfg.data.batch_size,
            where=str(path),
        )
        logger.warning(
            "RNG states not restored (saved by %d process(es) at ZeRO stage %d, %d run now at stage %d); "
            "crops, masks and captions are seeded per sample and step, so they do not depend on them",
            src["world_size"],
            src["zero_stage"],
            run.world,
            run.zero_stage,
        )
    run.step = int(client["step"])
    old = client.get("config") or {}
    old_batch = (old.get("data") or {}).get("batch_size", cfg.data.batch_size)
    old_accum = (old.get("optim") or {}).get("accum_steps", cfg.optim.accum_steps)
    run.samples_seen = int(client.get("samples_seen", run.step * old_batch * old_accum * src["world_size"]))
    run.built.load_aux_state(client["aux"])
    run.loader.seek(**data)
    run.best = client["best"] if "best" in client else ckpt.read_best(run.out)
    logger.info("resumed from %s at step %d (%d samples seen)", path, run.step, run.samples_seen)
    if run.best is not None:
        logger.info(
            "best so far: step %d, %s = %.4g", run.best["step"], run.best["metric"], run.best["value"]
        )


def open_outputs(run: RunState, names: list[str], max_steps: int | None) -> None:
    """``log.jsonl`` (a resumed run drops the lines past its checkpoint: written after it, then lost; a
    torn last line, left by a power loss, is reported and dropped; the rewrite is atomic), the trackers
    and the progress bar on rank 0; the step this start stops at."""
    cfg = run.cfg
    run.stop = cfg.steps if max_steps is None else min(cfg.steps, run.step + max_steps)
    if run.is_main:
        log_path = run.out / LOG_NAME
        if run.found is not None and log_path.exists():
            kept, dropped, torn = rewrite_log(log_path, run.step)
            logger.info(
                "%s: kept %d line(s) up to step %d, dropped %d written after it, %d torn",
                log_path,
                kept,
                run.step,
                dropped,
                len(torn),
            )
        else:
            log_path.write_text("")
        run.log_f = open(log_path, "a")
        run.trackers = Trackers(
            names,
            run.out,
            run_name=cfg.log.run_name or run.out.name,
            project=cfg.log.project,
            config=config_to_dict(cfg),
            tracker_kwargs=cfg.log.tracker_kwargs,
        )
        if cfg.log.progress:
            run.bar = tqdm(total=cfg.steps, initial=run.step, desc=f"train {cfg.recipe}", dynamic_ncols=True)
    run.engine.train()
    run.t_last = time.time()


def train_step(run: RunState) -> dict[str, Any]:
    """One optimizer step: the scheduled lr and weight decay set, ``accum_steps`` micro steps (each
    seeded from ``(seed, step, micro, rank)``; its loss terms all-reduced, read back later), the EMA
    updates. Returns the step's record so far (the schedules' values, ``data_s``)."""
    cfg, engine = run.cfg, run.engine
    vals = run.schedules.at(run.step)
    for g, group in zip(engine.optimizer.param_groups, run.groups):
        g["lr"] = vals["lr"]
        g["weight_decay"] = vals["wd"] if group["apply_wd"] else 0.0
    t_data = 0.0
    for micro in range(cfg.optim.accum_steps):
        t0 = time.time()
        batch = _to_device(run.loader.next(), run.device)
        t_data += time.time() - t0
        torch.manual_seed(sample_seed(cfg.seed, run.step, micro, run.rank))
        terms = engine(batch, teacher_temp=vals["teacher_temp"])
        total = sum(terms.values())
        terms = {**terms, "loss": total}
        names, values = _all_reduce_terms(terms, run.world, run.rank)
        run.pending.append((run.step + 1, micro, names, values, _batch_keys(batch)))
        engine.backward(total)
        engine.step()
    run.built.after_step(momentum=vals["momentum"], gather=run.gather)
    run.step += 1
    run.samples_seen += run.global_batch
    return {"lr": vals["lr"], "wd": vals["wd"], "data_s": t_data}


def save_due(run: RunState) -> bool:
    """A checkpoint after this step: every ``checkpoint.every`` steps, at the last step
    (``checkpoint.at_end``), or on a preemption signal."""
    ck = run.cfg.checkpoint
    every = bool(ck.every) and run.step % ck.every == 0
    return every or (run.step == run.cfg.steps and ck.at_end) or run.preempted is not None


def log_step(run: RunState, vals: dict[str, Any], *, save_now: bool) -> dict[str, Any]:
    """The step's record: its loss terms (read back with one host sync at the logging interval, before
    a checkpoint and before an evaluation, so a diverged run stops before it evaluates or saves),
    samples/s and the evaluation's metrics on an evaluation step; written to ``log.jsonl`` and the
    trackers on a logging step, shown on the progress bar."""
    cfg, step = run.cfg, run.step
    eval_now = run.evaluator is not None and step % cfg.eval.every == 0
    log_now = step % cfg.log.every == 0 or step == run.stop or eval_now or run.preempted is not None
    if log_now or save_now:  # the one host sync of the step, at the logging interval
        run.history += _drain_terms(run.pending, cfg.optim.accum_steps, cfg.log.every, run.rank)
    acc = run.history[-1] if not run.pending else {}
    now = time.time()
    rec = {
        "step": step,
        **run.loader.position(),
        "samples_seen": run.samples_seen,
        "lr": vals["lr"],
        "wd": vals["wd"],
        **acc,
        "samples_per_s": run.global_batch / max(now - run.t_last, 1e-9),
        "data_s": vals["data_s"],
    }
    run.t_last = now
    if eval_now:  # every rank (its share of the images; ZeRO-3 gathers the student)
        maybe_eval(run, rec)
        run.t_last = time.time()  # samples/s measure training; the evaluation has its own eval/s
    if run.is_main:
        if log_now:
            run.log_f.write(json.dumps(rec) + "\n")
            run.log_f.flush()
            run.trackers.log(rec, step)
        if run.bar is not None:
            run.bar.update(1)
            if acc:
                run.bar.set_postfix(
                    loss=f"{acc['loss']:.4f}", lr=f"{vals['lr']:.2e}", sps=f"{rec['samples_per_s']:.1f}"
                )
    return rec


def maybe_eval(run: RunState, rec: dict[str, Any]) -> None:
    """Zero-shot segmentation of the student (and of the full EMA copy when the export holds it) into
    ``rec``; a new best by ``eval.metric`` is kept as ``checkpoints/best`` (``eval.keep_best``)."""
    cfg = run.cfg
    # the full EMA copy, when the export holds it (checkpoint.export): evaluated while training too
    ema = run.built.task.targets.modules().get("ema_student") if cfg.checkpoint.export != "student" else None
    rec.update(run.evaluator(run.built.student, gather=run.gather, ema=ema))
    if run.is_main:
        shown = [
            f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in rec.items() if k.startswith("eval/")
        ]
        logger.info("step %d: %s", run.step, ", ".join(shown))
    value = rec[run.evaluator.key]
    if value is not None and (run.best is None or value > run.best["value"]):
        run.best = {"step": run.step, "metric": run.evaluator.key, "value": value}
        if cfg.eval.keep_best:
            ckpt.save_best(run.engine, run.out, run.step, run.client_state(), run.best)


def close_outputs(run: RunState) -> None:
    """Stop the feeder thread, close the bar, the log file and the trackers (also after an error)."""
    if run.loader.feeder is not None:
        run.loader.feeder.close()
    if run.bar is not None:
        run.bar.close()
    if run.log_f is not None:
        run.log_f.close()
    if run.trackers is not None:
        run.trackers.finish()


def finish(run: RunState) -> dict[str, Any]:
    """The run's result: the mean of the last 10 steps' terms, and (unless preempted: the grace period
    is short, the checkpoint is written) the exported student, ``export/`` or, for a run stopped before
    ``cfg.steps`` (``--max-steps``), ``export_step_XXXXXXXX/``."""
    cfg, step, built = run.cfg, run.step, run.built
    final = {}
    if run.history:
        tail = run.history[-min(len(run.history), 10) :]
        final = {k: sum(h[k] for h in tail) / len(tail) for k in tail[-1]}
    result = {"step": step, "final": final, "export": None, "best": run.best, "engine": run.engine}
    if run.preempted is not None:
        return {**result, "preempted": run.preempted}
    export_path = run.out / ("export" if step == cfg.steps else f"export_{ckpt.tag_for(step)}")
    with run.gather(list(built.student.parameters())):
        if run.is_main:
            ema = built.task.targets.modules().get("ema_student")
            model = export_model(built.student, ema, cfg.checkpoint.export)
            metrics = {
                "step": step,
                "samples_seen": run.samples_seen,
                "weights": "ema" if model is not built.student else "student",
                **final,
            }
            export_student(model, export_path, train_config=config_to_dict(cfg), metrics=metrics)
    if dist.is_initialized():
        dist.barrier()
    return {**result, "export": str(export_path), "preempted": None}


def _client_state(
    cfg: TrainConfig,
    step: int,
    built: Any,
    loader: _Loader,
    best: dict[str, Any] | None,
    *,
    samples_seen: int,
    world: int,
    cache_ident: dict[str, Any] | None,
) -> dict[str, Any]:
    """The run's own state saved with a checkpoint (DeepSpeed ``client_state``, one file per rank); the
    config and the cache's identity are what a resume compares (``distill.resume.check_resume``)."""
    return {
        "step": step,
        "aux": built.aux_state(),
        "data": loader.position(),
        "samples_seen": samples_seen,
        "world_size": world,
        "rng": ckpt.rng_state(),
        "config": config_to_dict(cfg),
        "cache_identity": cache_ident,
        "best": best,
    }
