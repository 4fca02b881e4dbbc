"""transformers teachers (Tipsv2, CLIP, SigLIP, SigLIP2, DINOv2) from tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch

from tipsdistill.teachers import build_teacher
from tipsdistill.teachers.hf import FAMILY_STATS

torch.set_num_threads(1)

D, P = 32, 14
V = dict(hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=P)
T = dict(vocab_size=100, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


class TinyTokenizer:
    """Word -> id by a fixed table; HF tokenizer call convention."""

    def __call__(self, texts, padding=True, max_length=64, truncation=True, return_tensors="pt"):
        rows = [
            [3 + (sum(map(ord, w)) % 90) for w in t.lower().split()][: max_length - 1] + [2] for t in texts
        ]
        n = max_length if padding == "max_length" else max(map(len, rows))
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def _configs():
    import transformers as tr

    return {
        "tipsv2": tr.Tipsv2Config(vision_config=dict(V, mlp_ratio=2, image_size=28), text_config=T),
        "clip": tr.CLIPConfig(
            vision_config=dict(V, image_size=28), text_config=dict(T, eos_token_id=2), projection_dim=16
        ),
        "siglip": tr.SiglipConfig(vision_config=dict(V, image_size=28), text_config=T),
        "siglip2": tr.Siglip2Config(vision_config=dict(V, num_patches=4), text_config=T),
        "dinov2": tr.Dinov2Config(
            hidden_size=D,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_ratio=2,
            image_size=28,
            patch_size=P,
        ),
    }


def _reference(t, x):
    """The model's own forward on normalised pixels -> (cls, patch tokens, hidden state entering the last layer)."""
    m, fam = t.model, t.family
    if fam == "siglip2":
        B = x.shape[0]
        gh, gw = x.shape[2] // P, x.shape[3] // P
        patches = x.reshape(B, 3, gh, P, gw, P).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, -1)
        out = m.vision_model(
            pixel_values=patches,
            pixel_attention_mask=torch.ones(B, gh * gw, dtype=torch.long),
            spatial_shapes=torch.tensor([[gh, gw]] * B),
            output_hidden_states=True,
        )
        return out.pooler_output[:, None], out.last_hidden_state, out.hidden_states[-2]
    if fam == "dinov2":
        out = m(pixel_values=x, output_hidden_states=True)
        return out.last_hidden_state[:, :1], out.last_hidden_state[:, 1:], out.hidden_states[-2]
    out = m.vision_model(pixel_values=x, output_hidden_states=True)
    if fam == "tipsv2":
        return out.last_hidden_state[:, :2], out.last_hidden_state[:, 2:], out.hidden_states[-2]
    if fam == "siglip":
        return out.pooler_output[:, None], out.last_hidden_state, out.hidden_states[-2]
    # clip: image embedding = projection(post_layernorm(CLS)); patches the same way (MaskCLIP)
    proj = m.visual_projection(m.vision_model.post_layernorm(out.hidden_states[-1]))
    torch.testing.assert_close(
        proj[:, 0], m.get_image_features(pixel_values=x).pooler_output, atol=1e-5, rtol=1e-5
    )
    return proj[:, :1], proj[:, 1:], out.hidden_states[-2]


@pytest.mark.parametrize("family", ["tipsv2", "clip", "siglip", "siglip2", "dinov2"])
def test_hf_teacher_matches_model(family):
    torch.manual_seed(0)
    t = build_teacher("hf", model=_configs()[family], tokenizer=TinyTokenizer())
    assert t.family == family and t.patch_size == P
    mean, std = FAMILY_STATS[family]
    assert t.identity()["mean"] == pytest.approx(list(mean)) and t.identity()["std"] == pytest.approx(
        list(std)
    )
    px = torch.rand(2, 3, 28, 28)
    f = t.encode_image(px, value_trick=True)
    C = 2 if family == "tipsv2" else 1
    Dout = 16 if family == "clip" else D
    assert (
        f.cls.shape == (2, C, Dout)
        and f.patch.shape == (2, 2, 2, Dout)
        and f.value_patch.shape == (2, 2, 2, Dout)
    )
    assert f.patch.dtype == torch.float32
    x = (px - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        cls, patch, h = _reference(t, x)
        layer = t.layers[-1]
        if family in ("tipsv2", "dinov2"):
            v = layer.attention.o_proj(layer.attention.v_proj(layer.norm1(h)))
            xv = h + layer.layer_scale1(v)
            xv = xv + layer.layer_scale2(layer.mlp(layer.norm2(xv)))
            vp = t.vision.layernorm(xv)
        else:
            v = layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(h)))
            xv = h + v
            xv = xv + layer.mlp(layer.layer_norm2(xv))
            vp = t.vision.post_layernorm(xv)
            if family == "clip":
                vp = t.model.visual_projection(vp)
    Pfx = 0 if family.startswith("siglip") else C
    torch.testing.assert_close(f.cls, cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.patch.flatten(1, 2), patch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.value_patch.flatten(1, 2), vp[:, Pfx:], atol=1e-5, rtol=1e-5)
    assert t.encode_image(torch.rand(1, 3, 42, 56)).patch.shape == (
        1,
        3,
        4,
        Dout,
    )  # other sizes: resized positions
    texts = ["a photo of a cat", "two dogs"]
    if family == "dinov2":
        assert not t.has_text
        with pytest.raises(ValueError, match="no text tower"):
            t.encode_text(texts)
        return
    emb = t.encode_text(texts)
    assert emb.shape == (2, Dout) and emb.dtype == torch.float32
    tok = TinyTokenizer()(
        texts, padding="max_length" if family != "clip" else True, max_length=64 if family != "clip" else 77
    )
    with torch.no_grad():
        if family == "clip":
            ref = t.model.get_text_features(**tok).pooler_output
        elif family == "siglip":
            ref = t.model.text_model(input_ids=tok["input_ids"]).pooler_output
        else:
            ref = t.model.text_model(**tok).pooler_output
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)


def test_hf_local_dir_stats_and_errors(tmp_path):
    import transformers as tr

    model = tr.Dinov2Model(_configs()["dinov2"])
    model.save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]})
    )
    t = build_teacher("hf", model=tmp_path / "dino")
    assert t.identity()["mean"] == pytest.approx([0.1, 0.2, 0.3]) and t.identity()["source"] == str(
        tmp_path / "dino"
    )
    with pytest.raises(ValueError, match="pass a local path"):
        build_teacher("hf", model="google/tipsv2-b14")
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        t.encode_image(torch.rand(1, 3, 28, 30))
    with pytest.raises(ValueError, match="smaller than one patch"):
        t.encode_image(torch.rand(1, 3, 7, 28))
    with pytest.raises(ValueError, match="3 RGB channels"):
        t.encode_image(torch.rand(1, 3, 28))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        t.encode_image(torch.rand(1, 3, 28, 28) * 2)
    with pytest.raises(ValueError, match="got BertConfig"):
        build_teacher("hf", model=tr.BertConfig())
    clip = build_teacher("hf", model=_configs()["clip"])
    with pytest.raises(ValueError, match="no tokenizer"):
        clip.encode_text(["a cat"])
