"""Students of any architecture: a network that returns a dense feature map ``(B, C, h, w)`` behind the
same :class:`teachers.base.DenseEncoder` surface as the ViT students.

Two kinds of backbone:

- **any timm model** by its timm name (``convnext_atto``, ``mobilenetv4_conv_small``, ``fastvit_t8``,
  ``efficientvit_b0``, ``repvit_m0_9``, ``resnet18``, ...): the dense map is one stage of
  ``model.forward_intermediates`` (timm's feature API; the stages are ``model.feature_info``), and the
  model is pruned after that stage (``prune_intermediate_layers``: no unused parameters);
- **a ``python:<module>:<factory>`` module**: ``factory(**factory_kwargs)`` returns an ``nn.Module``
  mapping normalised pixels ``(B, 3, H, W)`` to a map ``(B, C, H / s, W / s)``; its stride ``s`` and
  width ``C`` are read from one forward at build time.

Deeper stages can be fused into the read stage's grid (``fuse_stages``, a light FPN top-down path as
in feature pyramid networks, Lin et al. 2017): each fused stage ``i`` is
projected to ``dim`` by a 1x1 convolution (a "lateral"), and from the deepest up, the running map is
upsampled (bilinear) to the next shallower stage's grid and added to its lateral; the read stage's grid
(stride ``s``) is the output. The tokens then see the deep stages' receptive field (the whole 64 px
image at stride 32) at the fine stage's resolution; the backbone is pruned after the deepest fused stage.

On top of the map: an optional 1x1 projection from the stage width ``C`` to ``dim``, a LayerNorm (the
tokens' "final norm"), and an attention-pooling head (timm ``AttentionPoolLatent``: learned latent
queries over the dense tokens) that makes ``num_global_tokens`` global tokens (TIPSv2 aligns two:
alt-text and caption). The text interface (``text_proj``, ``set_text_dim``, ``project_to_text``) is
the ViT student's (:class:`students.vit.Student`).

Masking (iBOT) for a network without patch embeddings: each masked cell of the ``(h, w)`` token grid
is painted, at the input, with a learned colour (``mask_token``, ``(3,)`` in normalised pixel space)
over its ``s x s`` pixels; the network then sees the cell only through its context (its receptive
field reaches over the cell's edges, as SparK / ConvNeXt V2 note for dense convolutions).

Readouts (:attr:`readouts`): ``patch``, the projected dense tokens, and ``maskclip`` (what ``tips``
resolves to: there is no self-attention for the TIPS value trick), MaskCLIP's readout of an attention pool
(Zhou et al. 2022 for CLIP's ResNet ``attnpool``): the pool's value and output projections (and its MLP
residual) applied to every dense token, which puts them in the space of the global tokens that the
image-text loss aligns with text.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Sequence
from typing import Any

import timm
import torch
from timm.layers import AttentionPoolLatent
from torch import nn
from torch.nn import functional as F

from tipsdistill.teachers.base import DenseEncoder, DenseFeatures, check_pixels

from .vit import Student

logger = logging.getLogger(__name__)

PYTHON_PREFIX = "python:"
#: keys of ``FeatureMapStudent.config``; ``build_featuremap_student(**config)`` rebuilds the architecture.
CONFIG_KEYS = (
    "name",
    "overrides",
    "feature_stage",
    "fuse_stages",
    "dim",
    "num_global_tokens",
    "pool_heads",
    "mean",
    "std",
    "text",
    "text_dim",
    "check_inputs",
    "factory_kwargs",
    "probe_size",
    "img_size",
    "adaptors",  # per-teacher adaptor heads (students.adaptors), several-teacher runs
)


def _pool_heads(dim: int) -> int:
    """Heads of the pooling attention: the most of (8, 4, 2) that divide ``dim`` with heads >= 16 wide."""
    return next((h for h in (8, 4, 2) if dim % h == 0 and dim // h >= 16), 1)


class FeatureMapStudent(Student):
    """A trainable dense encoder around a backbone that returns a feature map.

    Shares the ViT :class:`~students.vit.Student`'s text interface (``text``, ``text_proj``,
    :meth:`set_text_dim`, :meth:`project_to_text`, :meth:`encode_text`); its own parts:

    Attributes:
        backbone: the timm model (pruned after ``feature_stage``) or the ``python:`` module.
        proj: 1x1 convolution ``C -> dim`` (``None`` when ``dim == C`` or when stages are fused).
        fuse_stages: the deeper stages fused top-down into the read stage (empty: none).
        laterals: one 1x1 convolution ``C_i -> dim`` per stage ``(feature_stage, *fuse_stages)`` when
            fusing (empty otherwise).
        norm: LayerNorm over the ``dim`` channels of each dense token.
        pool: attention pooling ``(B, h*w, dim) -> (B, num_global_tokens, dim)``.
        mask_token: learned ``(3,)`` colour painted over masked cells at the input.
        patch_size: the map's stride ``s`` (input sides must be multiples of it); the token grid of an
            ``H x W`` input is ``(H / s, W / s)``.
    """

    backbone_key = "backbone"  # the export's model.safetensors holds this module's own state dict
    readouts = ("patch", "maskclip")

    def __init__(
        self,
        backbone: nn.Module,
        *,
        stride: int,
        width: int,
        feature_stage: int | None,
        fuse_widths: Sequence[tuple[int, int]] = (),
        dim: int | None = None,
        num_global_tokens: int = 2,
        pool_heads: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        text: nn.Module | None = None,
        text_dim: int | None = None,
        check_inputs: bool = True,
        config: dict[str, Any] | None = None,
    ) -> None:
        DenseEncoder.__init__(self)
        if num_global_tokens < 1:
            raise ValueError(f"num_global_tokens must be >= 1 (TIPSv2 aligns 2), got {num_global_tokens}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must be 3 values each with std > 0, got mean={mean}, std={std}")
        self.backbone = backbone
        self.feature_stage = feature_stage  # None: the python module's output
        self.patch_size = int(stride)
        self.width = int(width)
        self.embed_dim = int(dim or width)
        self.num_layers = 1  # one readout depth: the chosen stage
        self.num_global_tokens = int(num_global_tokens)
        # (stage, width) of each deeper stage fused top-down into the read stage (FPN laterals)
        self.fuse_stages = [int(i) for i, _ in fuse_widths]
        if self.fuse_stages and feature_stage is None:
            raise ValueError("fuse_stages needs a timm backbone with stages (not a python: module)")
        if self.fuse_stages and min(self.fuse_stages) <= int(feature_stage or 0):
            raise ValueError(
                f"fuse_stages {self.fuse_stages} must be deeper than the read stage {feature_stage}"
            )
        self.laterals = nn.ModuleList(
            nn.Conv2d(c, self.embed_dim, 1)
            for c in ([self.width] + [int(c) for _, c in fuse_widths])
            if self.fuse_stages
        )
        no_proj = self.embed_dim == self.width or bool(self.fuse_stages)
        self.proj = None if no_proj else nn.Conv2d(self.width, self.embed_dim, 1)
        self.norm = nn.LayerNorm(self.embed_dim)
        heads = int(pool_heads or _pool_heads(self.embed_dim))
        if self.embed_dim % heads:
            raise ValueError(f"pool_heads={heads} does not divide the token width {self.embed_dim}")
        self.pool = AttentionPoolLatent(
            self.embed_dim,
            num_heads=heads,
            latent_len=self.num_global_tokens,
            pool_type="",
            norm_layer=nn.LayerNorm,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.mask_token = nn.Parameter(torch.zeros(3))
        self.text = text
        self.has_text = text is not None
        self._text_dim = self.embed_dim
        self.text_proj: nn.Module | None = None
        self.check_inputs = check_inputs
        self.config: dict[str, Any] = dict(config or {})
        if text_dim is not None:
            self.set_text_dim(text_dim)

    # ------------------------------------------------------------------ image
    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` [0, 1] -> ``(pixels - mean) / std`` in the weights' dtype."""
        x = (pixels - self.pixel_mean.to(pixels.dtype)) / self.pixel_std.to(pixels.dtype)
        return x.to(self.norm.weight.dtype)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``(B, 3, H, W)`` -> the backbone's map ``(B, C, H / s, W / s)``; with
        ``fuse_stages``, the fused map ``(B, dim, H / s, W / s)``."""
        if self.feature_stage is None:
            return self.backbone(x)
        indices = [self.feature_stage, *self.fuse_stages]
        maps = self.backbone.forward_intermediates(x, indices=indices, intermediates_only=True)
        if not self.fuse_stages:
            return maps[0]
        return self.fuse(maps)

    def fuse(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """FPN top-down path: maps ``[(B, C_0, h, w), (B, C_1, h_1, w_1), ...]`` of the read stage and the
        fused stages (shallow to deep) -> ``(B, dim, h, w)``: from the deepest, the running sum is
        upsampled (bilinear) to the next stage's grid and added to that stage's 1x1 lateral."""
        out = self.laterals[-1](maps[-1])
        for lateral, fmap in zip(reversed(self.laterals[:-1]), reversed(maps[:-1])):
            up = F.interpolate(out, size=fmap.shape[-2:], mode="bilinear", align_corners=False)
            out = lateral(fmap) + up
        return out

    def _paint_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked cells of ``mask`` ``(B, h*w)`` / ``(B, h, w)`` painted with ``mask_token`` over ``x``."""
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = masked), got dtype {mask.dtype}")
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        if mask.numel() != b * h * w:
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit the {h}x{w} token grid of {b} images"
            )
        cells = mask.to(x.device).reshape(b, 1, h, w)
        pixels = cells.repeat_interleave(self.patch_size, 2).repeat_interleave(self.patch_size, 3)
        return torch.where(pixels, self.mask_token.to(x.dtype).view(1, 3, 1, 1), x)

    def forward(
        self,
        pixels: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """Training forward.

        Args:
            pixels: ``(B, 3, H, W)`` RGB in [0, 1]; H, W multiples of the stride ``patch_size``.
            mask: optional bool ``(B, h*w)`` or ``(B, h, w)`` over the token grid; True cells are painted
                with ``mask_token`` at the input.
            value_trick: with ``value_readout="maskclip"``, also ``value_patch (B, h, w, D)``: the
                attention pool's values of every token (:meth:`pool_values`); the TIPS value trick
                (``value_readout="tips"``) needs self-attention and is refused.
            layer: ``None``, ``0`` or ``-1`` (the one stage this student reads).
        Returns:
            :class:`DenseFeatures` with ``cls (B, C, D)`` and ``patch (B, h, w, D)``; gradients flow.
        """
        if value_trick and value_readout != "maskclip":
            raise ValueError(
                f"{type(self).__name__} ({self.config.get('name')}) has no self-attention for the "
                f"{value_readout!r} value trick; read its dense tokens with readout 'patch', or the attention "
                "pool's values with readout 'maskclip'"
            )
        if layer not in (None, 0, -1):
            raise ValueError(
                f"layer={layer}: a feature-map student has one readout depth (layer None, 0 or -1)"
            )
        if self.check_inputs:
            check_pixels(pixels, self.patch_size)
        height, width = pixels.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"pixels are {height}x{width}, not multiples of the student's stride {self.patch_size}; "
                f"resize to multiples of {self.patch_size}"
            )
        x = self.normalise(pixels)
        if mask is not None:
            x = self._paint_mask(x, mask)
        fmap = self.feature_map(x)
        grid = (height // self.patch_size, width // self.patch_size)
        channels = self.embed_dim if self.fuse_stages else self.width
        if tuple(fmap.shape[-2:]) != grid or fmap.shape[1] != channels:
            raise ValueError(
                f"the backbone returned a map {tuple(fmap.shape[1:])} for a {height}x{width} input; expected "
                f"({channels}, {grid[0]}, {grid[1]}) (width {channels}, stride {self.patch_size})"
            )
        if self.proj is not None:
            fmap = self.proj(fmap)
        tokens = self.norm(fmap.permute(0, 2, 3, 1))  # (B, h, w, D)
        cls = self.pool(tokens.flatten(1, 2))  # (B, C, D)
        value = self.pool_values(tokens) if value_trick else None
        return DenseFeatures(cls=cls, patch=tokens, value_patch=value)

    def pool_values(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaskCLIP's readout of the attention pool: ``(B, h, w, D)`` tokens -> ``(B, h, w, D)``, each token
        through the pool's value projection, its output projection and its MLP residual, as if the
        pool's attention put all its weight on that one token (a global token is the attention-weighted
        mix of exactly these, before the residual's nonlinearity)."""
        pool = self.pool
        dim = tokens.shape[-1]
        v = F.linear(tokens, pool.kv.weight[dim:], None if pool.kv.bias is None else pool.kv.bias[dim:])
        x = pool.proj(v)
        if pool.mlp is not None:
            x = x + pool.mlp(pool.norm(x))
        return x

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident.update(
            {
                "width": self.width,
                "feature_stage": self.feature_stage,
                "fuse_stages": list(self.fuse_stages),
                "readouts": list(self.readouts),
            }
        )
        return ident


# ------------------------------------------------------------------------------------------ building
def _timm_backbone(
    name: str,
    pretrained: bool,
    overrides: dict[str, Any],
    feature_stage: int | None,
    feature_stride: int | None,
    fuse_stages: Sequence[int] = (),
) -> tuple[nn.Module, int, int, int, list[tuple[int, int]], dict[str, Any]]:
    """The timm model pruned after the chosen stage (or the deepest of ``fuse_stages``); returns
    ``(model, stage, stride, width, [(fused stage, its width), ...], pretrained_cfg)``."""
    if "num_classes" in overrides and overrides["num_classes"] != 0:
        raise ValueError("students have no classifier; drop num_classes from the overrides")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **overrides)
    except TypeError as e:
        raise ValueError(
            f"bad overrides for timm model {name!r}: {e}; check the model's constructor kwargs"
        ) from e
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ValueError(
            f"timm model {name!r} has no forward_intermediates / feature_info; use a python:<module>:<factory> "
            "student that returns a (B, C, H, W) map"
        )
    info = [(int(f["num_chs"]), int(f["reduction"])) for f in model.feature_info]
    stages = ", ".join(f"{i}: stride {r}, width {c}" for i, (c, r) in enumerate(info))
    if feature_stage is not None and feature_stride is not None:
        raise ValueError("give feature_stage or feature_stride, not both")
    if feature_stride is not None:
        found = [i for i, (_, r) in enumerate(info) if r == int(feature_stride)]
        if not found:
            raise ValueError(f"{name} has no stage of stride {feature_stride}; its stages are {stages}")
        stage = found[-1]
    else:
        stage = -1 if feature_stage is None else int(feature_stage)
        if not -len(info) <= stage < len(info):
            raise ValueError(f"feature_stage={stage} is out of range for {name}; its stages are {stages}")
        stage %= len(info)
    fused = []
    for i in fuse_stages:
        if not -len(info) <= int(i) < len(info):
            raise ValueError(f"fuse_stages entry {i} is out of range for {name}; its stages are {stages}")
        fused.append(int(i) % len(info))
    if sorted(set(fused)) != fused or (fused and fused[0] <= stage):
        raise ValueError(
            f"fuse_stages {list(fuse_stages)} must be distinct stages deeper than the read stage {stage}, "
            f"shallow to deep; {name}'s stages are {stages}"
        )
    model.prune_intermediate_layers(indices=[stage, *fused], prune_head=True)
    width, stride = info[stage]
    fuse_widths = [(i, info[i][0]) for i in fused]
    return model, stage, stride, width, fuse_widths, dict(getattr(model, "pretrained_cfg", {}) or {})


def _python_backbone(
    spec: str, factory_kwargs: dict[str, Any], probe_size: int
) -> tuple[nn.Module, int, int]:
    """``python:<module>:<factory>`` -> ``(module, stride, width)`` (read from one forward of a
    ``probe_size`` square)."""
    parts = spec[len(PYTHON_PREFIX) :].split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"python student needs python:<module>:<factory>, got {spec!r}")
    try:
        factory = getattr(importlib.import_module(parts[0]), parts[1])
    except (ImportError, AttributeError) as e:
        raise ValueError(f"python student {spec!r}: cannot import {parts[1]} from {parts[0]} ({e})") from e
    module = factory(**factory_kwargs)
    if not isinstance(module, nn.Module):
        raise ValueError(f"python student {spec!r} returned {type(module).__name__}, not an nn.Module")
    was_training = module.training
    module.eval()  # no BatchNorm statistics from the probe
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, 3, probe_size, probe_size))
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != 1:
        raise ValueError(
            f"python student {spec!r} must return a (B, C, h, w) map; got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    h, w = out.shape[-2:]
    if h != w or probe_size % h:
        raise ValueError(
            f"python student {spec!r} mapped a {probe_size}x{probe_size} input to a {h}x{w} map: the stride must "
            "divide the input side (set probe_size to a multiple of the stride)"
        )
    return module, probe_size // int(h), int(out.shape[1])


def build_featuremap_student(
    name: str,
    pretrained: bool = False,
    *,
    feature_stage: int | None = None,
    feature_stride: int | None = None,
    fuse_stages: Sequence[int] | None = None,
    dim: int | None = None,
    num_global_tokens: int = 2,
    pool_heads: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    text: dict[str, Any] | None = None,
    text_dim: int | None = None,
    check_inputs: bool = True,
    factory_kwargs: dict[str, Any] | None = None,
    probe_size: int = 224,
    img_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    adaptors: dict[str, dict[str, Any]] | None = None,
    **kw_overrides: Any,
) -> FeatureMapStudent:
    """Build a feature-map student (random init by default).

    Args:
        name: a timm model name (``convnext_atto``, ``resnet18``...) or ``python:<module>:<factory>``.
        pretrained: load timm's pretrained weights (timm names only; needs them cached when offline).
        feature_stage: index into the timm model's ``feature_info`` (negative from the end); default
            ``-1``, the last stage (stride 32 for most ImageNet networks). ``feature_stride``: pick the
            (last) stage of that stride instead (``8``, ``16``: finer grids for dense tasks).
        fuse_stages: deeper stages (indices as ``feature_stage``, shallow to deep, e.g. ``[2, 3]`` or
            ``[-1]``) fused top-down into the read stage's grid (see the module docstring); each adds
            a ``C_i x dim`` 1x1 lateral; default none (the backbone is pruned after the read stage).
        dim: token width after a 1x1 projection; default the stage's width (no projection).
        num_global_tokens: global tokens from the attention pooling (TIPSv2: 2).
        pool_heads: heads of the pooling attention (default: see :func:`_pool_heads`).
        mean, std: input normalisation of [0, 1] pixels; default the timm model's own (ImageNet), and
            ``(0, 0, 0)`` / ``(1, 1, 1)`` for a python module.
        text, text_dim: the text interface, as for :func:`students.vit.build_student`.
        factory_kwargs: keyword arguments of a python factory; ``probe_size``: the square input side of
            the build-time forward that reads its stride and width.
        img_size: the nominal input size (recorded, as the ViT recipes set it; not passed to the network,
            which takes any multiple of its stride).
        overrides / **kw_overrides: timm ``create_model`` kwargs (``depths``, ``dims``, ``layers``...).
        adaptors: per-teacher adaptor heads, name -> spec (:func:`students.adaptors.attach_adaptors`).
    Returns:
        :class:`FeatureMapStudent`; ``student.config`` rebuilds the architecture (with the resolved stage).
    """
    ov = dict(overrides or {})
    ov.update(kw_overrides)
    if name.startswith(PYTHON_PREFIX):
        if ov or pretrained:
            raise ValueError(
                f"python student {name!r} takes factory_kwargs, not timm overrides {sorted(ov)} / pretrained"
            )
        if fuse_stages:
            raise ValueError(f"python student {name!r} has no stages to fuse; drop fuse_stages")
        backbone, stride, width = _python_backbone(name, dict(factory_kwargs or {}), int(probe_size))
        fuse_widths = []
        stage, default_mean, default_std = None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()")
        if factory_kwargs:
            raise ValueError(
                f"factory_kwargs is for python:<module>:<factory> students, not timm model {name!r}"
            )
        backbone, stage, stride, width, fuse_widths, pcfg = _timm_backbone(
            name, pretrained, ov, feature_stage, feature_stride, list(fuse_stages or ())
        )
        default_mean = tuple(pcfg.get("mean", (0.485, 0.456, 0.406)))
        default_std = tuple(pcfg.get("std", (0.229, 0.224, 0.225)))
    mean = tuple(float(v) for v in (default_mean if mean is None else mean))
    std = tuple(float(v) for v in (default_std if std is None else std))
    token_dim = int(dim or width)
    tower = None
    if text is not None:
        from .text import build_text_tower

        text = dict(text)
        if text_dim is not None:
            if text.get("out_dim") not in (None, text_dim):
                raise ValueError(
                    f"student text_dim={text_dim} but its text tower's out_dim={text['out_dim']}; set one of them"
                )
            text["out_dim"] = int(text_dim)
        tower = build_text_tower(default_dim=token_dim, **text)
        text_dim = int(tower.out_dim)
    config: dict[str, Any] = {
        "name": name,
        "overrides": ov,
        "feature_stage": stage,
        "dim": token_dim,
        "num_global_tokens": int(num_global_tokens),
        "pool_heads": pool_heads,
        "mean": list(mean),
        "std": list(std),
        "text": tower.arch() if tower is not None else None,
        "check_inputs": check_inputs,
    }
    if fuse_widths:
        config["fuse_stages"] = [i for i, _ in fuse_widths]
    if img_size is not None:
        config["img_size"] = int(img_size)
    if name.startswith(PYTHON_PREFIX):
        config.update(factory_kwargs=dict(factory_kwargs or {}), probe_size=int(probe_size))
    student = FeatureMapStudent(
        backbone,
        stride=stride,
        width=width,
        feature_stage=stage,
        fuse_widths=fuse_widths,
        dim=token_dim,
        num_global_tokens=num_global_tokens,
        pool_heads=pool_heads,
        mean=mean,
        std=std,
        text=tower,
        text_dim=text_dim,
        check_inputs=check_inputs,
        config=config,
    )
    if adaptors:
        from .adaptors import attach_adaptors

        attach_adaptors(student, adaptors)
    logger.info(
        "student %s: stage %s (stride %d, width %d) fused with %s -> %d-wide tokens, %d global tokens, "
        "%.2fM params",
        name,
        stage,
        stride,
        width,
        [i for i, _ in fuse_widths] or "no deeper stage",
        token_dim,
        num_global_tokens,
        sum(p.numel() for p in student.parameters()) / 1e6,
    )
    return student


def featuremap_student_from_config(config: dict[str, Any]) -> FeatureMapStudent:
    """Rebuild a feature-map student (random weights) from its ``config``; unknown keys are an error."""
    unknown = set(config) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown student config keys {sorted(unknown)}; known: {list(CONFIG_KEYS)}")
    cfg = copy.deepcopy(config)
    return build_featuremap_student(cfg.pop("name"), **cfg)
