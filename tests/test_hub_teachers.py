"""Teachers by hub name, resolved offline from a temporary HF cache in the hub layout
(``models--org--name/snapshots/<rev>/...`` + ``refs/main``) that the tests fill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.test_teachers_hf import _configs
from tests.test_teachers_tips import TINY_DICT, tips_files  # noqa: F401  (fixture)
from tipsdistill.teachers import build_teacher
from tipsdistill.teachers.hub import resolve_file, snapshot

torch.set_num_threads(1)
REV = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, src: Path, revision: str = REV) -> Path:
    """Copy the files of ``src`` (a folder) into ``cache`` as the snapshot ``revision`` of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    shutil.copytree(src, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_hf_teacher_by_repo_id_offline(hub, tmp_path):
    import transformers as tr

    torch.manual_seed(0)
    model = tr.Tipsv2Model(_configs()["tipsv2"]).eval()
    model.save_pretrained(tmp_path / "saved")
    put_in_hub_cache(hub, "org/tiny-tipsv2", tmp_path / "saved")
    t = build_teacher("hf", model="org/tiny-tipsv2")
    ref = build_teacher("hf", model=tmp_path / "saved")
    x = torch.rand(2, 3, 28, 28)
    torch.testing.assert_close(t.encode_image(x).patch, ref.encode_image(x).patch, rtol=0, atol=0)
    assert t.identity()["source"] == "org/tiny-tipsv2"
    pinned = build_teacher("hf", model="org/tiny-tipsv2", revision=REV)
    assert pinned.identity()["source"] == f"org/tiny-tipsv2@{REV}"
    with pytest.raises(
        ValueError, match=r"'org/absent'.*HF_HUB_OFFLINE=1.*huggingface-cli download org/absent"
    ):
        build_teacher("hf", model="org/absent")
    with pytest.raises(
        ValueError, match=r"revision v9.*huggingface-cli download org/tiny-tipsv2 --revision v9"
    ):
        build_teacher("hf", model="org/tiny-tipsv2", revision="v9")


def _tiny_vit():
    import timm

    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw).eval(), kw


def test_timm_teacher_hf_hub_name_and_pretrained_offline(hub, tmp_path):
    from safetensors.torch import save_file

    vit, kw = _tiny_vit()
    d = tmp_path / "timm_repo"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(
        json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": kw | {"num_classes": 0}})
    )
    put_in_hub_cache(hub, "org/tiny-vit", d)
    t = build_teacher("timm", model_name="hf-hub:org/tiny-vit")
    x = torch.rand(1, 3, 32, 32)
    ref = build_teacher("timm", model_name="vit_tiny_patch16_224", checkpoint=d / "model.safetensors", **kw)
    torch.testing.assert_close(t.encode_image(x).patch, ref.encode_image(x).patch, rtol=0, atol=0)
    assert t.identity()["checkpoint"] == "hf-hub:org/tiny-vit"
    # pretrained=True: the weights of the model's own hf_hub_id, from the cache
    put_in_hub_cache(hub, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", d)
    p = build_teacher("timm", model_name="vit_tiny_patch16_224", pretrained=True, **kw)
    torch.testing.assert_close(p.encode_image(x).patch, ref.encode_image(x).patch, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"'org/none'.*HF_HUB_OFFLINE=1"):
        build_teacher("timm", model_name="hf-hub:org/none")


def test_tips_npz_from_hub_file_and_url_offline(hub, tmp_path, tips_files):  # noqa: F811
    d = tmp_path / "tips_repo"
    d.mkdir()
    for k in ("vision", "text", "tok"):
        shutil.copy(tips_files[k], d / Path(tips_files[k]).name)
    put_in_hub_cache(hub, "org/tips-tiny", d)
    t = build_teacher(
        "tips",
        vision_ckpt="hf-hub:org/tips-tiny/v_vision.npz",
        text_ckpt=f"hf-hub:org/tips-tiny@{REV}/v_text.npz",
        tokenizer="hf://org/tips-tiny/tok.model",
        variant=TINY_DICT,
        version=2,
    )
    ref = build_teacher(
        "tips",
        vision_ckpt=tips_files["vision"],
        text_ckpt=tips_files["text"],
        tokenizer=tips_files["tok"],
        variant=TINY_DICT,
    )
    x = torch.rand(1, 3, 28, 28)
    torch.testing.assert_close(t.encode_image(x).patch, ref.encode_image(x).patch, rtol=0, atol=0)
    torch.testing.assert_close(t.encode_text(["a cat"]), ref.encode_text(["a cat"]), rtol=0, atol=0)
    assert t.identity()["vision_ckpt"] == "hf-hub:org/tips-tiny/v_vision.npz"
    with pytest.raises(
        ValueError,
        match=r"HF_HUB_OFFLINE=1 and 'missing.npz' of 'org/tips-tiny'.*download org/tips-tiny missing.npz",
    ):
        resolve_file("hf-hub:org/tips-tiny/missing.npz")
    url = "https://example.com/tips/v_vision.npz"
    with pytest.raises(ValueError, match=r"not downloaded yet and HF_HUB_OFFLINE=1.*curl -L -o"):
        resolve_file(url)
    # a URL downloaded before (kept under HF_HOME/tipsdistill/urls) resolves offline
    err = None
    try:
        resolve_file(url)
    except ValueError as e:
        err = str(e)
    dst = Path(err.split("curl -L -o ")[1].split(" ")[0])
    dst.parent.mkdir(parents=True)
    shutil.copy(tips_files["vision"], dst)
    assert resolve_file(url) == str(dst)
    assert Path(snapshot("org/tips-tiny")).name == REV
