"""Students of any architecture (issue 30): each listed timm family in a tiny configuration builds,
masks, exports, reloads with identical outputs and exports to ONNX (onnxruntime equal to PyTorch within
1e-4); the teacher grid is resampled to the student's grid as a reference computes it; a ``python:``
student works. Each family's whole loop (train, resume, export, evaluate): ``test_timm_students_train.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

#: tiny configurations of each family (timm constructor kwargs); all stride-8 stages at 32-64 px
FAMILIES: dict[str, dict] = {
    "convnext_atto": {"depths": [1, 1, 1, 1], "dims": [16, 24, 32, 48]},
    "mobilenetv4_conv_small": {},  # the constructor takes no width kwargs; pruned after stride 8 it is small
    "fastvit_t8": {"layers": [1, 1, 1, 1], "embed_dims": [48, 48, 96, 96]},
    "efficientvit_b0": {"widths": [8, 16, 24, 32, 48], "depths": [1, 1, 1, 1, 1], "head_dim": 8},
    "repvit_m0_9": {"embed_dim": [16, 24, 32, 48], "depth": [1, 1, 1, 1]},
    "resnet18": {"layers": [1, 1, 1, 1], "channels": [16, 24, 32, 48]},
}


def tiny_convnet(width: int = 24) -> nn.Module:
    """A plain module for the ``python:`` student: ``(B, 3, H, W) -> (B, width, H / 8, W / 8)``."""
    return nn.Sequential(
        nn.Conv2d(3, width, 4, stride=4),
        nn.BatchNorm2d(width),
        nn.GELU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
    )


def _tiny(name: str, **kw):
    from tipsdistill.students import build_student

    torch.manual_seed(0)
    return build_student(name, feature_stride=8, dim=32, text_dim=48, overrides=FAMILIES[name], **kw)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_masks_exports_and_matches_onnx(name, tmp_path) -> None:
    import onnxruntime as ort

    from tipsdistill.distill.export import ONNX_FILE, add_onnx, export_student
    from tipsdistill.students import FeatureMapStudent, load_student

    student = _tiny(name)
    assert isinstance(student, FeatureMapStudent) and student.patch_size == 8
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    student.train()
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    feats = student(x, mask)
    assert feats.patch.shape == (2, 4, 4, 32) and feats.cls.shape == (2, 2, 32)
    (feats.patch.sum() + feats.cls.sum()).backward()
    assert (
        student.mask_token.grad is not None and student.mask_token.grad.abs().sum() > 0
    )  # masking reaches it
    student.eval()
    with pytest.raises(ValueError, match="no self-attention for the 'tips' value trick.*'maskclip'"):
        student.encode_image(x, value_trick=True)
    # MaskCLIP's readout of the attention pool: on a 1x1 grid the pool attends to its one token with
    # weight 1, so each global token equals that token's pooled value
    one = student.encode_image(torch.rand(2, 3, 8, 8), value_trick=True, value_readout="maskclip")
    assert one.value_patch.shape == (2, 1, 1, 32)
    assert torch.allclose(one.cls, one.value_patch.flatten(1, 2).expand_as(one.cls), atol=1e-5)
    many = student.encode_image(x, value_trick=True, value_readout="maskclip")
    assert many.value_patch.shape == (2, 4, 4, 32) and not torch.allclose(many.value_patch, many.patch)
    with pytest.raises(ValueError, match="not multiples of the student's stride 8"):
        student.encode_image(torch.rand(1, 3, 36, 36))
    out = export_student(student, tmp_path / "export")
    conf = json.loads((out / "config.json").read_text())
    assert (
        conf["architecture_info"]["kind"] == "featuremap"
        and conf["architecture_info"]["readout"] == "maskclip"
    )
    assert conf["text_interface"]["shape"] == [48, 32]
    again = load_student(out)
    with torch.no_grad():
        a, b = student.encode_image(x), again.encode_image(x)
    assert torch.equal(a.patch, b.patch) and torch.equal(a.cls, b.cls)
    # ONNX: dense text-space features and global embeddings, dynamic batch (and size for one family)
    dynamic = name == "convnext_atto"
    add_onnx(out, again, image_size=32, dynamic_size=dynamic)
    sess = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    sizes = [(3, 32, 32)] + ([(1, 48, 64)] if dynamic else [])
    for batch, h, w in sizes:
        y = torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(h))
        dense, glob = sess.run(None, {"pixels": y.numpy()})
        with torch.no_grad():
            ref = again.encode_image(y, value_trick=True, value_readout="maskclip")  # the default readout
            ref_dense, ref_glob = again.project_to_text(ref.value_patch), again.project_to_text(ref.cls)
        assert dense.shape == (batch, h // 8, w // 8, 48) and glob.shape == (batch, 2, 48)
        np.testing.assert_allclose(dense, ref_dense.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(glob, ref_glob.numpy(), atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    assert (
        "## ONNX" in card
        and f"feature-map student over `{name}`" in card
        and "zero-shot readout: `maskclip`" in card
    )


def test_fused_stages_match_a_reference_fpn_and_export(tmp_path) -> None:
    """``fuse_stages``: the stride-8 stage plus the deeper stages, each through its 1x1 lateral, summed
    top-down with bilinear upsampling (computed here by hand from the backbone's own intermediates); the
    backbone keeps the stages up to the deepest fused one; export, reload and ONNX (dynamic size) agree."""
    from tipsdistill.distill.export import add_onnx, export_student
    from tipsdistill.students import load_student

    student = _tiny("convnext_atto", fuse_stages=[2, -1]).eval()
    assert student.fuse_stages == [2, 3] and student.config["fuse_stages"] == [2, 3]
    assert student.proj is None and len(student.laterals) == 3
    x = torch.rand(2, 3, 64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        m8, m16, m32 = student.backbone.forward_intermediates(
            student.normalise(x), indices=[1, 2, 3], intermediates_only=True
        )
        lat = student.laterals

        def up(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
            return F.interpolate(t, size=ref.shape[-2:], mode="bilinear", align_corners=False)

        ref = lat[0](m8) + up(lat[1](m16) + up(lat[2](m32), m16), m8)
        ref = student.norm(ref.permute(0, 2, 3, 1))
        feats = student.encode_image(x)
    assert feats.patch.shape == (2, 8, 4, 32)
    assert torch.allclose(feats.patch, ref, atol=1e-6)
    # the stride-32 stage reaches every token (its lateral changed: all tokens change)
    with torch.no_grad():
        saved = lat[2].weight.clone()
        lat[2].weight.add_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(3)))
        assert (student.encode_image(x).patch - feats.patch).abs().amax(-1).amin() > 1e-3
        lat[2].weight.copy_(saved)
    # pruned after the deepest fused stage only: fusing stage 2 drops stage 3
    assert len(_tiny("convnext_atto", fuse_stages=[2]).backbone.stages) == 3
    out = export_student(student, tmp_path / "fpn")
    again = load_student(out)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x).patch, feats.patch)
    # the export's own check: onnxruntime vs PyTorch on two batches, one of another height and width
    add_onnx(out, again, image_size=32, dynamic_size=True)
    onnx_facts = json.loads((out / "config.json").read_text())["onnx"]
    assert onnx_facts["dynamic_size"] and onnx_facts["max_abs_diff"] <= 1e-4
    with pytest.raises(ValueError, match="deeper than the read stage 1"):
        _tiny("convnext_atto", fuse_stages=[1])
    with pytest.raises(ValueError, match="out of range"):
        _tiny("convnext_atto", fuse_stages=[7])
    with pytest.raises(ValueError, match="no stages to fuse"):
        from tipsdistill.students import build_student

        build_student("python:tests.test_timm_students:tiny_convnet", fuse_stages=[1])


def test_teacher_grid_resampled_to_the_student_grid_as_the_reference() -> None:
    """Targets go teacher grid -> student grid (roi_align, ``distill.data``): downsampling by an integer
    factor is the area mean (avg_pool), upsampling is bilinear interpolation (align_corners=False), and a
    crop is the same on the crop's cells."""
    from tipsdistill.distill.data import align_teacher_map, resample_grid

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 8, 5, generator=g)  # (h_t, w_t, D): a patch-8 teacher at 64 px
    chw = teacher.permute(2, 0, 1)[None]
    # stride-16 student (4x4) and stride-32 student (2x2): area means of 2x2 and 4x4 teacher cells
    for k in (2, 4):
        ref = F.avg_pool2d(chw, k)[0].permute(1, 2, 0)
        assert torch.allclose(resample_grid(teacher, (8 // k, 8 // k)), ref, atol=1e-6)
    # stride-4 student (16x16): bilinear upsampling of the teacher grid
    ref = F.interpolate(chw, size=(16, 16), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    assert torch.allclose(resample_grid(teacher, (16, 16)), ref, atol=1e-6)
    # a crop (the left half, top half) to a 2x2 student grid: the mean of each 2x2 block of that quarter
    crop = align_teacher_map(teacher, (0.0, 0.0, 0.5, 0.5), (2, 2))
    ref = F.avg_pool2d(chw[..., :4, :4], 2)[0].permute(1, 2, 0)
    assert torch.allclose(crop, ref, atol=1e-6)
    # and a non-integer ratio (patch-14 teacher 16x16 at 224 px vs a stride-32 7x7 student) keeps the mean
    big = torch.randn(16, 16, 3, generator=g)
    assert torch.allclose(resample_grid(big, (7, 7)).mean((0, 1)), big.mean((0, 1)), atol=0.05)


def test_mask_paints_cells_with_the_mask_token() -> None:
    student = _tiny("convnext_atto")
    with torch.no_grad():
        student.mask_token.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.rand(1, 3, 32, 32)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, 5] = True  # cell (1, 1): pixels 8..15 x 8..15
    painted = student._paint_mask(x, mask)
    assert torch.equal(
        painted[0, :, 8:16, 8:16], torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1).expand(3, 8, 8)
    )
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[8:16, 8:16] = False
    assert torch.equal(painted[0][:, keep], x[0][:, keep])


def test_python_student(tmp_path) -> None:
    from tipsdistill.distill.evaluation.segmentation import dense_patch_features
    from tipsdistill.distill.export import export_student
    from tipsdistill.students import build_student, load_student

    name = "python:tests.test_timm_students:tiny_convnet"
    torch.manual_seed(0)
    student = build_student(name, factory_kwargs={"width": 24}, text_dim=16, probe_size=64).eval()
    assert (student.patch_size, student.width, student.embed_dim) == (8, 24, 24)
    x = torch.rand(2, 3, 64, 48)
    feats = student.encode_image(x)
    assert feats.patch.shape == (2, 8, 6, 24) and feats.cls.shape == (2, 2, 24)
    # the zero-shot readouts of a student without self-attention: tips resolves to the attention pool's
    # values of every token (maskclip); patch is its projected dense tokens
    dense = dense_patch_features(student, x, "tips")
    values = student.pool_values(feats.patch)
    assert torch.allclose(dense, F.normalize(student.project_to_text(values), dim=-1), atol=1e-6)
    dense = dense_patch_features(student, x, "patch")
    assert torch.allclose(dense, F.normalize(student.project_to_text(feats.patch), dim=-1), atol=1e-6)
    out = export_student(student, tmp_path / "py")
    with pytest.raises(ValueError, match="trust_code=True"):
        load_student(out)  # a file someone hands you never imports code by itself
    again = load_student(out, trust_code=True)
    with torch.no_grad():
        assert torch.equal(again.encode_image(x).patch, feats.patch)
    with pytest.raises(ValueError, match="must return a"):
        build_student("python:torch.nn:Flatten")
    with pytest.raises(ValueError, match="has no stage of stride 5"):
        build_student("resnet18", feature_stride=5)


def test_pareto_figure_from_a_results_json(tmp_path) -> None:
    from tipsdistill.scripts.plot_students import main, pareto_front, read_results

    pts = [(10.0, 5.0, "a"), (20.0, 4.0, "b"), (15.0, 3.0, "c"), (5.0, 6.0, "d")]
    assert [p[2] for p in pareto_front(pts)] == ["d", "a", "b"]  # c: b is faster and better
    rows = [
        {"model": m, "size": s, "torch_img_s": v * s / 64, "ort_img_s": None if m == "x" else 2 * v}
        for m, v in (("teacher", 30.0), ("vit_student", 33.0), ("convnext_fpn", 70.0), ("x", 1.0))
        for s in (64, 224)
    ]
    res = tmp_path / "results.json"
    res.write_text(
        json.dumps(
            {
                "miou": {"teacher": 14.2, "vit_student": [27.8, 26.0], "convnext_fpn": [9.0]},
                "throughput": rows,
            }
        )
    )
    miou, got = read_results(res)
    assert miou["teacher"] == [14.2] and len(got) == 8
    assert main([str(res), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 1000
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"miou": {}, "throughput": [{"model": "teacher"}]}))
    with pytest.raises(ValueError, match="row 0 lacks"):
        read_results(bad)


def test_bench_students_builds_the_teacher_tower_natively_at_another_size() -> None:
    """At 224 px the bench times the teacher's architecture built there (an in-graph position-table resize
    has no ONNX export): the same blocks and widths, a larger position table."""
    from tipsdistill.scripts.bench_students import STUDENTS, build

    native, big = build("teacher", 64), build("teacher", 128)
    with torch.no_grad():
        out = big.encode_image(torch.rand(1, 3, 128, 128))
    assert out.patch.shape == (1, 16, 16, native.embed_dim) and len(big.vit.blocks) == len(native.vit.blocks)
    tower = sum(
        p.numel() for n, p in native.named_parameters() if n.startswith("vit.") and "pos_embed" not in n
    )
    skip = ("pos_embed", "mask_token")  # the student's iBOT mask token is not in the teacher's tower
    assert sum(p.numel() for n, p in big.named_parameters() if not any(k in n for k in skip)) == tower
    assert {"vit_student", "convnext_s8", "convnext_fpn", "mnv4_s16"} <= set(STUDENTS)
