"""Export a trained student: safetensors + config JSON + model card, loadable by ``students`` and timm.

Layout of an export directory:
- ``model.safetensors``: the timm ViT's own state dict (timm key names), so
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), **kwargs)``
  loads it (``name`` and ``kwargs`` are in ``config.json["timm"]``);
- ``student_extras.safetensors``: the rest of the student (mask token, text tower), when any;
- ``config.json``: timm's hub fields (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``model_args``, ``pretrained_cfg``, as ``timm.models._hub.save_config_for_hf`` writes them, with the
  student's own normalisation), so ``timm.create_model("local-dir:DIR", pretrained=True)`` and, once
  uploaded, ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` rebuild and load the ViT; then
  ``student`` (``build_student`` config), ``timm`` (model name + create kwargs), the training config
  and final metrics (with the step and samples seen);
- ``README.md``: a model card with the config and the final metrics.

Any checkpoint (``<output_dir>/checkpoints/step_XXXXXXXX``, every ZeRO stage) exports the same files:
:func:`export_checkpoint` consolidates it with DeepSpeed's ``zero_to_fp32``
(``distill.checkpoint.consolidated_state_dict``); ``tipsdistill-export`` is its command line, with
``--push-to-hub`` (:func:`push_to_hub`, ``huggingface_hub``).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from students import build_student
from students.io import CONFIG_FILE, EXTRAS_FILE, MODEL_FILE

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)


def _cpu_contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def timm_spec(student: nn.Module) -> dict[str, Any]:
    """``{"model_name", "kwargs"}`` to rebuild the student's ViT with ``timm.create_model``."""
    cfg = dict(getattr(student, "config", {}) or {})
    kwargs = {"num_classes": 0, **dict(cfg.get("overrides") or {})}
    return {"model_name": cfg.get("name"), "kwargs": kwargs}


def timm_hub_config(student: nn.Module) -> dict[str, Any]:
    """timm's hub ``config.json`` fields of the student's ViT (``save_config_for_hf``): ``architecture``,
    ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` (the create kwargs) and
    ``pretrained_cfg`` (input size, and the student's own mean/std, tag ``tipsdistill``)."""
    from timm.models._hub import save_config_for_hf

    scfg = dict(getattr(student, "config", {}) or {})
    pcfg: dict[str, Any] = {"tag": "tipsdistill"}
    if scfg.get("mean") is not None and scfg.get("std") is not None:
        pcfg.update(mean=list(scfg["mean"]), std=list(scfg["std"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        save_config_for_hf(student.vit, str(path), model_config={"pretrained_cfg": pcfg})
        conf = json.loads(path.read_text())
    for key in ("license", "hf_hub_id", "url"):  # of the architecture's ImageNet weights, not of this student
        conf["pretrained_cfg"].pop(key, None)
    return conf


def export_student(
    student: nn.Module,
    out_dir: str | Path,
    *,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write the export files of ``student`` (a ``students.Student``) to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = student.state_dict()
    vit_sd = {k[len("vit.") :]: v for k, v in sd.items() if k.startswith("vit.")}
    extras = {k: v for k, v in sd.items() if not k.startswith("vit.")}
    save_file(_cpu_contig(vit_sd), str(out / MODEL_FILE), metadata={"format": "pt"})
    if extras:
        save_file(_cpu_contig(extras), str(out / EXTRAS_FILE), metadata={"format": "pt"})
    spec = timm_spec(student)
    conf = {
        **timm_hub_config(student),
        "format": "tipsdistill-student/1",
        "student": dict(getattr(student, "config", {}) or {}),
        "timm": spec,
        "patch_size": int(student.patch_size),
        "embed_dim": int(student.embed_dim),
        "num_global_tokens": int(student.num_global_tokens),
        "train_config": train_config or {},
        "metrics": metrics or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    (out / "README.md").write_text(model_card(conf))
    logger.info("exported student to %s", out)
    return out


def model_card(conf: dict[str, Any]) -> str:
    tc = conf.get("train_config") or {}
    spec = conf["timm"]
    metrics = conf.get("metrics") or {}
    lines = [
        f"# Student `{spec['model_name']}` distilled with tipsdistill",
        "",
        f"- recipe: `{tc.get('recipe', '?')}` (teacher source `{(tc.get('teacher') or {}).get('source', '?')}`), "
        f"{tc.get('steps', '?')} steps",
        f"- patch size {conf['patch_size']}, width {conf['embed_dim']}, {conf['num_global_tokens']} global tokens",
        f"- teacher: {json.dumps(tc.get('teacher', {}))}",
        f"- cache: {json.dumps(tc.get('cache', {}))}",
        "",
        "## Load",
        "",
        "```python",
        "from students import load_student",
        "student = load_student('PATH')  # a students.Student (DenseEncoder): encode_image(pixels in [0, 1])",
        "",
        "import timm",
        "import students  # registers the small TIPSv2 shapes (vit_w96d4_patch8_reg1_tipsv2_64, ...) with timm",
        "vit = timm.create_model('local-dir:PATH', pretrained=True)  # or 'hf-hub:ORG/NAME' once uploaded",
        "# the same, naming the architecture and the file:",
        f"vit = timm.create_model({spec['model_name']!r}, pretrained=True,",
        "                        pretrained_cfg_overlay=dict(file='PATH/model.safetensors'),",
        f"                        **{spec['kwargs']!r})",
        "```",
        "Inputs are RGB in [0, 1]; the student's own normalisation is "
        f"mean={conf['student'].get('mean')}, std={conf['student'].get('std')} (apply it yourself with timm).",
        "",
        "## Final metrics (mean of the last logged steps)",
        "",
        "| term | value |",
        "|---|---|",
    ]
    for k, v in metrics.items():
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines += ["", "## Training config", "", "```json", json.dumps(tc, indent=2, default=str), "```", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ export from a checkpoint
_LOG_META = {"step", "epoch", "consumed", "samples_seen", "lr", "wd", "samples_per_s", "data_s"}


def student_from_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The student of a checkpoint (a ``step_*`` directory, or the newest complete one of a run directory),
    any ZeRO stage, consolidated in fp32 with DeepSpeed's ``zero_to_fp32``. Returns ``(student, info)``
    with ``info``: ``checkpoint`` (path), ``step``, ``samples_seen``, ``layout`` (processes, ZeRO stage) and
    ``config`` (the run's training config)."""
    found = ckpt.find_checkpoint(path)
    states = ckpt.read_model_states(found)
    client = ckpt.client_state(states)
    config = client.get("config")
    if not config:
        raise ValueError(
            f"{found}: the checkpoint carries no training config (client state 'config'); it was not written "
            "by tipsdistill-train"
        )
    sd = ckpt.consolidated_state_dict(found, states)
    student = build_student(config["student"]["name"], **(config["student"].get("kwargs") or {}))
    prefix = "student."
    own = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"{found}: no 'student.*' tensors in the consolidated checkpoint")
    student.load_state_dict(own, strict=True)
    info = {
        "checkpoint": str(found),
        "step": int(client.get("step", 0)),
        "samples_seen": client.get("samples_seen"),
        "layout": ckpt.layout(found, states),
        "config": config,
    }
    logger.info(
        "student of %s (step %d, %d process(es), ZeRO stage %d)",
        found,
        info["step"],
        info["layout"]["world_size"],
        info["layout"]["zero_stage"],
    )
    return student.eval(), info


def logged_metrics(run_dir: str | Path, step: int, last: int = 10) -> dict[str, float]:
    """Mean of every loss term over the last ``last`` lines of ``run_dir/log.jsonl`` up to ``step`` (what
    the end of training reports, from the log: equal to it with ``log.every=1``); ``{}`` without a log."""
    log = Path(run_dir) / "log.jsonl"
    if not log.is_file():
        return {}
    recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    recs = [r for r in recs if int(r["step"]) <= step][-last:]
    if not recs:
        return {}
    keys = [k for k, v in recs[-1].items() if k not in _LOG_META and isinstance(v, float)]
    out = {k: sum(r[k] for r in recs if k in r) / len(recs) for k in keys}
    return {k: v for k, v in out.items() if math.isfinite(v)}


def export_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    push_to_hub_repo: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> Path:
    """Export the student of a checkpoint (``step_*`` dir or run dir, any ZeRO stage) to ``out_dir``
    (default ``<run>/export`` for the final step, ``<run>/export_step_XXXXXXXX`` before it): the same
    files as the end of training. With ``push_to_hub_repo``, upload them (:func:`push_to_hub`)."""
    student, info = student_from_checkpoint(path)
    found = Path(info["checkpoint"])
    run_dir = found.parent.parent
    step = info["step"]
    if out_dir is None:
        final = step == int(info["config"].get("steps", -1))
        out_dir = run_dir / ("export" if final else f"export_{ckpt.tag_for(step)}")
    metrics: dict[str, Any] = {"step": step}
    if info["samples_seen"] is not None:
        metrics["samples_seen"] = int(info["samples_seen"])
    metrics.update(logged_metrics(run_dir, step))
    out = export_student(student, out_dir, train_config=info["config"], metrics=metrics)
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, private=private, token=token, step=step)
    return out


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    step: int | None = None,
) -> str:
    """Upload an export directory to the Hugging Face Hub model repo ``repo_id`` (created when missing):
    ``huggingface_hub.HfApi.create_repo`` + ``upload_folder``. Returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import OfflineModeIsEnabled

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{folder} is not an export directory (needs {CONFIG_FILE} and {MODEL_FILE})")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"tipsdistill export (step {step})" if step is not None else "tipsdistill export",
        )
    except OfflineModeIsEnabled as exc:
        raise RuntimeError(
            f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it (and log in with `huggingface-cli "
            f"login` or pass --token) to upload {folder}"
        ) from exc
    logger.info("uploaded %s to %s", folder, url)
    return str(url)
