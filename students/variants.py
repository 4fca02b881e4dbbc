"""Small TIPSv2-architecture ViTs registered with timm by shape, as timm names its variants.

``vit_w{width}d{depth}_patch{p}_reg1_tipsv2_{size}``: the ``vit_base_patch14_reg1_tipsv2`` layout
(two global tokens ``[CLS, REG]``, ``reg_tokens=1``, ``no_embed_class=True``, LayerScale init 1.0) at
width ``width`` (``width // 32`` heads), ``depth`` blocks, patch ``p``, default input ``size`` px.
Registered on ``import students``; then ``timm.create_model(name)`` and ``students.build_student(name)``
build them, and an export of one reloads with ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...))``.

- ``vit_w96d4_patch8_reg1_tipsv2_64``: the embedded demo's student (4 blocks);
- ``vit_w96d6_patch8_reg1_tipsv2_64``: the embedded teacher's shape (6 blocks; teacher-sized students);
- ``vit_w64d4_patch8_reg1_tipsv2_64``, ``vit_w192d4_patch8_reg1_tipsv2_64``: the demo's student narrower
  (2 heads) and wider (6 heads) than the teacher's 96-wide text space (the experiments' width runs).

Names are used as registered. The old spelling, ``vit_base_patch14_reg1_tipsv2`` (or a registered name)
with size overrides that together equal a registered shape, still builds the same model (same weights
for the same seed) through :func:`resolve_student_name`, with a :class:`FutureWarning` naming the
registered name, as timm's ``register_model_deprecations`` maps an old name to its new one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model
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
        "vit_w64d4_patch8_reg1_tipsv2_64": _small_cfg(64),
        "vit_w192d4_patch8_reg1_tipsv2_64": _small_cfg(64),
    }
)


def _shape(width: int, depth: int, patch: int, size: int) -> dict[str, Any]:
    """The timm ``VisionTransformer`` kwargs of a small TIPSv2 variant (32-wide attention heads)."""
    return dict(
        img_size=size, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 32, **TIPSV2_LAYOUT
    )


def _small_tipsv2(variant: str, shape: dict[str, Any], pretrained: bool, **kwargs: Any) -> VisionTransformer:
    """``variant``'s ViT: its ``shape``, then ``kwargs`` (any of them may be overridden, as timm allows)."""
    return _create_vision_transformer(variant, pretrained=pretrained, **dict(shape, **kwargs))


@register_model
def vit_w96d4_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 96 (3 heads), 4 blocks, patch 8, 64 px (8x8 grid): the demo's student."""
    return _small_tipsv2("vit_w96d4_patch8_reg1_tipsv2_64", _shape(96, 4, 8, 64), pretrained, **kwargs)


@register_model
def vit_w96d6_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 96 (3 heads), 6 blocks, patch 8, 64 px: the embedded teacher's shape."""
    return _small_tipsv2("vit_w96d6_patch8_reg1_tipsv2_64", _shape(96, 6, 8, 64), pretrained, **kwargs)


@register_model
def vit_w64d4_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 64 (2 heads), 4 blocks, patch 8, 64 px: the demo's student, narrower."""
    return _small_tipsv2("vit_w64d4_patch8_reg1_tipsv2_64", _shape(64, 4, 8, 64), pretrained, **kwargs)


@register_model
def vit_w192d4_patch8_reg1_tipsv2_64(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """TIPSv2 layout, width 192 (6 heads), 4 blocks, patch 8, 64 px: the demo's student, wider."""
    return _small_tipsv2("vit_w192d4_patch8_reg1_tipsv2_64", _shape(192, 4, 8, 64), pretrained, **kwargs)


#: every registered small variant and its ``VisionTransformer`` kwargs
SHAPES: dict[str, dict[str, Any]] = {
    "vit_w96d4_patch8_reg1_tipsv2_64": _shape(96, 4, 8, 64),
    "vit_w96d6_patch8_reg1_tipsv2_64": _shape(96, 6, 8, 64),
    "vit_w64d4_patch8_reg1_tipsv2_64": _shape(64, 4, 8, 64),
    "vit_w192d4_patch8_reg1_tipsv2_64": _shape(192, 4, 8, 64),
}
VARIANTS = tuple(SHAPES)

#: timm's ``vit_base_patch14_reg1_tipsv2`` (its ``model_args``; ``mlp_ratio`` is VisionTransformer's default)
BASE_NAME = "vit_base_patch14_reg1_tipsv2"
BASE_SHAPE: dict[str, Any] = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, **TIPSV2_LAYOUT)
#: the kwargs that make a shape (the input size is kept apart: any size builds the same weights' layout)
SHAPE_KEYS = (
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "reg_tokens",
    "no_embed_class",
    "init_values",
)


def _full_shape(name: str) -> dict[str, Any] | None:
    """``name``'s shape kwargs with its default input size, or ``None`` for a model outside this family."""
    if name in SHAPES:
        return dict(SHAPES[name])
    if name == BASE_NAME:
        return {**BASE_SHAPE, "img_size": int(get_pretrained_cfg(BASE_NAME).input_size[-1])}
    return None


def canonical_spelling(name: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` spelt with the registered name of the shape they build.

    ``name`` is ``vit_base_patch14_reg1_tipsv2`` or a registered variant and ``kwargs`` its
    ``create_model`` / ``build_student`` kwargs: when the shape they make together (:data:`SHAPE_KEYS`)
    is a registered variant's, that variant's name, with the kwargs it implies removed (``img_size``
    kept only where it differs from the variant's); other kwargs (``text``, ``drop_path_rate``...) pass
    through. Anything else comes back unchanged. Idempotent; builds the same model, same weights for
    the same seed (the variants are the base layout with those kwargs)."""
    kwargs = dict(kwargs)
    shape = _full_shape(name)
    if shape is None:
        return name, kwargs
    shape.update({k: kwargs[k] for k in (*SHAPE_KEYS, "img_size") if k in kwargs})
    for variant, registered in SHAPES.items():
        if all(shape[k] == registered[k] for k in SHAPE_KEYS):
            rest = {k: v for k, v in kwargs.items() if k not in (*SHAPE_KEYS, "img_size")}
            if shape["img_size"] != registered["img_size"]:
                rest["img_size"] = shape["img_size"]
            return variant, rest
    return name, kwargs


def resolve_student_name(name: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """:func:`canonical_spelling`, with a ``FutureWarning`` when the old spelling named a registered shape
    (``build_student`` calls it, so old recipes, configs and exports still build and load)."""
    new_name, new_kwargs = canonical_spelling(name, kwargs)
    if new_name != name:
        implied = sorted(set(kwargs) - set(new_kwargs))
        warnings.warn(
            f"student {name!r} with {implied} is the registered shape {new_name!r}: write "
            f"student.name={new_name} and drop those kwargs (the old spelling builds the same model and will "
            "go away)",
            FutureWarning,
            stacklevel=3,
        )
    return new_name, new_kwargs


def expanded_spelling(name: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name, kwargs)`` for timm without this module: a registered variant as ``vit_base_patch14_reg1_tipsv2``
    with its whole shape in the kwargs (the embedded-teacher ``config.json`` spells its ViT so, since
    ``teachers`` does not import ``students``); anything else unchanged."""
    if name not in SHAPES:
        return name, dict(kwargs)
    return BASE_NAME, {**SHAPES[name], **kwargs}
