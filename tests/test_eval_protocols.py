"""Named protocols, suites, batched / bf16 / multi-process evaluation (``distill.evaluation.protocols``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval_toymodel import ListDataset, ToyEncoder

from tipsdistill.distill.evaluation import ClassEmbeddings, SegmentationFolder, SegmentationSettings
from tipsdistill.distill.evaluation.protocols import (
    PROTOCOLS,
    SCLIP_BACKGROUND_NAMES,
    dataset_background,
    parse_data_roots,
    resolve_settings,
)
from tipsdistill.distill.evaluation.segmentation import (
    evaluate_segmentation,
    finish_scores,
    mmseg_size,
    predict,
    predict_batch,
    short_side_size,
)

TOY = "python:test_eval_toymodel:build_toy"


# ----------------------------------------------------------------------------------- tiny benchmarks
class TinyBench(SegmentationFolder):
    """A benchmark in the layout the suites read: ``root/images/<split>``, ``root/labels/<split>``."""

    PRESETS = {
        "tinyvoc": ("class", ["background", "cat", "dog"]),
        "tinyade": ("none", ["wall", "sky", "floor"]),
    }

    def __init__(self, root: str, split: str = "val", *, bench: str = "tinyvoc") -> None:
        preset, names = self.PRESETS[bench]
        super().__init__(
            root,
            images=f"images/{split}",
            labels=f"labels/{split}",
            class_names=names,
            object_class_ids=[1, 2] if preset == "class" else None,
            name=bench,
        )
        self.preset = preset
        self.background_class = 0 if preset == "class" else None

    def identity(self):
        return {**super().identity(), "background": self.preset}


def _register() -> None:
    from tipsdistill.cache.datasets import list_datasets, register_dataset

    for bench in TinyBench.PRESETS:
        if bench not in list_datasets():
            register_dataset(bench)(lambda root, split="val", _b=bench: TinyBench(root, split, bench=_b))


_register()


def write_bench(root, n: int = 3, split: str = "val", num_classes: int = 3, seed: int = 0) -> None:
    """PNG images and single-channel label PNGs (with ignore pixels) of two sizes."""
    rng = np.random.default_rng(seed)
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(n):
        h, w = (42, 56) if i % 2 else (56, 42)
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        lab = rng.integers(0, num_classes, (h // 14, w // 14)).repeat(14, 0).repeat(14, 1).astype(np.uint8)
        img[..., 0] = lab * 80  # the class shows in the red channel
        lab[0, :] = 255
        Image.fromarray(img).save(root / "images" / split / f"{i:03d}.png")
        Image.fromarray(lab, mode="L").save(root / "labels" / split / f"{i:03d}.png")


def _list_dataset(n: int = 5, C: int = 4, seed: int = 0) -> ListDataset:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        h, w = [(56, 70), (70, 56), (42, 42)][i % 3]
        lab = torch.randint(0, C, (h, w), generator=g)
        lab[:2] = 255
        items.append(
            {"key": f"k{i}", "image": torch.rand(3, h, w, generator=g), "captions": {}, "label": lab}
        )
    return ListDataset(items, [f"c{i}" for i in range(C)], object_class_ids=[1, 2])


def _text(C: int, D: int = 32, seed: int = 0, synonyms: bool = False) -> ClassEmbeddings:
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(C) if not synonyms else torch.tensor([0, 0] + list(range(1, C)))
    return ClassEmbeddings(torch.randn(len(index), D, generator=g), index, [[f"c{i}"] for i in range(C)])


# ------------------------------------------------------------------------------------------ protocols
class _Preset(ListDataset):
    """A dataset that states its background preset (as the benchmarks do) and nothing else."""

    def __init__(self, preset: str, names: list[str], background_class: int | None = None) -> None:
        super().__init__([], names)
        self.preset, self.background_class = preset, background_class

    def identity(self):
        return {"name": "preset", "background": self.preset}


def test_protocol_values_resolve_and_are_recorded():
    voc = _Preset("class", ["bg", "cat"], background_class=0)
    ade = _Preset("none", ["wall", "sky"])
    assert dataset_background(voc) == 0 and dataset_background(ade) is None
    assert dataset_background(ListDataset([], ["Background", "cat"])) == 0  # TCL's rule: class 0 named so

    tcl = resolve_settings("tcl", "voc21", voc)
    assert (tcl.image_size, tcl.resize_rule, tcl.max_long_side, tcl.resize_interpolation) == (
        448,
        "mmseg",
        2048,
        "bilinear",
    )
    assert (tcl.mode, tcl.window, tcl.stride, tcl.window_softmax, tcl.templates) == (
        "slide",
        448,
        224,
        False,
        "tcl",
    )
    assert tcl.background_text is False and tcl.background_threshold == 0.4 and tcl.background_class == 0
    tcl_ade = resolve_settings("tcl", "ade150", ade)
    assert tcl_ade.background_text is True and tcl_ade.background_threshold is None

    s = resolve_settings("sclip", "voc21", voc)
    assert (s.image_size, s.window, s.stride, s.templates, s.synonym_reduce) == (
        336,
        224,
        112,
        "openai",
        "softmax",
    )
    assert (s.logit_scale, s.background_threshold, s.area_threshold) == (65.0, 0.1, 0.1)
    assert s.background_names == list(SCLIP_BACKGROUND_NAMES) and s.background_names[0] == "sky"
    assert (
        resolve_settings("sclip", "pc60", voc).logit_scale,
        resolve_settings("sclip", "pc60", voc).area_threshold,
    ) == (50.0, None)
    assert resolve_settings("sclip", "coco_object", voc).background_threshold == 0.1
    assert resolve_settings("sclip", "coco_stuff", ade).image_size == 448
    assert resolve_settings("sclip", "cityscapes", ade).image_size == 560
    a = resolve_settings("sclip", "ade150", ade)
    assert (a.logit_scale, a.background_threshold, a.image_size) == (40.0, None, 336)

    o = resolve_settings("sclip", "voc21", voc, {"stride": 56, "logit_scale": 10.0})
    assert (o.stride, o.logit_scale, o.window) == (56, 10.0, 224)
    rec = o.to_dict()
    assert rec["extra"] == {"protocol": "sclip", "dataset": "voc21", "overridden": ["logit_scale", "stride"]}
    assert rec["area_threshold"] == 0.1 and rec["resize_rule"] == "mmseg"
    with pytest.raises(ValueError, match="unknown protocol 'mmseg'"):
        resolve_settings("mmseg")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['stripe'\]"):
        resolve_settings("tips", overrides={"stripe": 1})
    with pytest.raises(ValueError, match="needs logit_scale"):
        SegmentationSettings(synonym_reduce="softmax")
    with pytest.raises(ValueError, match="set background_threshold"):
        SegmentationSettings(background_text=False)
    # mmcv imrescale(img, (2048, S)): the long side is capped, sides rounded half up
    assert mmseg_size(375, 500, 336) == (336, 448) and short_side_size(375, 500, 336) == (336, 448)
    assert mmseg_size(100, 2000, 336) == (102, 2048) and short_side_size(100, 2000, 336) == (336, 6720)
    assert mmseg_size(333, 500, 448) == (448, 673) and short_side_size(333, 500, 448) == (448, 672)
    assert parse_data_roots(["data", "voc21=/x/VOC2012"]) == ("data", {"voc21": "/x/VOC2012"})


def test_tips_is_the_old_default():
    """``--protocol tips`` (the default, no flags) gives exactly the settings of before the protocols."""
    from tipsdistill.scripts.evaluate import build_parser, setting_overrides

    old = {
        "image_size": 448, "mode": "slide", "window": 448, "stride": 336, "readout": "tips", "layer": None,
        "templates": "tcl", "background_threshold": None, "background_class": 0, "resize_backend": "pil",
        "window_batch": 8, "max_images": None,
    }  # fmt: skip
    notebook = {
        "resize_rule": "notebook", "resize_interpolation": "bicubic", "window_softmax": True, "logit_scale": None,
        "synonym_reduce": "cosine", "area_threshold": None, "background_text": True, "background_names": None,
        "amp": "none",
    }  # fmt: skip
    args = build_parser().parse_args(["--model", TOY, "--dataset", "synthetic"])
    assert args.protocol == "tips" and setting_overrides(args) == {}
    for ds in (None, ListDataset([], ["background", "cat"]), ListDataset([], ["wall", "sky"])):
        s = resolve_settings("tips", "voc21", ds, setting_overrides(args))
        d = {k: v for k, v in s.to_dict().items() if k != "extra"}
        assert {k: d[k] for k in old} == old and {k: d[k] for k in notebook} == notebook
        assert d == {k: v for k, v in SegmentationSettings().to_dict().items() if k != "extra"}
    assert not PROTOCOLS["tips"].settings and not PROTOCOLS["tips"].per_dataset


def test_sclip_and_tcl_scoring_rules():
    """finish_scores against a direct computation: softmax over every name then the max per class,
    SCLIP's area filter and probability threshold, TCL's constant background channel."""
    g = torch.Generator().manual_seed(0)
    text = _text(3, 8, synonyms=True)  # class 0 has two names: rows (0, 0, 1, 2)
    raw = torch.rand(4, 10, 10, generator=g) * 0.05
    raw[3, :, 0] += 0.3  # class 2 wins column 0: 10 of the 90 foreground pixels
    raw[1, :, 1] += 0.3  # the background's second name wins column 1
    raw[2, 3:, 2:] += 0.3  # class 1 the rest, confidently except rows 0-2
    raw[2, :3, 2:] += 0.05
    s = SegmentationSettings(
        mode="whole", logit_scale=10.0, synonym_reduce="softmax", background_threshold=0.5
    )
    pred, scores = finish_scores(raw, (10, 10), text, s)
    p = (raw * 10).softmax(0)
    ref = torch.stack([p[:2].max(0).values, p[2], p[3]])
    torch.testing.assert_close(scores, ref)
    best, arg = ref.max(0)
    assert torch.equal(pred, torch.where(best < 0.5, 0, arg))
    assert (
        bool((pred[:3, 2:] == 0).all()) and bool((pred[3:, 2:] == 1).all()) and bool((pred[:, 1] == 0).all())
    )
    for area, dropped in ((0.1, False), (0.25, True)):
        pa, _ = finish_scores(raw, (10, 10), text, s.replace(area_threshold=area, background_threshold=None))
        assert bool((pa == 2).any()) != dropped
        if dropped:
            fg = ref.argmax(0)
            assert torch.equal(pa[fg != 2], fg[fg != 2])  # the other pixels keep their class
    # TCL: background gets no text; it wins where every other class scores below the threshold
    tcl = SegmentationSettings(mode="whole", background_text=False, background_threshold=0.2)
    cos = torch.rand(3, 6, 6, generator=g) * 0.4
    pt, st = finish_scores(cos, (6, 6), _text(3, 8), tcl)
    fg_best, fg_arg = cos[1:].max(0)
    assert torch.equal(pt, torch.where(fg_best <= 0.2, 0, fg_arg + 1))
    assert bool((pt == 0).any()) and bool((pt != 0).any()) and bool((st[0] == 0.2).all())


# ------------------------------------------------------------------------------------- speed paths
@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_batched_equals_unbatched(mode):
    model, ds, text = ToyEncoder(), _list_dataset(n=4), _text(4)  # shapes: 2 of one size, 2 others
    one = SegmentationSettings(
        image_size=None, mode=mode, window=42, stride=28, image_batch=1, window_batch=1
    )
    many = one.replace(image_batch=4, window_batch=5)
    a = evaluate_segmentation(model, ds, text, one, keep_examples=2, progress=False)
    b = evaluate_segmentation(model, ds, text, many, keep_examples=2, progress=False)
    assert torch.equal(a["confusion_matrix"], b["confusion_matrix"]) and a["confusion_matrix"].sum() > 0
    assert [e.key for e in b["examples"]] == ["k0", "k1"]
    images = [ds[i]["image"] for i in range(len(ds))]
    batched = predict_batch(model, images, text, many)
    for im, (pb, sb) in zip(images, batched):
        p1, s1 = predict(model, im, text, one)
        assert torch.equal(p1, pb)
        torch.testing.assert_close(s1, sb, rtol=1e-5, atol=1e-6)
    if mode == "slide":  # the SCLIP path (raw averages, names softmaxed) batches the same way
        sclip = one.replace(window_softmax=False, logit_scale=40.0, synonym_reduce="softmax", image_size=56)
        syn = _text(4, synonyms=True)
        c = evaluate_segmentation(model, ds, syn, sclip, progress=False)
        d = evaluate_segmentation(
            model, ds, syn, sclip.replace(image_batch=3, window_batch=4), progress=False
        )
        assert torch.equal(c["confusion_matrix"], d["confusion_matrix"])
    else:  # bf16 autocast: float32 scores close to the float32 run
        _, s16 = predict(model, images[0], text, many.replace(amp="bf16"))
        _, s32 = predict(model, images[0], text, many)
        assert s16.dtype == torch.float32 and 0 < (s16 - s32).abs().max() < 0.1


def _rank_worker(rank: int, world: int, port: int, argv: list[str], ds, text, settings, q) -> None:  # noqa: ANN001
    import torch.distributed as dist

    from tipsdistill.scripts.evaluate import main

    os.environ.update(
        {"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port)}
    )  # fmt: skip
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    try:
        dist.init_process_group("gloo")
        res = evaluate_segmentation(
            ToyEncoder(), ds, text, settings, keep_examples=3, progress=False, distributed=True
        )
        rc = main(argv)  # the torchrun path of tipsdistill-eval (the group exists: it is reused, then closed)
        q.put((rank, res["confusion_matrix"].tolist(), [e.key for e in res["examples"]], rc, None))
    except Exception as exc:  # reported to the test, never a hang
        q.put((rank, None, None, None, repr(exc)))


def test_two_processes_equal_one(tmp_path):
    """2 gloo ranks (rank r takes images r, r+2, ...): the summed confusion matrix, the kept examples and
    the CLI's results.json equal one process's."""
    import torch.multiprocessing as mp

    from tests.launch_helpers import free_port
    from tipsdistill.scripts.evaluate import main

    write_bench(tmp_path / "bench", n=5)
    ds, text = _list_dataset(n=5), _text(4)
    settings = SegmentationSettings(image_size=None, mode="slide", window=42, stride=28, image_batch=2)
    argv = ["--model", TOY, "--dataset", "tinyvoc", "--data-root", str(tmp_path / "bench"), "--image-size", "42",
            "--window", "42", "--stride", "28", "--no-plots", "--text-cache", "none", "--quiet", "--device", "cpu"]  # fmt: skip
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    dist_argv = argv + ["--out", str(tmp_path / "two")]
    procs = [
        ctx.Process(target=_rank_worker, args=(r, 2, port, dist_argv, ds, text, settings, q))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        got = sorted(q.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(g[4] is None for g in got), got
    one = evaluate_segmentation(ToyEncoder(), ds, text, settings, keep_examples=3, progress=False)
    for _, mat, keys, rc, _ in got:
        assert rc == 0 and torch.equal(torch.tensor(mat), one["confusion_matrix"])
        assert keys == ["k0", "k1", "k2"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    ref = json.loads((tmp_path / "one" / "results.json").read_text())
    assert two["models"]["model0"]["metrics"] == ref["models"]["model0"]["metrics"]
    assert two["models"]["model0"]["num_images"] == 5 and two["settings"] == ref["settings"]


# -------------------------------------------------------------------------------------------- suites
def test_suite_writes_one_table_and_figure_and_lists_missing(tmp_path, capsys):
    from tipsdistill.scripts.evaluate import main

    data = tmp_path / "data"
    write_bench(data / "tinyvoc", n=3)
    write_bench(tmp_path / "elsewhere" / "ade", n=2, seed=1)
    out = tmp_path / "out"
    argv = ["--model", f"a={TOY}", "--model", f'b={TOY}:{{"seed": 1}}', "--suite", "tinyvoc,tinyade,tinymissing",
            "--data-root", str(data), "--data-root", f"tinyade={tmp_path / 'elsewhere' / 'ade'}", "--protocol", "tcl",
            "--image-size", "42", "--window", "42", "--stride", "28", "--num-examples", "1",
            "--text-cache", "none", "--quiet", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    md = (out / "results.md").read_text()
    assert md in printed
    head = next(line for line in md.splitlines() if line.startswith("| model"))
    assert head == "| model | tinyvoc | tinyvoc (objects) | tinyade | mean |"
    rows = [line for line in md.splitlines() if line.startswith(("| a ", "| b "))]
    assert len(rows) == 2
    assert "tinymissing: not found (" + str(data / "tinymissing") + ")" in md
    res = json.loads((out / "results.json").read_text())
    assert res["skipped"] == [
        {"dataset": "tinymissing", "path": str(data / "tinymissing"), "reason": "not found"}
    ]
    assert list(res["datasets"]) == ["tinyvoc", "tinyade"] and res["protocol"] == "tcl"
    voc, ade = res["datasets"]["tinyvoc"], res["datasets"]["tinyade"]
    assert voc["num_images"] == 3 and ade["num_images"] == 2
    # every setting per dataset: TCL's background rule where there is a background class, flags override
    assert voc["settings"]["background_text"] is False and voc["settings"]["background_threshold"] == 0.4
    assert ade["settings"]["background_text"] is True and ade["settings"]["background_threshold"] is None
    assert voc["settings"]["window_softmax"] is False and voc["settings"]["resize_rule"] == "mmseg"
    assert voc["settings"]["extra"]["overridden"] == ["image_size", "stride", "window"]
    for name in ("tinyvoc", "tinyade"):  # the table shows each dataset's own report
        own = json.loads((out / name / "results.json").read_text())
        for m in ("a", "b"):
            assert res["datasets"][name]["models"][m]["miou"] == own["models"][m]["metrics"]["miou"]
    cells = rows[0].strip("| ").split(" | ")
    assert cells[1] == f"{voc['models']['a']['miou']:.2f}" and cells[3] == f"{ade['models']['a']['miou']:.2f}"
    assert cells[4] == f"{(voc['models']['a']['miou'] + ade['models']['a']['miou']) / 2:.2f}"
    fig = np.asarray(Image.open(out / "suite_miou.png").convert("RGB")).astype(float)
    assert fig.shape[0] > 100 and fig.std() > 5
    # --strict: a missing dataset stops the run before any evaluation
    assert main(argv[:-1] + [str(tmp_path / "strict"), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "tinymissing" in err and str(data / "tinymissing") in err and not (tmp_path / "strict").exists()
