"""Small TIPSv2-architecture ViTs registered with timm by shape, as timm names its variants.

``vit_w{width}d{depth}_patch{p}_reg1_tipsv2_{size}``: the ``vit_base_patch14_reg1_tipsv2`` layout
(two global tokens ``[CLS, REG]``, ``reg_tokens=1``, ``no_embed_class=True``, LayerScale init 1.0) at
width ``width`` (``width // 32`` heads), ``depth`` blocks, patch ``p``, default input ``size`` px.
Registered on ``import students``; then ``timm.create_model(name)`` and ``students.build_student(name)``
build them, and an export of one reloads with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))``.

- ``vit_w96d4_patch8_reg1_tipsv2_64``: the embedded demo's student (4 blocks);
- ``vit_w96d6_patch8_reg1_tipsv2_64``: the embedded teacher's shape (6 blocks; teacher-sized students).
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _cfg, _create_vision_transformer

TIPSV2_LAYOUT: dict[str, Any] = {
    "reg_tokens": 1,
    "no_embed_class": True,
    "init_values": 1.0,
    "mlp_ratio": 4.0,
}


def _small_cfg(size: int) -> dict[str, Any]:
    return _cfg(
        url="",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        num_classes=0,
        input_size=(3, size, size),
        crop_pct=1.0,
    )


default_cfgs = generate_default_cfgs(
    {
        "vit_w96d4_patch8_reg1_tipsv2_64": _small_cfg(64),
        "vit_w96d6_patch8_reg1_tipsv2_64": _small_cfg(64),
    }
)


def _small_tipsv2(
    name: str, width: int, depth: int, patch: int, size: int, pretrained: bool, **kwargs: Any
) -> VisionTransformer:
    shape = dict(
        img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 32, **TIPSV2_LAYOUT
    )
    return _create_vision_transformer(name, pretrained=pretrained, **dict(shape, **kwargs))


@register_model
def vit_w96d4_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 96 (3 heads), 4 blocks, patch 8, 64 px (8x8 grid): the demo's student."""
    return _small_tipsv2("vit_w96d4_patch8_reg1_tipsv2_64", 96, 4, 8, 64, pretrained, **kwargs)


@register_model
def vit_w96d6_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 96 (3 heads), 6 blocks, patch 8, 64 px: the embedded teacher's shape."""
    return _small_tipsv2("vit_w96d6_patch8_reg1_tipsv2_64", 96, 6, 8, 64, pretrained, **kwargs)


VARIANTS = ("vit_w96d4_patch8_reg1_tipsv2_64", "vit_w96d6_patch8_reg1_tipsv2_64")
