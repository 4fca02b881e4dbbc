"""Zero-shot segmentation protocol: oracle, whole vs slide, value trick, official-notebook parity, datasets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as TVT
import torchvision.transforms.functional as TVTF
from PIL import Image
from test_eval_toymodel import ListDataset, OracleEncoder, ToyEncoder, painted_image

from tipsdistill.distill.evaluation import (
    ADE150_CLASSES,
    ClassEmbeddings,
    SegmentationSettings,
    dense_patch_features,
    evaluate_segmentation,
    load_eval_dataset,
    predict,
    resolve_class_embeddings,
)


def _random_text(C: int, D: int, seed: int = 0) -> ClassEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return ClassEmbeddings(torch.randn(C, D, generator=g), torch.arange(C), [[f"c{i}"] for i in range(C)])


# ------------------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_oracle_gives_100_miou(mode):
    """Patch features = the text embedding of the patch's class -> 100 mIoU.

    Classes vary along x only (stripes of patch columns) and the class embeddings are orthonormal:
    bilinear upsampling then always favours the nearest patch column. (With 2-D layouts a patch corner
    surrounded by three patches of another class legitimately flips: the protocol upsamples scores.)
    """
    C = 5
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    text = ClassEmbeddings(q[:C], torch.arange(C), [[f"c{i}"] for i in range(C)])
    oracle = OracleEncoder(text.embeddings)
    g = torch.Generator().manual_seed(1)
    items = []
    for i in range(3):
        cols = torch.randint(0, C, (1, 6), generator=g).expand(4, 6)
        img, lab = painted_image(cols, C)
        lab[:3, :5] = 255  # some ignore pixels
        items.append({"key": str(i), "image": img, "captions": {}, "label": lab})
    ds = ListDataset(items, [f"c{i}" for i in range(C)], object_class_ids=[0, 1])
    s = SegmentationSettings(image_size=None, mode=mode, window=56, stride=42, readout="tips")
    res = evaluate_segmentation(oracle, ds, text, s, progress=False)
    assert res["metrics"]["miou"] == pytest.approx(100.0)
    assert res["metrics"]["miou_objects"] == pytest.approx(100.0)
    assert res["metrics"]["pixel_accuracy"] == pytest.approx(100.0)


def test_whole_equals_slide_with_one_window():
    m = ToyEncoder()
    text = resolve_class_embeddings(["cat", "dog", "sky"], model=m, cache_dir=None)
    img = torch.rand(3, 56, 84)
    whole = SegmentationSettings(image_size=None, mode="whole")
    slide = SegmentationSettings(image_size=None, mode="slide", window=84, stride=84)
    pw, _ = predict(m, img, text, whole)
    ps, _ = predict(m, img, text, slide)
    assert pw.shape == (56, 84)
    assert torch.equal(pw, ps)


def test_value_trick_equals_direct_computation():
    """tips / maskclip / patch readouts, last and intermediate block, against a hand-written forward."""
    m = ToyEncoder(depth=3)
    vit = m.vit
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        t = vit.patch_embed(x) + vit.pos_embed  # no_embed_class: positions on patches only
        t = torch.cat([vit.cls_token.expand(2, -1, -1), vit.reg_token.expand(2, -1, -1), t], 1)
        outs = [t]
        for blk in vit.blocks:
            outs.append(blk(outs[-1]))
        B, N, D = t.shape

        def value_trick(k):
            blk, h = vit.blocks[k], outs[k]
            qkv = blk.attn.qkv(blk.norm1(h)).reshape(B, N, 3, blk.attn.num_heads, D // blk.attn.num_heads)
            v = blk.attn.proj(qkv.permute(2, 0, 3, 1, 4)[2].transpose(1, 2).reshape(B, N, D))
            x_val = h + blk.ls1(v)
            x_val = x_val + blk.ls2(blk.mlp(blk.norm2(x_val)))
            grid = lambda z: vit.norm(z)[:, 2:].reshape(B, 4, 4, D)  # noqa: E731
            return grid(x_val), grid(v), grid(outs[k + 1])

        for layer, k in ((None, 2), (1, 1), (-3, 0)):
            tips, maskclip, plain = value_trick(k)
            torch.testing.assert_close(dense_patch_features(m, x, "tips", layer, normalize=False), tips)
            torch.testing.assert_close(
                dense_patch_features(m, x, "maskclip", layer, normalize=False), maskclip
            )
            torch.testing.assert_close(dense_patch_features(m, x, "patch", layer, normalize=False), plain)
    n = dense_patch_features(m, x, "tips")
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(2, 4, 4))


# ------------------------------------------------------------------ official notebook, step by step
def _official_encode_value_attention(vit, img, P=14):
    """The notebook's encode_image_value_attention, written against a timm TIPS-architecture ViT."""
    B, _, H, W = img.shape
    new_H, new_W = math.ceil(H / P) * P, math.ceil(W / P) * P
    if (H, W) != (new_H, new_W):
        img = F.interpolate(img, size=(new_H, new_W), mode="bicubic", align_corners=False)
    B, _, h_i, w_i = img.shape
    x = vit.patch_embed(img)
    x = vit._pos_embed(x)  # DINOv2 prepare_tokens: [cls, reg] + patches with positions
    x = vit.norm_pre(x)
    num_register = 1
    blocks = list(vit.blocks)
    for i, blk in enumerate(blocks):
        if i < len(blocks) - 1:
            x = blk(x)
        else:
            x_normed = blk.norm1(x)
            b_dim, n_dim, c_dim = x_normed.shape
            qkv = (
                blk.attn.qkv(x_normed)
                .reshape(b_dim, n_dim, 3, blk.attn.num_heads, c_dim // blk.attn.num_heads)
                .permute(2, 0, 3, 1, 4)
            )
            v = qkv[2]
            v_out = v.transpose(1, 2).reshape(b_dim, n_dim, c_dim)
            v_out = blk.attn.proj(v_out)
            v_out = blk.ls1(v_out)
            x_val = v_out + x
            y_val = blk.norm2(x_val)
            y_val = blk.ls2(blk.mlp(y_val))
            x_val = x_val + y_val
    x_val = vit.norm(x_val)
    patch_tokens = x_val[:, 1 + num_register :, :]
    return patch_tokens.reshape(B, h_i // P, w_i // P, -1).contiguous()


def _official_predict_whole(vit, img, text_features):
    feats = _official_encode_value_attention(vit, img.unsqueeze(0)).squeeze(0)
    feats = F.normalize(feats, p=2, dim=-1)
    return torch.einsum("cd,hwd->chw", text_features, feats)


def _official_predict_slide(vit, img, text_features, side, stride):
    _, H, W = img.shape
    num_classes, _ = text_features.shape
    probs = torch.zeros([num_classes, H, W])
    counts = torch.zeros([H, W])
    h_grids = max(H - side + stride - 1, 0) // stride + 1
    w_grids = max(W - side + stride - 1, 0) // stride + 1
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * stride, j * stride
            y2, x2 = min(y1 + side, H), min(x1 + side, W)
            y1, x1 = max(y2 - side, 0), max(x2 - side, 0)
            img_window = img[:, y1:y2, x1:x2]
            cos = _official_predict_whole(vit, img_window, text_features)
            cos = F.interpolate(
                cos.unsqueeze(0), size=img_window.shape[1:], mode="bilinear", align_corners=False
            )
            probs[:, y1:y2, x1:x2] += cos.squeeze(0).softmax(dim=0)
            counts[y1:y2, x1:x2] += 1
    return probs / counts


def _official_short_side_resize(pil_img, size):
    w, h = pil_img.size
    if (w <= h and w == size) or (h <= w and h == size):
        return pil_img
    if w < h:
        return TVTF.resize(pil_img, [int(size * h / w), size], TVT.InterpolationMode.BICUBIC)
    return TVTF.resize(pil_img, [size, int(size * w / h)], TVT.InterpolationMode.BICUBIC)


@pytest.mark.parametrize("src_hw", [(70, 100), (90, 66)])
def test_slide_matches_official_notebook(src_hw):
    model = ToyEncoder(dim=32, depth=2, img_size=56, seed=3)
    vit = model.vit
    C = 6
    text = _random_text(C, 32, seed=2)
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, size=(*src_hw, 3), dtype=np.uint8)
    target_hw = src_hw  # label at the original image size
    # official path: PIL short-side resize, ToTensor, predict_slide, upsample to the label size, argmax
    img_ref = TVT.ToTensor()(_official_short_side_resize(Image.fromarray(arr), 56))
    with torch.no_grad():
        probs = _official_predict_slide(vit, img_ref, text.embeddings, side=56, stride=42)
    ref = F.interpolate(probs.unsqueeze(0), size=target_hw, mode="bilinear", align_corners=False).squeeze(0)
    ref_pred = ref.argmax(dim=0)
    # ours
    image = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    s = SegmentationSettings(
        image_size=56, mode="slide", window=56, stride=42, readout="tips", window_batch=3
    )
    pred, scores = predict(model, image, text, s, out_size=target_hw)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(pred, ref_pred)


# ------------------------------------------------------------------------------------ datasets
def _write_png(path, arr, mode=None):
    Image.fromarray(arr, mode=mode).save(path)


def test_ade20k_label_handling(tmp_path):
    (tmp_path / "images/validation").mkdir(parents=True)
    (tmp_path / "annotations/validation").mkdir(parents=True)
    _write_png(tmp_path / "images/validation/ADE_val_1.jpg", np.full((20, 30, 3), 128, np.uint8))
    lab = np.zeros((20, 30), np.uint8)
    lab[:, 10:20] = 1
    lab[:, 20:] = 150
    lab[0, 0] = 255
    _write_png(tmp_path / "annotations/validation/ADE_val_1.png", lab)
    ds = load_eval_dataset("ade20k", root=str(tmp_path))
    assert len(ds) == 1 and ds.class_names == list(ADE150_CLASSES) and len(ds.class_names) == 150
    item = ds[0]
    assert item["image"].shape == (3, 20, 30) and item["label"].dtype == torch.int64
    assert set(item["label"][:, :10].unique().tolist()) == {255}
    assert set(item["label"][:, 10:20].unique().tolist()) == {0}
    assert set(item["label"][1:, 20:].unique().tolist()) == {149}
    assert ds.keys() == ["images/validation/ADE_val_1.jpg"]


def _seg_folder(tmp_path, classes="cat\ndog\nsky\n", label=None, size=(28, 42)):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    (tmp_path / "classes.txt").write_text(classes)
    _write_png(tmp_path / "images/a.png", (np.random.RandomState(0).rand(*size, 3) * 255).astype(np.uint8))
    lab = label if label is not None else np.zeros(size, np.uint8)
    _write_png(tmp_path / "labels/a.png", lab)
    return load_eval_dataset("seg_folder", root=str(tmp_path))


def test_seg_folder_and_bad_inputs(tmp_path):
    m = ToyEncoder()
    s = SegmentationSettings(image_size=28, mode="whole")
    ds = _seg_folder(tmp_path)
    text = resolve_class_embeddings(ds.class_names, model=m, cache_dir=None)
    res = evaluate_segmentation(m, ds, text, s, progress=False)
    assert res["num_images"] == 1 and 0 <= res["metrics"]["miou"] <= 100
    # label ids the class list does not know
    bad = np.zeros((28, 42), np.uint8)
    bad[:, :5] = 7
    ds = _seg_folder(tmp_path, label=bad)
    with pytest.raises(ValueError, match="class list and the label ids disagree"):
        evaluate_segmentation(m, ds, text, s, progress=False)
    # label image of the wrong size
    ds = _seg_folder(tmp_path, label=np.zeros((30, 42), np.uint8))
    with pytest.raises(ValueError, match="label maps must have the image's size"):
        evaluate_segmentation(m, ds, text, s, progress=False)
    # text of another class list
    ds = _seg_folder(tmp_path)
    with pytest.raises(ValueError, match="cover 2 classes"):
        evaluate_segmentation(
            m, ds, resolve_class_embeddings(["a", "b"], model=m, cache_dir=None), s, progress=False
        )


def test_text_dim_differs_from_patch_dim():
    m = ToyEncoder(text_dim=16)
    text = resolve_class_embeddings(["a", "b"], model=m, cache_dir=None)
    img, lab = painted_image(torch.zeros(2, 2, dtype=torch.long), 2)
    ds = ListDataset([{"key": "0", "image": img, "captions": {}, "label": lab}], ["a", "b"])
    with pytest.raises(ValueError, match="patch features have dim 32"):
        evaluate_segmentation(m, ds, text, SegmentationSettings(image_size=None), progress=False)


def test_settings_validation():
    with pytest.raises(ValueError, match="unknown readout"):
        SegmentationSettings(readout="cls")
    with pytest.raises(ValueError, match="stride"):
        SegmentationSettings(window=100, stride=200)


def test_synthetic_dataset_when_present():
    pytest.importorskip("tipsdistill.cache.synthetic")
    ds = load_eval_dataset("synthetic", split="validation", size=2, image_size=56)
    m = ToyEncoder()
    text = resolve_class_embeddings(ds.class_names, model=m, templates="none", cache_dir=None)
    res = evaluate_segmentation(
        m, ds, text, SegmentationSettings(image_size=56, mode="whole"), progress=False
    )
    assert "miou_objects" in res["metrics"] and res["num_images"] == 2
