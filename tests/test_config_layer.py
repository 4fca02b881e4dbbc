"""One config layer under every command (cache, train, eval, export, demo): a YAML file, then the flags
(aliases of config keys), then dotted ``key=value`` overrides with YAML values; strict (an unknown key names
the nearest valid ones); the resolved config saved beside the outputs and loading back; the former flags
and JSON forms resolve to the same config as the new syntax."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from tipsdistill.cache.config_layer import (
    from_dict,
    given_flags,
    load_typed,
    parse_kwargs,
    parse_teacher_spec,
    save_config,
    to_dict,
)


def _cache_cfg(argv: list[str]):
    from tipsdistill.scripts.cache_features import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(argv))


def _without_header(path) -> dict:
    text = path.read_text()
    assert text.startswith("# resolved config of") and "git revision" in text
    return yaml.safe_load(text)


# ------------------------------------------------------------------------------------------- generic
def test_strict_unknown_key_names_the_nearest(tmp_path):
    from tipsdistill.cache.extract import CacheConfig

    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'; did you mean 'batch_size'"):
        from_dict(CacheConfig, {"batchsize": 4})
    with pytest.raises(TypeError, match="config key 'batch_size' must be an integer, got 'many'"):
        from_dict(CacheConfig, {"batch_size": "many"})
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match=r"bad.yaml must hold a mapping"):
        load_typed(CacheConfig, tmp_path / "bad.yaml")


def test_one_value_syntax_and_json_deprecated(caplog):
    assert parse_kwargs(["a=1", "b=x", "c=[1, 2]", "d=false", "e={k: v}", "f="], "kw") == {
        "a": 1, "b": "x", "c": [1, 2], "d": False, "e": {"k": "v"}, "f": ""
    }  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert parse_kwargs(['{"a": 1}'], "--teacher-kw") == {"a": 1}
    assert "JSON" in caplog.text and "deprecated" in caplog.text and "a=1" in caplog.text


def test_teacher_spec_one_way(caplog):
    assert parse_teacher_spec("timm:vit_tiny_patch16_224") == ("timm", {"model_name": "vit_tiny_patch16_224"})
    assert parse_teacher_spec("hf:google/siglip2-base-patch16-224") == (
        "hf", {"model": "google/siglip2-base-patch16-224"}
    )  # fmt: skip
    assert parse_teacher_spec("embedded:/x/teacher") == ("embedded", {"path": "/x/teacher"})
    assert parse_teacher_spec("embedded") == ("embedded", {})
    assert parse_teacher_spec("mypkg.mod:factory", {"a": 1}) == ("mypkg.mod:factory", {"a": 1})
    with caplog.at_level(logging.WARNING):
        old = parse_teacher_spec('timm:{"model_name": "vit_tiny_patch16_224"}')
    assert old == parse_teacher_spec("timm:vit_tiny_patch16_224") and "deprecated" in caplog.text
    with pytest.raises(ValueError, match="names nothing after 'timm:'"):
        parse_teacher_spec("timm:")


# ----------------------------------------------------------------------------------------- stage 1
def test_cache_config_file_flags_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "teacher: embedded\ndataset: synthetic\ndataset_kwargs: {split: train, size: 4}\nbatch_size: 8\n"
    )
    cfg = _cache_cfg(
        ["--config", str(tmp_path / "c.yaml"), "--out", "o", "batch_size=2", "dataset_kwargs.size=3"]
    )
    assert (cfg.teacher, cfg.out, cfg.batch_size) == ("embedded", "o", 2)
    assert cfg.dataset == "synthetic" and cfg.dataset_kwargs == {"split": "train", "size": 3}
    with pytest.raises(SystemExit, match=r"unknown config key 'view_sale'; did you mean 'view_scale'"):
        _cache_cfg(["--config", str(tmp_path / "c.yaml"), "view_sale=[0.1, 1.0]"])


def test_cache_old_flags_and_json_equal_new_syntax(caplog):
    old = _cache_cfg(
        ["--teacher", "timm", "--teacher-kw", '{"model_name": "vit_tiny_patch16_224", "img_size": 64}',
         "--dataset", "synthetic", "--data-kw", '{"size": 4}', "--out", "cache/", "--batch-size", "2"]
    )  # fmt: skip
    assert "deprecated" in caplog.text
    new = _cache_cfg(
        ["--teacher", "timm:vit_tiny_patch16_224", "--dataset", "synthetic", "--out", "cache/",
         "teacher_kwargs.img_size=64", "dataset_kwargs.size=4", "batch_size=2"]
    )  # fmt: skip
    kw = _cache_cfg(
        ["--teacher", "timm", "--teacher-kw", "model_name=vit_tiny_patch16_224", "img_size=64", "--dataset",
         "synthetic", "--data-kw", "size=4", "--out", "cache/", "--batch-size", "2"]
    )  # fmt: skip
    assert to_dict(old) == to_dict(new) == to_dict(kw)
    assert new.teacher == "timm" and new.teacher_kwargs == {
        "model_name": "vit_tiny_patch16_224",
        "img_size": 64,
    }


def test_cache_run_saves_its_config_and_reruns_from_it(tmp_path):
    """A real (tiny) stage-1 run writes cache_config.yaml; ``--config`` on it resolves the same config."""
    from tipsdistill.scripts.cache_features import main

    out = tmp_path / "cache"
    argv = ["--teacher", "embedded", "--dataset", "synthetic", "--out", str(out), "--image-size", "32",
            "--resize", "exact", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--quiet", "--no-text",
            "dataset_kwargs={split: train, size: 4, image_size: 32}"]  # fmt: skip
    assert main(argv) == 0
    saved = _without_header(out / "cache_config.yaml")
    assert saved == to_dict(_cache_cfg(argv))
    assert to_dict(_cache_cfg(["--config", str(out / "cache_config.yaml")])) == saved


# ----------------------------------------------------------------------------------------- stage 2
def test_train_config_file_and_legacy_eval_keys(tmp_path, capsys, caplog):
    from tipsdistill.distill.config import load_config, save_resolved
    from tipsdistill.scripts.train import main

    new = load_config("distill", ["cache.path=c.h5", "eval.settings.mode=slide", "eval.settings.window=48"])
    with caplog.at_level(logging.WARNING):
        old = load_config("distill", ["cache.path=c.h5", "eval.mode=slide", "eval.window=48"])
    assert "eval.settings.mode=slide" in caplog.text
    assert old == new and new.eval.settings["resize_backend"] == "torch"
    with pytest.raises(
        ValueError, match=r"unknown setting\(s\) \['stripe'\] in eval.settings; did you mean 'stride'"
    ):
        load_config("distill", ["cache.path=c.h5", "eval.settings.stripe=8"])
    with pytest.raises(ValueError, match=r"unknown config key 'data.imag_size'; did you mean 'image_size'"):
        load_config("distill", ["cache.path=c.h5", "data.imag_size=8"])
    path = save_resolved(new, tmp_path)
    assert main(["--config", str(path), "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(path.read_text())
    online = load_config("distill", ["teacher.source=online", "teacher.name=timm:vit_tiny_patch16_224"])
    assert (online.teacher.name, online.teacher.kwargs) == ("timm", {"model_name": "vit_tiny_patch16_224"})


# -------------------------------------------------------------------------------------- evaluation
def test_eval_config_old_flags_equal_new_syntax(tmp_path, caplog):
    from tipsdistill.scripts.evaluate import load_run_config

    with caplog.at_level(logging.WARNING):
        old = load_run_config(
            ["--model", "a=teacher:embedded", "--dataset", "synthetic", "--dataset-kwargs",
             '{"split": "validation", "size": 2}', "--mode", "whole", "--image-size", "0", "--no-plots"]
        )  # fmt: skip
    assert "deprecated" in caplog.text
    (tmp_path / "e.yaml").write_text(
        "models: {a: 'teacher:embedded'}\ndataset: synthetic\ndataset_kwargs: {split: validation}\n"
    )
    new = load_run_config(
        ["--config", str(tmp_path / "e.yaml"), "dataset_kwargs.size=2", "settings.mode=whole",
         "settings.image_size=null", "plots=false"]
    )  # fmt: skip
    assert to_dict(old) == to_dict(new)
    assert new.settings == {"mode": "whole", "image_size": None} and new.plots is False
    with pytest.raises(ValueError, match=r"unknown config key 'protocl'; did you mean 'protocol'"):
        load_run_config(["--model", "a=teacher:embedded", "protocl=tcl"])
    with pytest.raises(
        ValueError, match=r"unknown setting\(s\) \['stripe'\] in settings; did you mean 'stride'"
    ):
        load_run_config(["--model", "a=teacher:embedded", "settings.stripe=8"])
    with pytest.raises(ValueError, match="no model to evaluate"):
        load_run_config(["--dataset", "synthetic"])


def test_eval_run_saves_config_and_reruns_from_it(tmp_path, capsys):
    """tipsdistill-eval writes eval_config.yaml beside results.json; ``--config`` on it gives the same
    results; the old JSON kwargs of a python: spec equal model_kwargs."""
    pytest.importorskip("tipsdistill.cache.synthetic")
    from tipsdistill.scripts.evaluate import load_run_config, main

    out = tmp_path / "out"
    argv = ["--model", "a=python:test_eval_toymodel:build_toy", "--model", "b=python:test_eval_toymodel:build_toy",
            "model_kwargs.b.seed=1", "--dataset", "synthetic", "dataset_kwargs={split: validation, size: 1}",
            "settings.mode=whole", "settings.image_size=56", "--no-plots", "--out", str(out), "--text-cache",
            "none", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    saved = _without_header(out / "eval_config.yaml")
    assert saved == to_dict(load_run_config(argv))
    assert main(["--config", str(out / "eval_config.yaml"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["models"] == first["models"]
    old = argv[:2] + ["--model", 'b=python:test_eval_toymodel:build_toy:{"seed": 1}'] + argv[5:]
    old[old.index("--out") + 1] = str(tmp_path / "old")
    assert main(old) == 0
    assert json.loads((tmp_path / "old" / "results.json").read_text())["models"]["b"] == first["models"]["b"]


# ---------------------------------------------------------------------------------- export, demo
def test_export_config(tmp_path):
    from tipsdistill.scripts.export import ExportConfig, build_parser, main

    (tmp_path / "x.yaml").write_text("checkpoint: runs/x\nweights: student\n")
    parser = build_parser()
    given = given_flags(parser, ["--config", str(tmp_path / "x.yaml"), "--format", "embedded-teacher"])
    assert given == {"config": str(tmp_path / "x.yaml"), "format": "embedded-teacher"}  # defaults left out
    cfg = load_typed(ExportConfig, given["config"], {"format": given["format"]}, ["alignment_images=5"])
    assert (cfg.checkpoint, cfg.weights, cfg.format, cfg.alignment_images) == (
        "runs/x",
        "student",
        "embedded-teacher",
        5,
    )
    with pytest.raises(ValueError, match=r"unknown config key 'weight'; did you mean 'weights'"):
        load_typed(ExportConfig, data={"weight": "ema"})
    assert main([str(tmp_path / "missing"), "weights=emma"]) == 2  # a bad value: exit 2, before any work
    assert main([str(tmp_path / "missing"), "wieghts=ema"]) == 2
    p = save_config(cfg, tmp_path / "export_config.yaml", command="tipsdistill-export")
    assert load_typed(ExportConfig, p) == cfg and "\ntoken:" not in p.read_text()


def test_demo_config_routes_keys(tmp_path):
    from tipsdistill.distill.embedded import QUICK
    from tipsdistill.scripts.demo import demo_config

    (tmp_path / "d.yaml").write_text("val_size: 3\nslide_window: 32\n")
    cfg = demo_config(QUICK, str(tmp_path / "d.yaml"), ["train_size=16", "optim.lr=0.003"])
    assert (cfg.val_size, cfg.slide_window, cfg.train_size) == (3, 32, 16)
    assert cfg.overrides == (*QUICK.overrides, "optim.lr=0.003")
    p = save_config(cfg, tmp_path / "demo_config.yaml", command="tipsdistill-demo")
    assert demo_config(QUICK, str(p), []) == cfg
    with pytest.raises(TypeError, match="config key 'val_size' must be an integer"):
        demo_config(QUICK, None, ["val_size=many"])
