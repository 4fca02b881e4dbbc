"""The embedded benchmark's recipe (``distill/recipes/embedded.yaml`` + dotted overrides) resolves to
exactly the stage-2 configs the demo and the experiments built in Python before it existed.

``tests/data/embedded_configs_before.json`` holds, for the demo (full, ``--quick``, ``--seed/--steps``),
every experiment variant on both bases and the experiments' size flags, the ``(recipe, data)`` that
``scripts/demo.py`` / ``scripts/experiments.py`` passed to ``load_config`` at commit 830404a (captured
by wrapping ``load_config``, with output folder ``OUT``, cache ``CACHE/index.h5``, teacher folder
``/TEACHER``). Resolving those inputs today gives the old config; the new construction must equal it
in every field but ``recipe`` (the old runs were named ``distill``, they are now ``embedded``), and
but the one intended change: a run with the student's own text tower used to find its captions by
reading a copy of the cache with the caption embeddings hidden (``OUT/cache_notext``; pretraining runs:
no cache), it now says ``loss.text_source=student`` and reads the cache itself. The students are named as
registered (``vit_w96d4_patch8_reg1_tipsv2_64``...), where the old runs spelt the base name and the shape's
kwargs: both are compared spelt out (``students.variants.expanded_spelling``: the base name and every
shape kwarg), which builds the same model with the same weights for the same seed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tipsdistill.distill.config import config_to_dict, load_config
from tipsdistill.distill.embedded import FULL, QUICK, train_config
from tipsdistill.distill.experiments import ARCH_STUDENTS, BASES, MULTI_VARIANTS, variant_config, variants
from tipsdistill.students.variants import VARIANTS, canonical_spelling, expanded_spelling

ROOT = Path(__file__).resolve().parents[1]
BEFORE = json.loads((ROOT / "tests" / "data" / "embedded_configs_before.json").read_text())
OUT, CACHE, TEACHER = Path("OUT"), "CACHE/index.h5", Path("/TEACHER")
INIT = "OUT/teacher_vision.safetensors"
TEACHER_CFG = {"overrides": {"embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}}
# variants added after the fixture was captured (tested in test_experiment_variants_reach_the_train_config)
TEXT_TOWERS = ("distill_text_frozen", "distill_text_pretrained", "distill_text_pretrained_frozen")
WIDTHS = tuple(f"w{w}_seed{s}" for w in (64, 192) for s in range(3))
ARCHS = tuple(f"{a}_seed{s}" for a in ARCH_STUDENTS for s in range(3))  # issue 30's students
MULTI = tuple(f"{p}_seed{s}" for p in MULTI_VARIANTS for s in range(3))  # issue 31
NEWER = (*TEXT_TOWERS, *WIDTHS, *ARCHS, *MULTI)


def new_configs() -> dict[str, object]:
    """The same runs, built the new way (the names of the fixture)."""
    vs = variants(TEACHER_CFG, INIT, TEACHER / "tokenizer.model")
    out = {
        "demo": train_config(FULL, OUT, CACHE),
        "demo_quick": train_config(QUICK, OUT, CACHE),
        "demo_seed3_steps50": train_config(FULL.with_overrides("steps=50", "seed=3"), OUT, CACHE),
    }
    for bname, base in BASES.items():
        for name, v in vs.items():
            if name not in NEWER:
                out[f"{bname}/{name}"] = variant_config(FULL, v, OUT, CACHE, name, base)
    cli_bench, cli_base = replace(FULL, train_size=2000), ("steps=300", "data.batch_size=32")
    for name in ("seed1", "pretrain_tips"):
        out[f"cli/{name}"] = variant_config(cli_bench, vs[name], OUT, CACHE, name, cli_base)
    return out


def own_text_source(data: dict) -> dict:
    """The old inputs of an own-text-tower run with its caption source said, not hidden (see above)."""
    data = json.loads(json.dumps(data))
    if data["student"]["kwargs"].get("text"):
        data.setdefault("loss", {})["text_source"] = "student"
        if data.get("cache", {}).get("path") == "OUT/cache_notext/index.h5":
            data["cache"]["path"] = CACHE
    return data


def spelt(cfg: dict, spelling: Callable[[str, dict], tuple[str, dict]]) -> dict:
    """``cfg`` with its student in another spelling (``canonical_spelling``, ``expanded_spelling``)."""
    name, kwargs = spelling(cfg["student"]["name"], cfg["student"]["kwargs"])
    return {**cfg, "student": {**cfg["student"], "name": name, "kwargs": kwargs}}


def test_every_run_resolves_to_the_old_python_recipe() -> None:
    new = new_configs()
    assert set(new) == set(BEFORE)
    own_text = {n for n, b in BEFORE.items() if b["data"]["student"]["kwargs"].get("text")}
    runs = ("distill_text", "pretrain_tips", "pretrain_tipsv2")
    assert own_text == {f"{b}/{n}" for b in BASES for n in runs} | {"cli/pretrain_tips"}
    for name, before in sorted(BEFORE.items()):
        old = config_to_dict(load_config(before["recipe"], data=own_text_source(before["data"])))
        got = config_to_dict(new[name])
        want_recipe = "embedded" if before["recipe"] == "distill" else before["recipe"]
        assert (old.pop("recipe"), got.pop("recipe")) == (before["recipe"], want_recipe), name
        # every embedded run's student is a registered shape, named so; the old runs spelt it out
        assert got["student"]["name"] in VARIANTS and before["data"]["student"]["name"] not in VARIANTS, name
        assert spelt(got, canonical_spelling)["student"]["name"] == got["student"]["name"], name
        assert spelt(got, expanded_spelling) == spelt(old, expanded_spelling), name


def test_experiment_variants_reach_the_train_config(tmp_path: Path) -> None:
    """Every ablation knob of the experiments lands in the stage-2 config it trains with."""
    v = variants(
        {"overrides": {"embed_dim": 96, "depth": 6, "num_heads": 3}}, "teacher.safetensors", "tok.model"
    )
    cfgs = {
        n: variant_config(FULL, c, tmp_path, "cache/index.h5", n)
        for n, c in v.items()
        if n != "pretrain_tips"
    }
    assert cfgs["seed0"].data.global_scale == [1.0, 1.0] and cfgs["crop_view"].data.global_scale == [0.5, 1.0]
    assert cfgs["seed0"].data.local_crops == 0 and cfgs["with_locals"].data.local_crops == 2
    assert cfgs["seed0"].loss.teacher_temp == 0.07 and cfgs["teacher_temp04"].loss.teacher_temp == 0.04
    assert cfgs["lr3e-3"].optim.lr == 3e-3 and cfgs["seed0"].optim.lr == 1e-3
    assert cfgs["mask75"].loss.mask_ratio == 0.75 and cfgs["cosine"].loss.patch == "cosine"
    assert cfgs["deep_teacher_init"].student.init == "teacher.safetensors"
    assert cfgs["deep_random"].student.name == "vit_w96d6_patch8_reg1_tipsv2_64" and cfgs["seed1"].seed == 1
    assert cfgs["seed0"].student.name == "vit_w96d4_patch8_reg1_tipsv2_64"
    assert cfgs["pretrain_tipsv2"].data.local_crops == 2 and cfgs["pretrain_tipsv2"].loss.mask_ratio == 0.75
    prev = {n: variant_config(FULL, c, tmp_path, "c.h5", n, BASES["previous"]) for n, c in v.items()}
    assert prev["seed0"].steps == 400 and prev["seed0"].data.global_scale == [0.5, 1.0]
    assert prev["seed0"].data.local_crops == 2 and prev["full_view_nolocal"].data.local_crops == 0
    assert prev["full_view"].data.global_scale == [1.0, 1.0] and prev["full_view"].data.local_crops == 2
    # the paper's Table 2: the student's own text tower, random or the teacher's, trained or frozen
    for name in ("distill_text", *TEXT_TOWERS):
        c = cfgs[name]
        assert c.loss.text_source == "student" and c.seed == 0 and v[name].own_text, name
        text = c.student.kwargs["text"]
        assert text.get("freeze", False) == name.endswith("_frozen"), name
        assert text["kind"] == ("teacher" if "pretrained" in name else "tips"), name
    assert cfgs["distill_text_pretrained"].student.kwargs["text"]["teacher"] == "embedded"
    # students of other widths than the teacher's text (32-wide attention heads), each seed
    for name in WIDTHS:
        width, seed = int(name[1 : name.index("_")]), int(name[-1])
        student, base = cfgs[name].student, cfgs[f"seed{seed}"]
        assert (student.name, cfgs[name].seed) == (f"vit_w{width}d4_patch8_reg1_tipsv2_64", seed), name
        assert student.kwargs == base.student.kwargs, name
    # several teachers: each variant's teachers, their entries' settings and seed reach the config
    from tipsdistill.distill.experiments import Variant, variant_teachers

    paths = {"tips": "tips/index.h5", "eff": "eff/index.h5"}
    for name in MULTI:
        var = v[name]
        over = variant_teachers({n: paths[n] for n in var.teachers}, var.teacher_settings)
        c = variant_config(FULL, Variant((*var.overrides, over)), tmp_path, "", name)
        entries = {e.name: e for e in c.teachers}
        assert list(entries) == list(var.teachers) and c.seed == int(name[-1]) and not c.cache.path, name
        assert entries["tips"].text and entries["tips"].path == paths["tips"], name
        assert entries["tips"].patch_loss == ("proto" if "_proto_" in name else "cosine"), name
        eff = entries.get("eff")
        assert eff is None or (eff.patch_loss, eff.hidden_dim) == ("cosine", 256), name
    from tipsdistill.distill.multi import teachers_override

    with pytest.raises(ValueError, match=r"unknown field\(s\) \['wieght'\]"):
        teachers_override([{"name": "a", "path": "a.h5", "wieght": 2}])
    # the pretraining runs scale the recipe's teacher-temperature warm-up (3000 of 90000) to their steps
    assert (
        prev["pretrain_tipsv2"].loss.teacher_temp_warmup_steps == 13
        and prev["pretrain_tips"].teacher.source == "ema"
    )


def test_tipsdistill_train_lists_and_resolves_the_embedded_recipe() -> None:
    from tipsdistill.scripts.train import main

    proc = subprocess.run(
        [sys.executable, "-m", "tipsdistill.scripts.train", "--list-recipes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "embedded" in proc.stdout.split(), proc.stderr
    assert main(["--recipe", "embedded", "--print-config", "cache.path=c.h5"]) == 0
    with pytest.raises(ValueError, match="cache.path"):
        load_config("embedded")  # the cache is the one thing a user must give


def test_a_checkpoint_of_the_old_spelling_resumes_under_the_registered_name() -> None:
    """A demo run checkpointed when the recipe spelt its student as the base name + the shape's kwargs
    resumes with today's recipe (the same model under its registered name); a real change of the shape
    is still refused."""
    from tipsdistill.distill.resume import config_changes

    before = BEFORE["demo"]
    old = config_to_dict(load_config(before["recipe"], data=before["data"]))
    new = config_to_dict(train_config(FULL, OUT, CACHE))
    assert (old["student"]["name"], new["student"]["name"]) == (
        "vit_base_patch14_reg1_tipsv2",
        "vit_w96d4_patch8_reg1_tipsv2_64",
    )
    old["recipe"] = new[
        "recipe"
    ]  # the runs were renamed distill -> embedded before (see the module docstring)
    assert config_changes(old, new, old_world=1, new_world=1) == []
    deeper = json.loads(json.dumps(new))
    deeper["student"]["name"] = "vit_w96d6_patch8_reg1_tipsv2_64"
    assert config_changes(old, deeper, old_world=1, new_world=1) == [("student.kwargs.depth", 4, 6)]
