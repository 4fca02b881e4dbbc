"""TIPS adapter: official .npz layout, strict loading, parity with transformers' Tipsv2Model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tipsdistill.teachers import build_teacher
from tipsdistill.teachers.tips import (
    VARIANTS,
    TipsVariant,
    build_vision_tower,
    describe_vision_checkpoint,
    timm_to_official,
)
from tipsdistill.teachers.tips_text import TextTowerConfig, TipsTextTower, TipsTokenizer

torch.set_num_threads(1)

D, DEPTH, HEADS, MLP = 32, 2, 2, 64
TINY = TipsVariant("custom", D, DEPTH, HEADS, MLP, False, TextTowerConfig(D, 2, HEADS, MLP))
GRID = 32  # TIPS v2 position grid
TINY_DICT = {"embed_dim": D, "depth": DEPTH, "num_heads": HEADS, "mlp_dim": MLP, "text": TINY.text.to_dict()}
SENTENCES = [
    "a photo of a cat sitting on a mat",
    "a dog runs in the park with a red ball",
    "two birds fly over the blue sea",
    "the tabby cat sleeps near the window",
    "a small boat on a calm lake at sunset",
    "people walk along a busy city street",
]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def tips_files(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("tips")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES),
        model_prefix=str(root / "tok"),
        vocab_size=60,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    tok_path = root / "tok.model"
    vocab = TipsTokenizer(tok_path).vocab_size
    torch.manual_seed(0)
    vision = build_vision_tower(TINY, grid=GRID)
    _randomise(vision, 1)
    official = timm_to_official(vision.state_dict(), mask_token=torch.randn(1, D))
    official["pos_embed"][:, 0] = torch.randn(D)  # a non-zero CLS position, as DINOv2 checkpoints have
    text = TipsTextTower(vocab, D, 2, HEADS, MLP)
    _randomise(text, 2)
    text_sd = {k: v.detach().clone() for k, v in text.state_dict().items()}
    text_sd["temperature"] = torch.tensor(0.0123)
    np.savez(root / "v_vision.npz", **{k: v.numpy() for k, v in official.items()})
    np.savez(root / "v_text.npz", **{k: v.numpy() for k, v in text_sd.items()})
    return {
        "root": root,
        "vision": root / "v_vision.npz",
        "text": root / "v_text.npz",
        "tok": tok_path,
        "official": official,
        "text_sd": text_sd,
        "vocab": vocab,
    }


def _hf_model(files):
    from transformers import Tipsv2Config, Tipsv2Model

    cfg = Tipsv2Config(
        vision_config=dict(
            hidden_size=D,
            num_hidden_layers=DEPTH,
            num_attention_heads=HEADS,
            mlp_ratio=MLP / D,
            image_size=32 * 14,
            patch_size=14,
        ),
        text_config=dict(
            vocab_size=files["vocab"],
            hidden_size=D,
            intermediate_size=MLP,
            num_hidden_layers=2,
            num_attention_heads=HEADS,
        ),
    )
    model = Tipsv2Model(cfg).eval()
    sd = {}
    for k, v in files[
        "official"
    ].items():  # official vision names -> transformers names (its conversion rules)
        if k in ("cls_token", "mask_token", "register_tokens"):
            sd[f"vision_model.embeddings.{k}"] = v
        elif k == "pos_embed":
            sd["vision_model.embeddings.position_embeddings"] = v
        elif k.startswith("patch_embed.proj."):
            sd["vision_model.embeddings.patch_embeddings.projection." + k.split(".")[-1]] = v
        elif k.startswith("norm."):
            sd["vision_model.layernorm." + k.split(".")[-1]] = v
        else:
            n = "vision_model." + k.replace("blocks.", "encoder.layer.")
            n = n.replace(".attn.proj.", ".attention.o_proj.").replace(".ls1.gamma", ".layer_scale1.lambda1")
            n = n.replace(".ls2.gamma", ".layer_scale2.lambda1")
            if ".attn.qkv." in n:
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    sd[n.replace(".attn.qkv.", f".attention.{name}_proj.")] = part
            else:
                sd[n] = v
    for k, v in files["text_sd"].items():
        if k == "temperature":
            sd[k] = v
            continue
        n = "text_model." + k.replace("ln_final.", "final_layer_norm.").replace(
            "token_embedding.", "embeddings.token_embedding."
        )
        n = (
            n.replace("transformer.resblocks.", "encoder.layers.")
            .replace(".ln_1.", ".layer_norm1.")
            .replace(".ln_2.", ".layer_norm2.")
        )
        n = (
            n.replace(".attn.", ".self_attn.")
            .replace(".mlp.c_fc.", ".mlp.fc1.")
            .replace(".mlp.c_proj.", ".mlp.fc2.")
        )
        if n.endswith(("in_proj_weight", "in_proj_bias")):
            suffix = "weight" if n.endswith("weight") else "bias"
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                sd[n.rsplit(".", 1)[0] + f".{name}_proj.{suffix}"] = part
        else:
            sd[n] = v
    model.load_state_dict(sd, strict=True)
    return model


def _tips(files, **kw):
    args = dict(
        vision_ckpt=files["vision"],
        text_ckpt=files["text"],
        tokenizer=files["tok"],
        variant=TINY_DICT,
        version=2,
    )
    args.update(kw)
    return build_teacher("tips", **args)


def test_variant_table_is_published():
    assert [(v.embed_dim, v.depth, v.num_heads) for v in VARIANTS.values()] == [
        (384, 12, 6),
        (768, 12, 12),
        (1024, 24, 16),
        (1152, 27, 16),
        (1536, 40, 24),
    ]
    assert VARIANTS["SO"].mlp_dim == 4304 and VARIANTS["g"].swiglu and VARIANTS["SO"].text.depth == 27
    small = build_vision_tower(VARIANTS["S"], grid=16)  # S: timm VisionTransformer args, v1 grid
    assert (
        small.pos_embed.shape == (1, 256, 384)
        and small.reg_token.shape == (1, 1, 384)
        and len(small.blocks) == 12
    )


def test_tokenizer_lowercases_pads_truncates(tips_files):
    tok = TipsTokenizer(tips_files["tok"])
    ids, pad = tok(["A Photo of a CAT", "a photo of a cat", "cat " * 100])
    assert ids.shape == (3, 64) and ids.dtype == torch.long
    assert torch.equal(ids[0], ids[1]) and int(pad[0].sum()) == 64 - int((ids[0] != 0).sum())
    assert int(pad[2].sum()) == 0  # truncated to 64 tokens, no padding


def test_tips_matches_transformers(tips_files):
    teacher = _tips(tips_files)
    hf = _hf_model(tips_files)
    assert teacher.num_global_tokens == 2 and teacher.has_text and teacher.patch_size == 14
    torch.manual_seed(3)
    for size in [(448, 448), (70, 98)]:  # native 32x32 grid, then a resized position table
        px = torch.rand(2, 3, *size)
        f = teacher.encode_image(px)
        assert f.cls.shape == (2, 2, D) and f.patch.shape == (2, size[0] // 14, size[1] // 14, D)
        assert f.cls.dtype == torch.float32
        with torch.no_grad():
            ref = hf.vision_model(pixel_values=px).last_hidden_state  # TIPS: mean 0, std 1
        torch.testing.assert_close(f.cls, ref[:, :2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(f.patch.flatten(1, 2), ref[:, 2:], atol=1e-4, rtol=1e-4)
    texts = ["A photo of a CAT", "two birds fly over the blue sea near a boat and a dog"]
    emb = teacher.encode_text(texts)
    ids, pad = teacher.tokenizer(texts)
    assert ids.shape == (2, 64) and int(pad[0].sum()) > 0
    with torch.no_grad():
        ref = hf.text_model(input_ids=ids, attention_mask=1 - pad).pooler_output
    assert emb.shape == (2, D)
    torch.testing.assert_close(emb, ref, atol=1e-4, rtol=1e-4)
    assert teacher.temperature == pytest.approx(0.0123)


def test_tips_value_trick_matches_direct_computation(tips_files):
    teacher = _tips(tips_files, text_ckpt=None, tokenizer=None)
    assert not teacher.has_text
    px = torch.rand(1, 3, 56, 42)
    f = teacher.encode_image(px, value_trick=True)
    m = teacher.model
    with torch.no_grad():
        from tipsdistill.teachers.vit import embed_tokens

        x, _ = embed_tokens(m, px, pos_interp="bilinear")
        for blk in m.blocks[:-1]:
            x = blk(x)
        blk = m.blocks[-1]
        h = blk.norm1(x)
        v = torch.nn.functional.linear(h, blk.attn.qkv.weight[2 * D :], blk.attn.qkv.bias[2 * D :])
        xv = x + blk.ls1.gamma * blk.attn.proj(v)
        xv = xv + blk.ls2.gamma * blk.mlp(blk.norm2(xv))
        ref = m.norm(xv)[:, 2:].reshape(1, 4, 3, D)
    torch.testing.assert_close(f.value_patch, ref, atol=1e-5, rtol=1e-5)


def test_tips_bad_inputs(tips_files):
    root = tips_files["root"]
    with pytest.raises(ValueError, match="without tokenizer"):
        _tips(tips_files, tokenizer=None)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        _tips(tips_files, tokenizer=root / "nope.model")
    with pytest.raises(ValueError, match="requested; pass variant"):
        _tips(tips_files, variant="B")
    with pytest.raises(ValueError, match=r"\*text\* checkpoint"):
        _tips(tips_files, vision_ckpt=tips_files["text"])
    with pytest.raises(ValueError, match="TIPS v2.*version=1"):
        _tips(tips_files, version=1)
    bad = dict(tips_files["official"])
    bad.pop("mask_token")
    bad["blocks.0.attn.extra"] = torch.zeros(1)
    np.savez(root / "bad_vision.npz", **{k: v.numpy() for k, v in bad.items()})
    with pytest.raises(
        ValueError,
        match=r"does not match the official TIPS key set: missing 1 keys \(e.g. \['mask_token'\]\); unexpected",
    ):
        _tips(tips_files, vision_ckpt=root / "bad_vision.npz")
    timm_sd = {"reg_token": torch.zeros(1), "cls_token": torch.zeros(1)}
    with pytest.raises(ValueError, match="timm checkpoint"):
        describe_vision_checkpoint(timm_sd)
    # a real-size B checkpoint's shapes are recognised without building the model
    fake_l = {
        "cls_token": torch.zeros(1, 1, 1024),
        "register_tokens": torch.zeros(1, 1, 1024),
        "norm.weight": torch.zeros(1024),
        "pos_embed": torch.zeros(1, 257, 1024),
        "patch_embed.proj.weight": torch.zeros(1),
        "blocks.0.attn.qkv.weight": torch.zeros(1),
        "blocks.0.mlp.fc1.weight": torch.zeros(4096, 1024),
    }
    fake_l.update({f"blocks.{i}.norm1.weight": torch.zeros(1) for i in range(24)})
    var, version = describe_vision_checkpoint(fake_l)
    assert var.name == "L" and version == 1
    teacher = _tips(tips_files)
    with pytest.raises(ValueError, match="3 RGB channels"):
        teacher.encode_image(torch.rand(1, 1, 28, 28))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        teacher.encode_image(torch.rand(1, 3, 28, 28) * 255)
    with pytest.raises(ValueError, match="smaller than one patch"):
        teacher.encode_image(torch.rand(1, 3, 10, 28))
    with pytest.raises(ValueError, match="empty text"):
        teacher.encode_text(["a cat", " "])


def test_text_tower_reusable_and_v1_grid(tips_files):
    tower = TipsTextTower.from_config(TextTowerConfig(16, 1, 2, 32, vocab_size=50))
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]])
    out = tower(ids)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.sum().backward()  # trainable for students
    assert tower.token_embedding.weight.grad is not None
    # padding does not change the pooled embedding
    torch.testing.assert_close(tower(ids[:, :3]), out, atol=1e-5, rtol=1e-5)
    # a v1 (16x16 grid) checkpoint loads with version=1 and is rejected with version=2
    v1 = build_vision_tower(TINY, grid=16)
    sd = timm_to_official(v1.state_dict())
    path = tips_files["root"] / "v1_vision.npz"
    np.savez(path, **{k: v.numpy() for k, v in sd.items()})
    t1 = build_teacher("tips", vision_ckpt=path, variant=TINY_DICT, version=1)
    assert t1.encode_image(torch.rand(1, 3, 28, 28)).patch.shape == (1, 2, 2, D)
    with pytest.raises(ValueError, match="i.e. TIPS v1"):
        build_teacher("tips", vision_ckpt=path, variant=TINY_DICT, version=2)
