"""Export a trained student: safetensors + config JSON + model card, loadable by ``students`` and timm.

Layout of an export directory:
- ``model.safetensors``: the timm ViT's own state dict (timm key names), so
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=".../model.safetensors"), **kwargs)``
  loads it (``name`` and ``kwargs`` are in ``config.json["timm"]``);
- ``student_extras.safetensors``: the rest of the student (mask token, text tower), when any;
- the files a student text tower's architecture needs (``text_tokenizer.model``, a ``tips`` tower's
  SentencePiece model; ``text_encoder/``, an ``hf`` tower's ``config.json`` + tokenizer files), named
  relative to the export in ``student.text``;
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

Which weights: ``checkpoint.export`` (``auto``: the full EMA copy under ``ema.kind=full``, the weights DINO,
iBOT and TIPS release, else the student; or ``student`` / ``ema``), :func:`export_model`.

``--format embedded-teacher`` (:func:`export_embedded_teacher`) writes the same weights as an
embedded-teacher folder (``teachers.embedded``: ``model.safetensors`` with ``vision.*`` / ``text.*`` in
float16, ``config.json``, ``tokenizer.model``), loadable with ``build_teacher("embedded", path=DIR)``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tipsdistill.students import build_student
from tipsdistill.students.factory import check_trusted
from tipsdistill.students.io import CONFIG_FILE, EXTRAS_FILE, MODEL_FILE, backbone_key
from tipsdistill.students.variants import expanded_spelling
from tipsdistill.teachers.embedded import TEXT_FIELDS

from . import checkpoint as ckpt

logger = logging.getLogger(__name__)


def _cpu_contig(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def timm_spec(student: nn.Module) -> dict[str, Any]:
    """``{"model_name", "kwargs"}`` to rebuild the student's timm model with ``timm.create_model``; for a
    feature-map student also ``pruned_after`` (the ``feature_info`` stage it was pruned after:
    ``model.prune_intermediate_layers([stage], prune_head=True)`` before loading the weights)."""
    cfg = dict(getattr(student, "config", {}) or {})
    kwargs = {"num_classes": 0, **dict(cfg.get("overrides") or {})}
    spec: dict[str, Any] = {"model_name": cfg.get("name"), "kwargs": kwargs}
    if backbone_key(student) != "vit":
        spec["pruned_after"] = cfg.get("feature_stage")
    return spec


def architecture(student: nn.Module) -> dict[str, Any]:
    """What the student is, for ``config.json`` and the model card: ``kind`` (``vit`` or ``featuremap``),
    its backbone, its token grid's stride and width, and its zero-shot ``readout`` (``tips``, the value
    trick, for ViTs; ``maskclip``, the attention pool's values of every dense token, for feature-map
    students: :meth:`students.featuremap.FeatureMapStudent.pool_values`)."""
    cfg = dict(getattr(student, "config", {}) or {})
    if backbone_key(student) == "vit":
        return {
            "kind": "vit",
            "backbone": cfg.get("name"),
            "stride": int(student.patch_size),
            "width": int(student.embed_dim),
            "readout": "tips",
        }
    return {
        "kind": "featuremap",
        "backbone": cfg.get("name"),
        "feature_stage": cfg.get("feature_stage"),
        "stride": int(student.patch_size),
        "stage_width": int(student.width),
        "width": int(student.embed_dim),
        "global_pool": f"attention pooling, {int(student.num_global_tokens)} latent queries",
        "readout": "maskclip",
    }


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


def text_interface(student: nn.Module) -> dict[str, Any]:
    """``config.json`` fields of the student's text interface: ``text_dim`` (the text space its tokens are
    compared in) and, when it carries a projection into it, where the weight is and how it is applied."""
    text_dim = int(getattr(student, "text_dim", student.embed_dim))
    out: dict[str, Any] = {"text_dim": text_dim}
    if getattr(student, "text_proj", None) is not None:
        out["text_interface"] = {
            "kind": "linear",
            "file": EXTRAS_FILE,
            "weight": "text_proj.weight",
            "shape": [text_dim, int(student.embed_dim)],
            "bias": False,
            "applies_to": "global, patch and value-trick tokens, before L2 normalisation",
        }
    return out


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
    prefix = backbone_key(student) + "."
    vit_sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    extras = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    save_file(_cpu_contig(vit_sd), str(out / MODEL_FILE), metadata={"format": "pt"})
    if extras:
        save_file(_cpu_contig(extras), str(out / EXTRAS_FILE), metadata={"format": "pt"})
    spec = timm_spec(student)
    scfg = dict(getattr(student, "config", {}) or {})
    tower = getattr(student, "text", None)
    if tower is not None and hasattr(tower, "export_architecture"):
        # the files the tower's architecture needs travel with the export (no pretrained weights)
        scfg["text"] = tower.export_architecture(out)
    # timm's hub fields only where timm.create_model("local-dir:...") rebuilds the model (a ViT; a feature-map
    # student's timm model is pruned after its stage, see "timm")
    hub = timm_hub_config(student) if backbone_key(student) == "vit" else {}
    conf = {
        **hub,
        "format": "tipsdistill-student/1",
        "student": scfg,
        "architecture_info": architecture(student),
        "teacher": teacher_of(train_config or {}),
        "timm": spec,
        "patch_size": int(student.patch_size),
        "embed_dim": int(student.embed_dim),
        "num_global_tokens": int(student.num_global_tokens),
        **text_interface(student),
        "train_config": train_config or {},
        "metrics": metrics or {},
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    (out / "README.md").write_text(model_card(conf))
    logger.info("exported student to %s", out)
    return out


ONNX_FILE = "model.onnx"


class OnnxStudent(nn.Module):
    """What ``--format onnx`` traces: ``pixels (B, 3, H, W)`` RGB in [0, 1] -> ``dense (B, h, w, text_dim)``
    (the zero-shot readout's tokens through the text interface) and ``global (B, C, text_dim)`` (the global
    tokens through it), unnormalised: L2-normalise both before comparing them with text embeddings.
    ``readout``: ``patch`` (the tokens), ``maskclip`` (for a ViT the value trick, for a feature-map student
    its attention pool's values) or, for a ViT, ``tips``."""

    def __init__(self, student: nn.Module, readout: str) -> None:
        super().__init__()
        self.student = student
        self.readout = readout

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = self.readout != "patch"
        feats = self.student.encode_image(
            pixels, value_trick=value, value_readout=self.readout if value else "tips"
        )
        dense = feats.value_patch if value else feats.patch
        return self.student.project_to_text(dense), self.student.project_to_text(feats.cls)


def export_onnx(
    student: nn.Module,
    path: str | Path,
    *,
    image_size: int,
    dynamic_size: bool = False,
    readout: str | None = None,
    opset: int = 17,
    check: bool = True,
) -> dict[str, Any]:
    """Write ``student`` as an ONNX graph (:class:`OnnxStudent`: dense text-space features and global
    embeddings) with a dynamic batch and a fixed ``image_size`` square input (``dynamic_size``: any height and
    width, multiples of the stride), traced with ``torch.onnx.export`` (TorchScript exporter). ``readout``:
    the student's zero-shot readout by default (``tips`` for a ViT, ``maskclip`` for a feature-map student).
    ``check``: run the graph with onnxruntime on two random batches and compare with PyTorch (raises
    beyond 1e-4). Returns the facts recorded in ``config.json["onnx"]``."""
    from .evaluation.segmentation import resolve_readout

    try:
        import onnx  # noqa: F401  (the exporter writes its protobuf)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"--format onnx needs onnx and onnxruntime ({exc}); pip install 'tipsdistill[onnx]'"
        ) from exc
    path = Path(path)
    if image_size % int(student.patch_size):
        raise ValueError(
            f"--image-size {image_size} is not a multiple of the student's stride {student.patch_size}"
        )
    readout = resolve_readout(student, readout or "tips")
    model = OnnxStudent(copy.deepcopy(student).float().cpu().eval(), readout).eval()
    model.student.check_inputs = False  # value checks are Python control flow: not part of a graph
    axes: dict[str, dict[int, str]] = {"pixels": {0: "batch"}, "dense": {0: "batch"}, "global": {0: "batch"}}
    if dynamic_size:
        axes["pixels"].update({2: "height", 3: "width"})
        axes["dense"].update({1: "grid_h", 2: "grid_w"})
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["dense", "global"],
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    info: dict[str, Any] = {
        "file": path.name,
        "inputs": {
            "pixels": [
                "batch",
                3,
                "height" if dynamic_size else image_size,
                "width" if dynamic_size else image_size,
            ]
        },
        "outputs": {
            "dense": ["batch", "grid_h", "grid_w", int(student.text_dim)],
            "global": ["batch", int(student.num_global_tokens), int(student.text_dim)],
        },
        "image_size": int(image_size),
        "dynamic_size": bool(dynamic_size),
        "readout": readout,
        "opset": int(opset),
        "normalised": False,
    }
    if check:
        info["max_abs_diff"] = onnx_max_diff(model, path, image_size, dynamic_size)
        if info["max_abs_diff"] > 1e-4:
            raise RuntimeError(
                f"{path}: onnxruntime differs from PyTorch by {info['max_abs_diff']:.3g} (> 1e-4); try another --opset"
            )
    logger.info(
        "exported ONNX %s (%s readout, max |ORT - torch| %s)", path, readout, info.get("max_abs_diff")
    )
    return info


def onnx_max_diff(model: nn.Module, path: str | Path, image_size: int, dynamic_size: bool) -> float:
    """Largest ``|onnxruntime - PyTorch|`` over both outputs of two random batches (3 images at ``image_size``;
    with ``dynamic_size`` also 1 image of another height and width)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    stride = int(model.student.patch_size)
    shapes = [(3, image_size, image_size)]
    if dynamic_size:
        shapes.append((1, image_size + stride, image_size + 2 * stride))
    worst = 0.0
    for b, h, w in shapes:
        x = torch.rand(b, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = sess.run(None, {"pixels": x.numpy()})
        worst = max(worst, *(float((torch.from_numpy(g) - r).abs().max()) for g, r in zip(got, ref)))
    return worst


EXPORT_CHOICES = ("auto", "student", "ema")


def export_model(student: nn.Module, ema: nn.Module | None, choice: str = "auto") -> nn.Module:
    """The model an export holds: ``student``, or (``choice="ema"``, or ``"auto"`` when a full EMA copy
    exists) a copy of it whose image side carries the EMA weights (``ema``: the EMA student of
    ``ema.kind=full``, without a text tower; the text tower stays the trained one, as in TIPS)."""
    if choice not in EXPORT_CHOICES:
        raise ValueError(f"checkpoint.export={choice!r} is invalid; choose one of {list(EXPORT_CHOICES)}")
    if choice == "student" or (choice == "auto" and ema is None):
        return student
    if ema is None:
        raise ValueError(
            "checkpoint.export=ema, but the run has no full EMA copy (ema.kind=full); use checkpoint.export=student"
        )
    out = copy.deepcopy(student)
    own = dict(out.named_parameters())
    with torch.no_grad():
        for name, p_ema in ema.named_parameters():
            if name not in own:
                raise ValueError(f"the EMA copy's parameter {name!r} is not one of the student's")
            own[name].copy_(p_ema.to(own[name].dtype))
    return out


def _text_config(student: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path | None]:
    """The embedded-teacher ``text`` config, the weights stored for it and the tokenizer it carries."""
    text_cfg = dict((getattr(student, "config", {}) or {}).get("text") or {})
    kind = text_cfg.get("kind")
    tower = getattr(student, "text", None)
    if tower is None or kind not in TEXT_FIELDS:
        raise ValueError(
            f"an embedded teacher needs a text tower of kind 'minilm' (locked all-MiniLM-L6-v2 + projection) or "
            f"'tips'; the student's is {kind!r} (student.kwargs.text)"
        )
    if kind == "minilm":
        conf = {
            "kind": "minilm",
            "out_dim": int(tower.out_dim),
            "max_len": int(tower.max_len),
        }
        # the locked encoder comes from its package: only the projection is stored
        weights = {k: v for k, v in tower.state_dict().items() if not k.startswith("encoder.")}
        return conf, weights, None
    if getattr(tower, "proj", None) is not None:
        raise ValueError(
            f"an embedded teacher's tips text tower has no projection; this one maps width {tower.width} to "
            f"{tower.out_dim} (student.kwargs.text out_dim): give the tower the image width"
        )
    inner = tower.tower
    conf = {
        "kind": "tips",
        "vocab_size": int(tower.tokenizer.vocab_size),
        "width": int(tower.out_dim),
        "depth": int(text_cfg.get("depth", 12)),
        "num_heads": int(text_cfg.get("num_heads") or max(1, tower.out_dim // 64)),
        "mlp_dim": int(text_cfg.get("mlp_dim") or 4 * tower.out_dim),
        "max_len": int(text_cfg.get("max_len", 64)),
    }
    return conf, inner.state_dict(), Path(text_cfg["tokenizer"])


def export_embedded_teacher(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    train_config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a ``students.Student`` with a ``minilm`` or ``tips`` text tower, usually the
    :func:`export_model` of a pretraining run) as an embedded-teacher folder (``teachers.embedded``).

    ``tokenizer``: the SentencePiece ``tokenizer.model`` the folder carries (student text towers of the
    embedded benchmark use it); default: a ``tips`` tower's own, else the shipped teacher's (trained on
    the synthetic captions).
    """
    from tipsdistill.teachers.embedded import default_path, write_embedded_teacher

    scfg = dict(getattr(model, "config", {}) or {})
    text_conf, text_sd, own_tok = _text_config(model)
    # spelt for timm without students imported (teachers do not import students)
    timm_name, overrides = expanded_spelling(scfg.get("name"), scfg.get("overrides") or {})
    metrics = dict(metrics or {})
    return write_embedded_teacher(
        out_dir,
        vision=model.vit.state_dict(),
        text=text_sd,
        timm_name=timm_name,
        overrides=overrides,
        text_config=text_conf,
        tokenizer=tokenizer if tokenizer is not None else (own_tok or default_path() / "tokenizer.model"),
        image_size=int(model.vit.patch_embed.img_size[0]),
        num_global_tokens=int(model.num_global_tokens),
        mean=list(scfg.get("mean") or [0.0, 0.0, 0.0]),
        std=list(scfg.get("std") or [1.0, 1.0, 1.0]),
        step=metrics.get("step"),
        extra={"metrics": metrics, "train_config": train_config or {}},
    )


def teacher_of(train_config: dict[str, Any]) -> dict[str, Any]:
    """The teacher a run distilled: the online teacher's name and kwargs, or the teacher identity recorded
    in the stage-1 cache (``{"source": "cache", "cache": PATH, "teacher": ...}``; ``"teacher": None`` with
    ``"note"`` when the cache cannot be read here)."""
    teacher = dict(train_config.get("teacher") or {})
    source = teacher.get("source", "?")
    if source == "online":
        return {"source": "online", "name": teacher.get("name"), "kwargs": teacher.get("kwargs") or {}}
    if source != "cache":
        return {"source": source}
    path = (train_config.get("cache") or {}).get("path")
    out: dict[str, Any] = {"source": "cache", "cache": path, "teacher": None}
    try:
        from tipsdistill.cache import open_cache

        out["teacher"] = dict(open_cache(path).spec.teacher) or None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        out["note"] = f"the cache could not be read at export time ({type(exc).__name__}: {exc})"
    return out


def _card_load(conf: dict[str, Any]) -> list[str]:
    spec = conf["timm"]
    arch = conf.get("architecture_info") or {}
    head = [
        "## Load",
        "",
        "```python",
        "from tipsdistill.students import load_student",
        "student = load_student('PATH')  # a DenseEncoder: encode_image(pixels in [0, 1]), project_to_text",
        "",
        "import timm",
    ]
    if arch.get("kind") == "featuremap":
        if str(spec["model_name"]).startswith("python:"):
            return head[:4] + [
                "# a python: student: load_student('PATH', trust_code=True) imports the module it names",
                "```",
            ]
        return head + [
            "from safetensors.torch import load_file",
            f"net = timm.create_model({spec['model_name']!r}, pretrained=False, **{spec['kwargs']!r})",
            f"net.prune_intermediate_layers([{spec['pruned_after']}], prune_head=True)",
            "net.load_state_dict(load_file('PATH/model.safetensors'))",
            f"fmap = net.forward_intermediates(x, indices=[{spec['pruned_after']}], intermediates_only=True)[0]",
            "# (B, C, H/s, W/s); the 1x1 projection, norm, pooling and text projection are in student_extras",
            "```",
        ]
    return head + [
        "import tipsdistill.students  # registers the small TIPSv2 shapes (vit_w96d4_patch8_reg1_tipsv2_64, ...)",
        "vit = timm.create_model('local-dir:PATH', pretrained=True)  # or 'hf-hub:ORG/NAME' once uploaded",
        "# the same, naming the architecture and the file:",
        f"vit = timm.create_model({spec['model_name']!r}, pretrained=True,",
        "                        pretrained_cfg_overlay=dict(file='PATH/model.safetensors'),",
        f"                        **{spec['kwargs']!r})",
        "```",
    ]


def _card_architecture(conf: dict[str, Any]) -> list[str]:
    arch = conf.get("architecture_info") or {}
    if arch.get("kind") == "featuremap":
        proj = "" if arch["stage_width"] == arch["width"] else f", 1x1 projection to {arch['width']}"
        return [
            f"- architecture: feature-map student over `{arch['backbone']}`: dense tokens from stage "
            f"{arch['feature_stage']} (stride {arch['stride']}, width {arch['stage_width']}{proj}, LayerNorm), "
            f"{conf['num_global_tokens']} global tokens from {arch['global_pool']}",
            "- zero-shot readout: `maskclip`, the attention pool's value and output projections on every dense "
            "token, through the text interface (MaskCLIP's readout of an attention pool; `patch`, the dense "
            "tokens themselves, too)",
        ]
    return [
        f"- architecture: ViT `{arch.get('backbone', conf['timm']['model_name'])}`, patch size {conf['patch_size']}, "
        f"width {conf['embed_dim']}, {conf['num_global_tokens']} global tokens",
        "- zero-shot readout: `tips` (the value trick of the last block), or `patch` / `maskclip`",
    ]


def model_card(conf: dict[str, Any]) -> str:
    tc = conf.get("train_config") or {}
    metrics = conf.get("metrics") or {}
    lines = [
        f"# Student `{conf['timm']['model_name']}` distilled with tipsdistill",
        "",
        f"- recipe: `{tc.get('recipe', '?')}` (teacher source `{(tc.get('teacher') or {}).get('source', '?')}`), "
        f"{tc.get('steps', '?')} steps",
        *_card_architecture(conf),
        f"- teacher: {json.dumps(conf.get('teacher') or teacher_of(tc), default=str)}",
        f"- cache: {json.dumps(tc.get('cache', {}))}",
        "",
        *_card_load(conf),
        "Inputs are RGB in [0, 1]; the student's own normalisation is "
        f"mean={conf['student'].get('mean')}, std={conf['student'].get('std')} (apply it yourself with timm).",
        *_card_text_interface(conf),
        *_card_onnx(conf),
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


def _card_onnx(conf: dict[str, Any]) -> list[str]:
    info = conf.get("onnx")
    if not info:
        return []
    size = (
        "any height and width (multiples of the stride)"
        if info["dynamic_size"]
        else f"{info['image_size']} px"
    )
    return [
        "",
        "## ONNX",
        "",
        f"`{info['file']}` (opset {info['opset']}): input `pixels` (batch, 3, H, W), RGB in [0, 1] (the normalisation "
        f"is inside), {size}, any batch; outputs `dense` {info['outputs']['dense']} (the `{info['readout']}` readout) and "
        f"`global` {info['outputs']['global']}, both in the text space and unnormalised (L2-normalise, then cosine "
        f"with the teacher's text embeddings). onnxruntime vs PyTorch at export: max |diff| {info.get('max_abs_diff')}.",
        "",
        "```python",
        "import onnxruntime as ort",
        f"sess = ort.InferenceSession('PATH/{info['file']}')",
        "dense, global_tokens = sess.run(None, {'pixels': images})  # images: float32 (B, 3, H, W) in [0, 1]",
        "```",
    ]


def _card_text_interface(conf: dict[str, Any]) -> list[str]:
    ti = conf.get("text_interface")
    if not ti:
        return [
            "",
            f"The tokens live in the text space (width {conf.get('text_dim', conf['embed_dim'])}): no projection.",
        ]
    return [
        "",
        "## Text interface",
        "",
        f"The student is {conf['embed_dim']} wide; its teacher's text space is {conf['text_dim']} wide. The learned "
        f"projection `{ti['weight']}` ({ti['shape'][0]} x {ti['shape'][1]}, no bias) in `{ti['file']}` maps its "
        f"{ti['applies_to']} into that space (`students.load_student` applies it: `student.project_to_text`). "
        "With plain timm:",
        "",
        "```python",
        "from safetensors.torch import load_file",
        f"proj = load_file('PATH/{ti['file']}')['{ti['weight']}']",
        "tokens = vit.forward_features(x)  # (B, 1 + reg + N, D)",
        "text_space = tokens @ proj.T       # (B, 1 + reg + N, text_dim): compare with the teacher's text embeddings",
        "```",
    ]


# ------------------------------------------------------------------------------ export from a checkpoint
#: where checkpoints before the student's own text interface kept the CLS -> caption projection
LEGACY_TEXT_PROJ = "clip_loss.image_proj.weight"
_LOG_META = {"step", "epoch", "consumed", "samples_seen", "lr", "wd", "samples_per_s", "data_s"}


def student_from_checkpoint(
    path: str | Path, *, trust_code: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
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
    kwargs = dict(config["student"].get("kwargs") or {})
    prefix = "student."
    own = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if not own:
        raise ValueError(f"{found}: no 'student.*' tensors in the consolidated checkpoint")
    legacy = sd.get(LEGACY_TEXT_PROJ)  # checkpoints written before the projection moved into the student
    if legacy is not None and "text_proj.weight" not in own:
        own["text_proj.weight"] = legacy
        kwargs.setdefault("text_dim", int(legacy.shape[0]))
        logger.info(
            "%s: the loss's image projection %s becomes the student's text_proj", found, LEGACY_TEXT_PROJ
        )
    check_trusted(config["student"]["name"], trust_code)  # a python: student imports the module it names
    student = build_student(config["student"]["name"], **kwargs)
    student.load_state_dict(own, strict=True)
    info = {
        "checkpoint": str(found),
        "step": int(client.get("step", 0)),
        "samples_seen": client.get("samples_seen"),
        "layout": ckpt.layout(found, states),
        "config": config,
        "aux": client.get("aux") or {},
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


def ema_from_checkpoint(student: nn.Module, info: dict[str, Any]) -> nn.Module | None:
    """The full EMA copy of a checkpoint's run (``ema.kind=full``), or ``None`` when it has none."""
    aux = info.get("aux") or {}
    if "ema_student" not in aux:
        return None
    from .targets import EMAStudentTargets

    ema = EMAStudentTargets(student).ema
    ema.load_state_dict(aux["ema_student"])
    return ema


def copy_run_log(path: str | Path, out_dir: str | Path) -> Path | None:
    """Copy the ``log.jsonl`` of the run a checkpoint belongs to into ``out_dir`` as ``log.jsonl.gz`` (the
    training log travels with shipped weights); ``None`` when the run has no log."""
    import gzip

    found = ckpt.find_checkpoint(path)
    log = found.parent.parent / "log.jsonl"
    if not log.is_file():
        return None
    dest = Path(out_dir) / "log.jsonl.gz"
    with open(log, "rb") as src, gzip.open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return dest


def export_checkpoint(
    path: str | Path,
    out_dir: str | Path | None = None,
    *,
    push_to_hub_repo: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    weights: str | None = None,
    format: str = "student",
    tokenizer: str | Path | None = None,
    onnx_size: int | None = None,
    onnx_dynamic_size: bool = False,
    trust_code: bool = False,
) -> Path:
    """Export a checkpoint (``step_*`` dir or run dir, any ZeRO stage) to ``out_dir`` (default
    ``<run>/export`` for the final step, ``<run>/export_step_XXXXXXXX`` before it; with
    ``format="embedded-teacher"``, ``<run>/embedded_teacher_step_XXXXXXXX``): the same files as the end of
    training. ``weights``: student / ema / auto (default: the run's ``checkpoint.export``). With
    ``push_to_hub_repo``, upload them (:func:`push_to_hub`).

    ``format="onnx"``: the student files plus ``model.onnx`` (:func:`export_onnx`, checked with onnxruntime;
    input side ``onnx_size``, default the run's ``data.image_size``; ``onnx_dynamic_size``: any size);
    ``path`` may also be a student export directory (the ONNX file is added to it, or to ``out_dir``).
    ``trust_code``: rebuild a ``python:`` student (imports the module its config names)."""
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format {format!r} is invalid; choose one of {list(EXPORT_FORMATS)}")
    if format == "onnx" and (Path(path) / CONFIG_FILE).is_file():
        return onnx_from_export(
            path, out_dir, image_size=onnx_size, dynamic_size=onnx_dynamic_size, trust_code=trust_code
        )
    student, info = student_from_checkpoint(path, trust_code=trust_code)
    found = Path(info["checkpoint"])
    run_dir = found.parent.parent
    step = info["step"]
    choice = weights or (info["config"].get("checkpoint") or {}).get("export", "auto")
    model = export_model(student, ema_from_checkpoint(student, info), choice)
    if out_dir is None:
        final = step == int(info["config"].get("steps", -1))
        if format == "embedded-teacher":
            out_dir = run_dir / f"embedded_teacher_{ckpt.tag_for(step)}"
        else:
            out_dir = run_dir / ("export" if final else f"export_{ckpt.tag_for(step)}")
    metrics: dict[str, Any] = {"step": step}
    if info["samples_seen"] is not None:
        metrics["samples_seen"] = int(info["samples_seen"])
    metrics.update(logged_metrics(run_dir, step))
    metrics["weights"] = "ema" if model is not student else "student"
    if format == "embedded-teacher":
        out = export_embedded_teacher(
            model, out_dir, tokenizer=tokenizer, train_config=info["config"], metrics=metrics
        )
    else:
        out = export_student(model, out_dir, train_config=info["config"], metrics=metrics)
    if format == "onnx":
        size = onnx_size or int((info["config"].get("data") or {}).get("image_size") or 224)
        add_onnx(out, model, image_size=size, dynamic_size=onnx_dynamic_size)
    if push_to_hub_repo:
        push_to_hub(out, push_to_hub_repo, private=private, token=token, step=step)
    return out


EXPORT_FORMATS = ("student", "embedded-teacher", "onnx")


def add_onnx(out_dir: str | Path, student: nn.Module, *, image_size: int, dynamic_size: bool = False) -> Path:
    """Write ``model.onnx`` of ``student`` into the export ``out_dir`` (:func:`export_onnx`) and record it in
    its ``config.json`` (``onnx``) and model card."""
    out = Path(out_dir)
    conf = json.loads((out / CONFIG_FILE).read_text())
    conf["onnx"] = export_onnx(student, out / ONNX_FILE, image_size=image_size, dynamic_size=dynamic_size)
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    (out / "README.md").write_text(model_card(conf))
    return out


def onnx_from_export(
    path: str | Path,
    out_dir: str | Path | None,
    *,
    image_size: int | None,
    dynamic_size: bool,
    trust_code: bool = False,
) -> Path:
    """``model.onnx`` for a student export directory ``path``, written into it or into a copy at ``out_dir``."""
    from tipsdistill.students import load_student

    src = Path(path)
    student = load_student(src, trust_code=trust_code)
    out = Path(out_dir) if out_dir is not None else src
    if out.resolve() != src.resolve():
        shutil.copytree(src, out, dirs_exist_ok=True)
    conf = json.loads((src / CONFIG_FILE).read_text())
    size = image_size or int(((conf.get("train_config") or {}).get("data") or {}).get("image_size") or 224)
    return add_onnx(out, student, image_size=size, dynamic_size=dynamic_size)


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
