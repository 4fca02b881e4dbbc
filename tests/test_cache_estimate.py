"""``tipsdistill-cache --estimate``: bytes per image from the writer's own layout, teacher shapes
without weights, dataset sizes counted or named; the estimate equals what a real cache stores."""

from __future__ import annotations

import pytest

from tests.cache_helpers import write_captions, write_images
from tipsdistill.cache import extract_features, open_cache
from tipsdistill.cache.estimate import (
    KNOWN_SHAPES,
    TeacherShape,
    bytes_per_image,
    estimate_table,
    teacher_shape,
)
from tipsdistill.cache.format import layout_from_meta
from tipsdistill.scripts.cache_features import main as cache_main

BOOKKEEPING = 1 + 256 + 4  # done, skip_reason, checksum per sample
VALID = 3  # text_valid per caption granularity (alt, short, detailed)


def test_known_shapes_bytes():
    g = KNOWN_SHAPES["vit-g/14"]
    assert (g.dim, g.patch_size, g.global_tokens, g.text_dim) == (1536, 14, 2, 1536)
    # 32x32 patch tokens + 2 global tokens + 3 caption embeddings, float16
    assert bytes_per_image(g, 448) == (1024 + 2 + 3) * 1536 * 2 + VALID + BOOKKEEPING
    # int8: 1 byte per value + a float32 scale per token (text stays float16)
    assert (
        bytes_per_image(g, 448, storage="int8")
        == (1024 + 2) * (1536 + 4) + 3 * 1536 * 2 + VALID + BOOKKEEPING
    )
    # pca256 int8: the patch tokens as 256 int8 coefficients + scale; global tokens keep the full dim
    assert (
        bytes_per_image(g, 448, storage="int8", reduce_dim=256)
        == 1024 * (256 + 4) + 2 * (1536 + 4) + 3 * 1536 * 2 + VALID + BOOKKEEPING
    )
    assert bytes_per_image(g, 448, granularities=[]) == (1024 + 2) * 1536 * 2 + BOOKKEEPING
    with pytest.raises(ValueError, match="not a multiple of ViT-g/14's patch size 14"):
        bytes_per_image(g, 440)
    with pytest.raises(ValueError, match="reduce_dim 1536 is not below"):
        bytes_per_image(g, 448, reduce_dim=1536)


def test_teacher_shapes_without_weights():
    t = teacher_shape("timm:vit_tiny_patch16_224")  # built on the meta device
    assert (t.dim, t.patch_size, t.global_tokens) == (192, 16, 1)
    assert teacher_shape("timm", {"model_name": "vit_small_patch14_dinov2"}).dim == 384
    tips = teacher_shape("tips:L")
    assert (tips.dim, tips.patch_size, tips.text_dim) == (1024, 14, 1024)
    with pytest.raises(ValueError, match="cannot tell the shapes of teacher 'mystery'"):
        teacher_shape("mystery")


@pytest.mark.parametrize("kw", [{}, {"storage": "int8", "reduce_dim": 8}])
def test_estimate_equals_a_real_cache(tmp_path, kw):
    root = tmp_path / "img"
    rels = write_images(root, 6)
    write_captions(tmp_path / "caps.jsonl", rels)
    extract_features(
        out=str(tmp_path / "c"), teacher="tests.cache_helpers:build_tiny_teacher", dataset="folder",
        dataset_kwargs={"root": str(root), "captions": str(tmp_path / "caps.jsonl")}, image_size=32,
        batch_size=4, num_workers=0, progress=False, reduce_fit_images=6, **kw,
    )  # fmt: skip
    cache = open_cache(tmp_path / "c")
    real = layout_from_meta(cache.meta, 1).bytes_per_sample()
    assert bytes_per_image(TeacherShape("tiny", 32, 8, 2, 32), 32, **kw) == real
    # every byte the estimate counts is on the disk (the rest of the file is HDF5 metadata, keys, basis)
    assert (tmp_path / "c" / "shard-00000-of-00001.h5").stat().st_size > 6 * real


def test_cli_estimate(tmp_path, capsys):
    assert (
        cache_main(["--estimate", "--teacher", "vit-l/14", "--image-size", "224", "--dataset-size", "cc3m"])
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "ViT-L/14 (dim 1024, patch 14" in out
        and "grid 16x16" in out
        and "x 3,318,333 images (cc3m, nominal)" in out
    )
    assert f"({bytes_per_image(KNOWN_SHAPES['vit-l/14'], 224):,} bytes" in out
    # a dataset spec is counted
    rels = write_images(tmp_path / "img", 5)
    assert rels
    code = cache_main(["--estimate", "--teacher-dim", "96", "--patch-size", "8", "--images", str(tmp_path / "img"),
                       "--image-size", "64", "--storage", "int8", "--reduce-dim", "24", "--no-text"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "pca24 int8" in out and "x 5 images (folder, counted)" in out
    assert cache_main(["--estimate", "--teacher", "mystery"]) == 2
    assert "cannot tell the shapes" in capsys.readouterr().err
    assert cache_main(["--estimate-table"]) == 0
    table = capsys.readouterr().out
    assert (
        len(table.splitlines()) == 2 + len(KNOWN_SHAPES) * 2 * 4
    )  # header, rule, teachers x sizes x storages
    assert "| ViT-g/14 (dim 1536) | 448 | 32x32 | float16 | 3.2 MB |" in table


def test_table_rows():
    t = estimate_table([KNOWN_SHAPES["vit-b/16"]], [224], [("float16", 0)], {"a": 1000})
    assert t.splitlines()[2].startswith("| ViT-B/16 (dim 768) | 224 | 14x14 | float16 |")
