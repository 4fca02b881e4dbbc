"""Resume a checkpoint on other hardware: N processes at ZeRO stage s -> M processes at stage s'.

DeepSpeed's own ``load_checkpoint`` needs the same data-parallel world size and ZeRO stage (its
optimizer files are flat per-rank partitions). When either changes, the checkpoint is *consolidated*
and re-partitioned by the new engine:

- weights and buffers (DINO/iBOT centers): ``distill.checkpoint.consolidated_state_dict``
  (``deepspeed.utils.zero_to_fp32`` for stages 1-3, the saved module for stage 0);
- Adam moments (``exp_avg``, ``exp_avg_sq``) and the Adam step, per parameter: for a ZeRO 1-3 source,
  DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) writes them
  unpartitioned (``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt``) into a scratch folder, rank 0 only;
  for a stage-0 source they are read from the torch optimizer state DeepSpeed saved;
- the new engine takes them with DeepSpeed's fragment API (``deepspeed.utils.safe_set_full_fp32_param`` /
  ``safe_set_full_optimizer_state``, which slice the full tensor into this rank's partition) for ZeRO
  1-3, and directly into ``torch.optim.AdamW.state`` for stage 0; the low-precision/module copy of each
  parameter is written too (under ZeRO-3 inside ``GatheredParameters``).

Why not ``checkpoint: {load_universal: true}`` alone: DeepSpeed 0.19.8 loads universal checkpoints only
into its ZeRO optimizers (stage 0 has none), and stage-0 sources have no ZeRO files to convert; the
path above handles every stage 0-3 in both directions with one code path.

The data position (``ResumableSampler``: the global order is world-size independent, rank ``r`` takes
positions ``r, r + world, ...``) is converted from the old per-rank ``consumed`` to global samples and
back; a position the new global micro batch does not divide is refused.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


def remap_position(
    data: dict[str, int], *, old_world: int, new_world: int, new_batch: int, where: str
) -> dict[str, int]:
    """``{"epoch", "consumed"}`` of one of ``old_world`` ranks -> the same global position for ``new_world``.

    ``consumed`` counts this rank's samples of the current epoch; ``consumed * old_world`` samples of the
    epoch's global order are then done. Refused (naming the fix) when ``new_world * new_batch`` (the new
    global micro batch) does not divide that count."""
    done = int(data["consumed"]) * int(old_world)
    step = int(new_world) * int(new_batch)
    if done % step:
        raise ValueError(
            f"{where}: the checkpoint is {done} samples into epoch {data['epoch']} ({old_world} process(es) x "
            f"{data['consumed']}); the new run's global micro batch {new_world} process(es) x "
            f"data.batch_size={new_batch} = {step} does not divide it. Pick data.batch_size and the number of "
            f"processes so that their product divides {done} (e.g. the checkpoint's own global micro batch), "
            "or resume with the checkpoint's layout"
        )
    return {"epoch": int(data["epoch"]), "consumed": done // int(new_world)}


def _universal(ckpt_path: Path, work: Path) -> Path:
    """``ds_to_universal`` of ``ckpt_path`` into ``work`` (rank 0; the others wait); returns ``work/zero``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        from deepspeed.checkpoint import ds_to_universal

        ckpt.check_pickles(ckpt_path)  # the converter unpickles without restriction: the allow-list first
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        args = argparse.Namespace(
            input_folder=str(ckpt_path),
            output_folder=str(work),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,  # our checkpoints carry no Megatron universal info
        )
        ds_to_universal.main(args)
    if dist.is_initialized():
        dist.barrier()
    zero = work / "zero"
    if not zero.is_dir():
        raise RuntimeError(f"ds_to_universal wrote no {zero} for {ckpt_path}")
    return zero


def _stage0_moments(
    states: dict[str, Any], names: list[str]
) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    """Per-parameter Adam moments from a stage-0 checkpoint's torch optimizer state (parameters indexed in
    the order of the optimizer's groups, ``names``)."""
    opt = states.get("optimizer") or {}
    st = opt.get("state") or {}
    order = [i for g in opt.get("param_groups", []) for i in g["params"]]
    if len(order) != len(names):
        raise ValueError(
            f"stage-0 checkpoint optimizer holds {len(order)} parameters, the model trains {len(names)}; resume "
            "with the same recipe and student"
        )
    out, step = {}, 0.0
    for idx, name in zip(order, names):
        s = st.get(idx)
        if s:
            out[name] = {k: s[k].float() for k in MOMENTS}
            step = float(s["step"])
    return out, step


def _load_universal(path: Path) -> torch.Tensor:
    x = ckpt.safe_load(path)  # ZeRO 1/2 sources: {"param": tensor, ...}; ZeRO-3: the tensor
    return x["param"] if isinstance(x, dict) else x


def _universal_moments(
    zero: Path, names: list[str], shapes: dict[str, torch.Size]
) -> tuple[dict[str, dict[str, torch.Tensor]], float]:
    out, step = {}, 0.0
    for name in names:
        d = zero / name
        if not d.is_dir():
            raise ValueError(
                f"{zero}: no optimizer state of parameter {name!r} in the converted checkpoint; resume with "
                "the same recipe and student"
            )
        out[name] = {k: _load_universal(d / f"{k}.pt").float().reshape(shapes[name]) for k in MOMENTS}
        if (d / "step.pt").is_file():  # ZeRO 1/2 sources
            step = float(_load_universal(d / "step.pt"))
    common = zero / "optimizer_state.pt"
    if not step and common.is_file():  # ZeRO-3 sources: the step lives in the base optimizer's state
        st = (ckpt.safe_load(common).get("optimizer_state_dict") or {}).get("state") or {}
        steps = {float(v["step"]) for v in st.values() if isinstance(v, dict) and "step" in v}
        if len(steps) > 1:
            raise ValueError(f"{common}: Adam steps disagree across parameter groups ({sorted(steps)})")
        step = steps.pop() if steps else 0.0
    return out, step


def _init_adam_state(opt: torch.optim.Optimizer, flats: list[torch.Tensor]) -> None:
    """Create the (lazily made) AdamW state of every flat fp32 partition as its first ``step`` would, so
    DeepSpeed's fragment API has tensors to write into (ZeRO 1/2 create them only at the first step;
    ZeRO-3 keeps its partitions ``flats`` out of ``opt.param_groups`` between steps)."""
    for p in [p for g in opt.param_groups for p in g["params"]] + list(flats):
        st = opt.state[p]
        st.setdefault("step", torch.tensor(0.0))
        for k in MOMENTS:
            if k not in st:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _z3_partition(engine: Any, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor ``value`` under ZeRO-3 (``param.ds_tensor``'s size, zero padded
    at the end; DeepSpeed's ``safe_set_full_*`` fails on the padded last slice of a tiny parameter)."""
    part = param.ds_tensor.numel()
    opt = engine.optimizer
    rank = opt._get_param_partition_rank(param)
    flat = torch.zeros(part * opt._get_param_partition_world_size(param), dtype=torch.float32)
    flat[: value.numel()] = value.detach().flatten().float()
    return flat.narrow(0, part * rank, part).to(param.ds_tensor.device)


def _base_optimizer(engine: Any) -> tuple[torch.optim.Optimizer, bool]:
    """The torch optimizer holding the Adam state, and whether DeepSpeed wraps it (ZeRO 1-3, bf16: the
    state is then per flat partition and set through DeepSpeed's fragment API)."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer) and not hasattr(opt, "optimizer"):
        return opt, False
    return opt.optimizer, True


def load_resharded(
    engine: Any, ckpt_path: Path, *, zero_stage: int, param_order: list[str], work_dir: Path
) -> dict[str, Any]:
    """Load checkpoint ``ckpt_path`` (any world size / ZeRO stage) into ``engine`` (``zero_stage``).

    ``param_order``: names of the trained parameters in the optimizer's group order (how a stage-0
    source indexes its Adam state); ``work_dir``: scratch folder of the universal conversion (removed
    after). Returns the checkpoint's client state (rank 0's) plus ``source_layout``."""
    import deepspeed
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    states = ckpt.read_model_states(ckpt_path)
    src = ckpt.layout(ckpt_path, states)
    full = ckpt.consolidated_state_dict(ckpt_path, states)
    module = engine.module
    trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    names = [n for n, _ in trained]
    if src["zero_stage"] == 0:
        moments, adam_step = _stage0_moments(states, param_order)
    else:
        shapes = {n: full[n].shape for n in names if n in full}
        moments, adam_step = _universal_moments(_universal(ckpt_path, work_dir), names, shapes)
    if moments and not adam_step:
        raise ValueError(
            f"{ckpt_path}: found Adam moments but no Adam step count; cannot resume its optimizer"
        )
    saved = set(module.state_dict())  # parameters and persistent buffers (centers), what a checkpoint holds
    missing = [n for n in saved if n not in full]
    if missing:
        raise ValueError(
            f"{ckpt_path}: the checkpoint lacks {len(missing)} tensor(s) of this model (e.g. {missing[:3]}); "
            "resume with the same recipe and student"
        )
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = full[name].to(p.dtype)
            if zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.device).view_as(p))
            else:
                p.data.copy_(value.to(p.device).view_as(p))
        for name, b in module.named_buffers():
            if name in saved:
                b.copy_(full[name].to(b.device, b.dtype))
        base, wrapped = _base_optimizer(engine)
        if wrapped:
            _init_adam_state(base, getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
            link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
            if link is not None:  # ZeRO 1/2, bf16: map each parameter's fragment of the new Adam state
                link()
        for name, p in trained:
            m = moments.get(name)
            if not wrapped:  # stage 0, fp32: the client torch optimizer itself
                if m:
                    moments_p = {k: m[k].to(p.device, p.dtype).view_as(p).clone() for k in MOMENTS}
                    base.state[p] = {"step": torch.tensor(adam_step), **moments_p}
                else:  # never stepped (no gradient yet): no state, as in a new optimizer
                    base.state.pop(p, None)
                continue
            if hasattr(p, "ds_id"):  # ZeRO-3: write this rank's (padded) partition
                safe_set_local_fp32_param(p, _z3_partition(engine, p, full[name]))
                for k in MOMENTS if m else ():
                    safe_set_local_optimizer_state(p, _z3_partition(engine, p, m[k]), k)
                continue
            safe_set_full_fp32_param(p, full[name].to(p.device).float())
            for k in MOMENTS if m else ():
                safe_set_full_optimizer_state(p, m[k].to(p.device), k)
        if wrapped:
            for st in base.state.values():
                if "step" in st:
                    st["step"] = torch.full_like(torch.as_tensor(st["step"], dtype=torch.float32), adam_step)
    if dist.is_initialized():
        dist.barrier()
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        shutil.rmtree(work_dir, ignore_errors=True)
    engine.global_steps = int(src["step"])
    client = ckpt.client_state(states)
    client["source_layout"] = src
    logger.warning(  # a warning: the continuation is not bit-identical (docs/training.md, resume rules)
        "resharded %s: saved by %d process(es) at ZeRO stage %d, loaded into %d process(es) at ZeRO stage %d "
        "(weights, buffers, Adam moments and step %d re-partitioned)",
        ckpt_path,
        src["world_size"],
        src["zero_stage"],
        dist.get_world_size() if dist.is_initialized() else 1,
        zero_stage,
        int(adam_step),
    )
    return client
