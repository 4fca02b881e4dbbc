"""Record ``tests/data/pretrain_script_step.json``: the step of ``scripts/pretrain_teacher.py`` (the second
implementation of the method, which made the shipped embedded teacher; removed by issue 28) on the weights
and batch of ``tests.test_embedded_teacher.tiny_recipe_step``.

The script is read from git at its last commit (:data:`SCRIPT_COMMIT`), so this runs from any checkout
with history::

    python tests/data/capture_script_step.py            # rewrites tests/data/pretrain_script_step.json

``test_recipe_step_equals_the_pretraining_script`` compares the engine's step with the recorded one.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_COMMIT = "ec042b8d659a799f95461459ff3953a2bcd11f0a"
OUT = ROOT / "tests" / "data" / "pretrain_script_step.json"


def load_script() -> ModuleType:
    """``scripts/pretrain_teacher.py`` at :data:`SCRIPT_COMMIT`, imported from a temporary file."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{SCRIPT_COMMIT}:scripts/pretrain_teacher.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "pretrain_teacher.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("pretrain_teacher", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from tests.test_embedded_teacher import tiny_recipe_step

    script = load_script()
    got = tiny_recipe_step()
    cfg, task, student, batch, mask = (got[k] for k in ("cfg", "task", "student", "batch", "mask"))
    B, K = mask.shape[0], int(cfg.head.out_dim)
    vit = student.vit
    shape = dict(
        img_size=vit.patch_embed.img_size[0],
        patch_size=student.patch_size,
        embed_dim=student.embed_dim,
        depth=student.num_layers,
        num_heads=vit.blocks[0].attn.num_heads,
        reg_tokens=1,
        no_embed_class=True,
        init_values=1.0,
    )
    net = script.Net(
        {
            "timm_name": "vit_base_patch14_reg1_tipsv2",
            "prototypes": K,
            "head_hidden": int(cfg.head.hidden_dim),
            "head_bottleneck": int(cfg.head.bottleneck_dim),
            "overrides": shape,
        }
    )
    student.zero_grad(set_to_none=True)
    net.vit.load_state_dict(student.vit.state_dict())
    net.mask_token.data.copy_(student.mask_token.data)
    pairs = [(net.ibot_head, task.patch_head, "patch_head"), (net.dino_head, task.cls_head, "cls_head")]
    for mine, theirs, _ in pairs:
        for i in (0, 2):
            mine.mlp[i].load_state_dict(theirs.mlp[i].state_dict())
        mine.last.parametrizations.weight.original1.data.copy_(
            theirs.last_layer.parametrizations.weight.original1
        )
    ema = copy.deepcopy(net).requires_grad_(False)  # step 0: the EMA copy is the student
    x, n_loc = batch["global"], batch["locals"].shape[1]
    local = (
        batch["locals"].transpose(0, 1).reshape(-1, *batch["locals"].shape[2:])
    )  # crop-major, as the script
    center = torch.zeros(K)
    with torch.no_grad():
        t_cls, t_patch = ema.tokens(x)
        t_cls_logits, t_patch_logits = ema.dino_head(t_cls[:, 0]), ema.ibot_head(t_patch[mask])
    s_cls, s_patch = net.tokens(x, mask)
    s_loc = net.dino_head(net.tokens(local)[0][:, 0]).reshape(n_loc, B, K)
    dino = sum(script.sk_center_ce(t_cls_logits, s_loc[i], center, 0.04) for i in range(n_loc)) / n_loc
    ibot = script.sk_center_ce(t_patch_logits, net.ibot_head(s_patch[mask]), center, 0.04)
    text = student.text
    with torch.no_grad():
        alt, short = text(list(batch["captions"]["alt"])), text(list(batch["captions"]["short"]))
    scale = task.clip_loss.contrastive.log_scale.detach().exp().reshape(())
    clip = 0.5 * (script.info_nce(s_cls[:, 0], alt, scale) + script.info_nce(s_cls[:, 1], short, scale))
    ref = {"patch": cfg.loss.patch_weight * ibot, "dino": dino, "clip": clip}
    sum(ref.values()).backward()
    grads = {f"vit.{k}": p.grad for k, p in net.vit.named_parameters() if p.grad is not None}
    grads["mask_token"] = net.mask_token.grad
    for mine, _, name in pairs:
        grads[f"{name}.mlp.0.weight"] = mine.mlp[0].weight.grad
    record = {
        "how": f"tests/data/capture_script_step.py: scripts/pretrain_teacher.py at {SCRIPT_COMMIT}",
        "masked_tokens": int(mask.sum()),
        "terms": {k: float(v) for k, v in ref.items()},
        "weights": got["weights"],
        "grads": {k: [float(g.sum()), float(g.norm())] for k, g in grads.items()},
    }
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}: terms {record['terms']}, {len(record['grads'])} gradients")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
