"""timm and EfficientNet-Lite0 teachers: shapes, normalisation, value trick, checkpoints, errors."""

from __future__ import annotations

import pytest
import torch

from tipsdistill.teachers import build_teacher, list_teachers

torch.set_num_threads(1)

TINY = dict(img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2)


def _save_tiny(tmp_path, fmt: str):
    import timm

    torch.manual_seed(0)
    m = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **TINY)
    sd = m.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / f"w.{fmt}"
        torch.save({"state_dict": sd}, path)
    return m, path


def test_registry():
    assert {"tips", "hf", "timm", "efficientnet-lite0"} <= set(list_teachers())


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_teacher_loads_checkpoint_and_normalises(tmp_path, fmt):
    m, path = _save_tiny(tmp_path, fmt)
    t = build_teacher("timm", model_name="vit_small_patch14_dinov2", checkpoint=path, **TINY)
    assert t.patch_size == 14 and t.embed_dim == 32 and t.num_global_tokens == 1
    assert t.identity()["mean"] == pytest.approx([0.485, 0.456, 0.406])  # from pretrained_cfg
    px = torch.rand(2, 3, 56, 70)
    f = t.encode_image(px, value_trick=True)
    assert (
        f.cls.shape == (2, 1, 32) and f.patch.shape == (2, 4, 5, 32) and f.value_patch.shape == (2, 4, 5, 32)
    )
    assert f.patch.dtype == torch.float32
    # reference: timm's own forward on ImageNet-normalised pixels (same weights, own pos-embed resampling)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (px[..., :56] - mean) / std
    m.eval()
    with torch.no_grad():
        ref = m.forward_features(x)
    g = t.encode_image(px[..., :56])
    torch.testing.assert_close(g.cls[:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.patch.flatten(1, 2), ref[:, 1:], atol=1e-5, rtol=1e-5)
    # value trick through the last block, computed directly
    with torch.no_grad():
        tok = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        tok = m.blocks[0](tok)
        blk = m.blocks[1]
        v = torch.nn.functional.linear(blk.norm1(tok), blk.attn.qkv.weight[64:], blk.attn.qkv.bias[64:])
        xv = tok + blk.ls1(blk.attn.proj(v))
        xv = xv + blk.ls2(blk.mlp(blk.norm2(xv)))
        vref = m.norm(xv)[:, 1:].reshape(2, 4, 4, 32)
    torch.testing.assert_close(
        t.encode_image(px[..., :56], value_trick=True).value_patch, vref, atol=1e-5, rtol=1e-5
    )


def test_timm_teacher_custom_stats_and_errors(tmp_path):
    _, path = _save_tiny(tmp_path, "safetensors")
    t = build_teacher(
        "timm", model_name="vit_small_patch14_dinov2", checkpoint=path, mean=(0, 0, 0), std=(1, 1, 1), **TINY
    )
    assert t.identity()["std"] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="does not match the model key set"):
        build_teacher("timm", model_name="vit_small_patch14_dinov2", checkpoint=path, **dict(TINY, depth=3))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_teacher("timm", model_name="not_a_model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_teacher("timm", model_name="vit_small_patch14_dinov2", checkpoint=tmp_path / "x.pth", **TINY)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        t.encode_image(torch.rand(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        t.encode_image(torch.rand(1, 3, 28, 28) - 0.5)
    # TIPSv2 timm model: two global tokens, mean 0 / std 1, bilinear positions
    tips = build_teacher(
        "timm", model_name="vit_base_patch14_reg1_tipsv2", img_size=56, embed_dim=32, depth=1, num_heads=2
    )
    assert tips.num_global_tokens == 2 and tips.pos_interp == "bilinear"
    assert tips.encode_image(torch.rand(1, 3, 28, 42)).cls.shape == (1, 2, 32)


@pytest.fixture(scope="module")
def effnet():
    return build_teacher("efficientnet-lite0")


def test_efficientnet_lite0_classifies_chelsea(effnet):
    from skimage import data

    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True).clamp(0, 1)
    logits = effnet.classify(img)
    assert logits.shape == (1, 1000)
    assert int(logits.argmax()) in range(281, 286)  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    f = effnet.encode_image(img)
    assert f.patch.shape == (1, 7, 7, 1280) and f.cls.shape == (1, 1, 1280)
    torch.testing.assert_close(f.cls[:, 0], f.patch.mean(dim=(1, 2)))
    # the classifier sees ImageNet-normalised pixels: raw [0, 1] pixels give another result
    with torch.no_grad():
        raw = effnet.net(img)
    assert not torch.allclose(raw, logits)


def test_efficientnet_errors(effnet):
    with pytest.raises(ValueError, match="without attention"):
        effnet.encode_image(torch.rand(1, 3, 64, 64), value_trick=True)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        effnet.encode_image(torch.rand(1, 3, 64, 70))
    with pytest.raises(ValueError, match="smaller than one patch"):
        effnet.encode_image(torch.rand(1, 3, 16, 64))
    with pytest.raises(ValueError, match="3 RGB channels"):
        effnet.encode_image(torch.rand(1, 4, 64, 64))
    with pytest.raises(ValueError, match="no text tower"):
        effnet.encode_text(["a cat"])
