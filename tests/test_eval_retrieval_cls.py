"""Standard retrieval (Karpathy's COCO / Flickr30k splits, 5+ captions per image) and ImageNet zero-shot
classification (wnid folders, or the flat folder + LOC_val_solution.csv), on generated data with known answers.

The models are lookup tables: each image is painted with its id, the encoder returns the global tokens built
for that id, and the text encoder returns the vector built for each string; so the expected recalls and
accuracies follow from the tables, worked out by hand in the comments.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tipsdistill.distill.evaluation.classification import classification_accuracy
from tipsdistill.distill.evaluation.datasets import load_eval_dataset
from tipsdistill.distill.evaluation.imagenet_classes import IMAGENET_CLASSNAMES, imagenet_wnids
from tipsdistill.distill.evaluation.retrieval import retrieval_ranks, retrieval_recall
from tipsdistill.distill.evaluation.templates import OPENAI_IMAGENET_TEMPLATES
from tipsdistill.teachers.base import DenseEncoder, DenseFeatures, check_pixels

SIZE = 16  # evaluation image size (short side, centre crop); patch 8


# ------------------------------------------------------------------------------------------ models
def paint(path: Path, ident: int, size: tuple[int, int] = (24, 20)) -> None:
    """A flat image whose red level encodes ``ident`` (10 levels apart: JPEG-proof)."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 10 * ident + 5, 128, 64
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


class TableEncoder(DenseEncoder):
    """Global tokens ``image_tokens[id]`` ``(C, E)`` for the id painted into the image; text vectors from
    ``text_fn``; ``proj`` ``(E, D)``: the text interface (``project_to_text``) of a model narrower than its text."""

    def __init__(
        self,
        image_tokens: torch.Tensor,
        text_fn: Callable[[str], torch.Tensor],
        proj: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("tokens", image_tokens.float())
        self.proj = proj
        self.text_fn = text_fn
        self.patch_size, self.embed_dim = 8, int(image_tokens.shape[-1])
        self.num_global_tokens, self.has_text, self.num_layers = int(image_tokens.shape[1]), True, 1

    @property
    def text_dim(self) -> int:
        return self.embed_dim if self.proj is None else int(self.proj.shape[1])

    def project_to_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens if self.proj is None else tokens @ self.proj

    def encode_image(self, pixels, *, value_trick=False, value_readout="tips", layer=None) -> DenseFeatures:
        check_pixels(pixels, self.patch_size)
        h, w = pixels.shape[-2:]
        ids = torch.floor(pixels[:, 0, h // 2, w // 2] * 255 / 10).long()
        cls = self.tokens[ids]  # (B, C, E)
        patch = cls[:, :1, None, :].expand(-1, h // 8, w // 8, -1)
        return DenseFeatures(cls=cls, patch=patch)

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.text_fn(t) for t in texts])


def onehot(i: int, dim: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(i), dim).float()


def karpathy_perfect(n: int = 12) -> TableEncoder:
    """Image ``i``: both tokens = e_i; every caption ``image {i} caption {j}`` = e_i: R@K = 100."""
    dim = n + 2
    toks = torch.stack([torch.stack([onehot(i, dim), onehot(i, dim)]) for i in range(n)])

    def text(s: str) -> torch.Tensor:
        m = re.search(r"image (\d+) ", s)
        return onehot(int(m.group(1)), dim) if m else onehot(dim - 1, dim)

    return TableEncoder(toks, text)


# Hand-made scores of 21 captions against 4 images (caption counts 5, 5, 6, 5); a 5th "filler" dimension
# makes every caption vector unit length, so its cosine with image e_i is exactly S[t][i].
S_ROWS = (
    [[0.9, 0, 0, 0]] + [[0.1, 0.3, 0, 0]] * 4  # image 0
    + [[0, 0.25, 0, 0]] * 5  # image 1
    + [[0, 0, 0.2, 0.6]] * 6  # image 2 (six captions)
    + [[0, 0.4, 0.5, 0.7]] + [[0, 0, 0, 0.7]] * 4  # image 3
)  # fmt: skip
CAPTION_COUNTS = (5, 5, 6, 5)


def hand_captions() -> list[list[str]]:
    out, t = [], 0
    for i, k in enumerate(CAPTION_COUNTS):
        out.append([f"image {i} caption {j} (text {t + j})" for j in range(k)])
        t += k
    return out


def karpathy_hand() -> TableEncoder:
    """cls0 of image i = e_i, cls1 = e_{3-i}; caption t = S_ROWS[t] (+ filler)."""
    vecs = {}
    for cap, row in zip([c for cs in hand_captions() for c in cs], S_ROWS):
        s = torch.tensor(row + [0.0] * 4)
        s[4] = (1 - float((s**2).sum())) ** 0.5
        vecs[cap] = s
    toks = torch.stack([torch.stack([onehot(i, 8), onehot(3 - i, 8)]) for i in range(4)])
    return TableEncoder(toks, lambda s: vecs.get(s, onehot(7, 8)))


# ImageNet: four head classes A, B, C, D with text vectors e_0..e_3; the other 996 classes get random vectors
# in dimensions 4.. (cosine exactly 0 with every image token here, which lives in dimensions 0..3).
CLS_IDX = (0, 1, 409, 999)  # tench, goldfish, analog clock, toilet paper
IMAGE_CLASS = (0, 0, 1, 1, 2, 2, 3, 3)  # image id -> which of A..D
TEXT_DIM = 64


def imagenet_text_fn() -> Callable[[str], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(1000, TEXT_DIM, generator=g)
    table[:, :4] = 0
    for k, c in enumerate(CLS_IDX):
        table[c] = onehot(k, TEXT_DIM)
    index = {t.format(n): c for c, n in enumerate(IMAGENET_CLASSNAMES) for t in OPENAI_IMAGENET_TEMPLATES}
    return lambda s: table[index[s]] if s in index else onehot(TEXT_DIM - 1, TEXT_DIM)


def imagenet_perfect() -> TableEncoder:
    """Both tokens = the true class's text vector, through a 48 -> 64 text interface (token dim k of the
    student is text dim 47 - k): right only when the readout applies ``project_to_text``."""
    proj = torch.zeros(48, TEXT_DIM)
    proj[torch.arange(48), 47 - torch.arange(48)] = 1.0
    toks = torch.stack([torch.stack([onehot(47 - c, 48)] * 2) for c in IMAGE_CLASS])
    return TableEncoder(toks, imagenet_text_fn(), proj)


def imagenet_errors() -> TableEncoder:
    """cls1 = the true class (perfect); cls0 per image (A..D = e_0..e_3), true-class rank by hand:
    0: A -> 0 | 1: .8B+.6A -> 1 | 2: B -> 0 | 3: A-.3B (B negative: all 999 others above) -> 999
    4: C -> 0 | 5: .5A+.6B+.4C+.62D -> 3 | 6, 7: D -> 0.   top-1 5/8, top-5 7/8."""
    e = [onehot(k, TEXT_DIM) for k in range(4)]
    cls0 = [e[0], 0.8 * e[1] + 0.6 * e[0], e[1], e[0] - 0.3 * e[1], e[2],
            0.5 * e[0] + 0.6 * e[1] + 0.4 * e[2] + 0.62 * e[3], e[3], e[3]]  # fmt: skip
    toks = torch.stack([torch.stack([a, e[c]]) for a, c in zip(cls0, IMAGE_CLASS)])
    return TableEncoder(toks, imagenet_text_fn())


# ------------------------------------------------------------------------------------------ data
def write_karpathy(root: Path, kind: str, captions: list[list[str]]) -> Path:
    """Karpathy json + test images (ids 0..); train / restval / val entries whose images do not exist."""
    coco = kind == "coco"
    images = []
    for i, caps in enumerate(captions):
        fn = f"COCO_val2014_{i:012d}.jpg" if coco else f"{1000 + i}.jpg"
        paint(root / ("val2014" if coco else "flickr30k-images") / fn, i)
        images.append({"split": "test", "filename": fn, "sentences": [{"raw": c} for c in caps]})
        if coco:
            images[-1]["filepath"] = "val2014"
    for split in ("train", "restval", "val"):  # not on disk: only the test split's images are read
        e = {
            "split": split,
            "filename": f"{split}_0.jpg",
            "sentences": [{"raw": "image 0 caption 0 elsewhere"}],
        }
        if coco:
            e["filepath"] = "train2014" if split == "train" else "val2014"
        images.insert(1, e)
    path = root / f"dataset_{'coco' if coco else 'flickr30k'}.json"
    path.write_text(json.dumps({"images": images, "dataset": kind}))
    return path


def write_imagenet(root: Path, layout: str) -> Path:
    """The 8 images of ``IMAGE_CLASS`` as wnid folders or flat + LOC_val_solution.csv (+ LOC_synset_mapping.txt)."""
    wnids = imagenet_wnids()
    val = root / "ILSVRC" / "Data" / "CLS-LOC" / "val" if layout == "flat" else root / "val"
    rows = []
    for i, k in enumerate(IMAGE_CLASS):
        wnid = wnids[CLS_IDX[k]]
        name = f"ILSVRC2012_val_{i + 1:08d}"
        paint(val / (f"{name}.JPEG" if layout == "flat" else f"{wnid}/{name}.JPEG"), i)
        rows.append((name, f"{wnid} 1 2 30 40"))
    if layout == "flat":
        with (root / "LOC_val_solution.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            w.writerows(rows)
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} name of {w}, other\n" for w in wnids))
    else:
        (val / wnids[0] / "notes.md").write_text("not an image")
    return val


# ------------------------------------------------------------------------------------------ retrieval
def test_ranks_standard_rule_by_hand():
    # 3 images, 5 texts; texts 0,1 -> image 0, 2 -> 1, 3,4 -> 2 (scores = rows of texts x images)
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.1], [0.3, 0.4, 0.8], [0.0, 0.7, 0.6], [0.1, 0.2, 0.3]])
    img, txt = torch.eye(3), sim  # text t . image i = sim[t, i]
    i2t, t2i = retrieval_ranks(img, txt, torch.tensor([0, 0, 1, 2, 2]), chunk=2)
    # t2i: t0 0 | t1 (0.2 vs 0.5) 1 | t2 (0.4 vs 0.8) 1 | t3 (0.6 vs 0.7) 1 | t4 0
    assert t2i.tolist() == [0, 1, 1, 1, 0]
    # i2t: image 0 best 0.9 -> 0; image 1 best 0.4, above: t3 0.7, t1 0.5 -> 2; image 2 best 0.6, above: t2 0.8 -> 1
    assert i2t.tolist() == [0, 2, 1]


def test_ranks_equal_the_topk_definition_on_random_embeddings():
    """Recall@K from the ranks = CLIP_benchmark's definition: a query is found at K when any of its positives is
    among the top K (random embeddings: no ties)."""
    from tipsdistill.distill.evaluation.retrieval import recall_from_ranks

    g = torch.Generator().manual_seed(0)
    n, counts = 30, torch.randint(5, 8, (30,), generator=g)
    text_image = torch.repeat_interleave(torch.arange(n), counts)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(img[text_image] + 0.8 * torch.randn(len(text_image), 16, generator=g), dim=-1)
    i2t, t2i = retrieval_ranks(img, txt, text_image, chunk=7)
    pos = text_image[:, None] == torch.arange(n)[None]  # (T, N)
    sim = txt @ img.T
    for k in (1, 5, 10):
        top_t2i = sim.topk(k, dim=1).indices  # (T, k)
        want_t2i = 100.0 * pos.gather(1, top_t2i).any(1).double().mean()
        top_i2t = sim.T.topk(k, dim=1).indices  # (N, k)
        want_i2t = 100.0 * pos.T.gather(1, top_i2t).any(1).double().mean()
        assert recall_from_ranks(t2i, (k,))[k] == pytest.approx(float(want_t2i))
        assert recall_from_ranks(i2t, (k,))[k] == pytest.approx(float(want_i2t))
    assert 0 < recall_from_ranks(i2t, (1,))[1] < 100  # neither trivial nor empty


@pytest.mark.parametrize("kind", ["coco", "flickr30k"])
def test_karpathy_perfect_model_scores_100(tmp_path, kind):
    n = 12
    caps = [
        [f"image {i} caption {j}" for j in range(5 + (i == 3))] for i in range(n)
    ]  # image 3: six captions
    write_karpathy(tmp_path, kind, caps)
    ds = load_eval_dataset(f"{kind}_karpathy", root=str(tmp_path))
    assert len(ds) == n and ds.identity()["num_captions"] == 5 * n + 1
    texts, rows = ds.caption_sets()["captions"]
    assert texts == [c for cs in caps for c in cs] and rows == [i for i, cs in enumerate(caps) for _ in cs]
    assert ds[3]["captions"] == {"alt": "image 3 caption 0"}
    r = retrieval_recall(karpathy_perfect(n), ds, image_size=SIZE, batch_size=5)
    assert set(r) == {"cls0/captions", "cls1/captions"}
    for row in r.values():
        assert row == {"i2t_r1": 100.0, "i2t_r5": 100.0, "i2t_r10": 100.0, "t2i_r1": 100.0, "t2i_r5": 100.0,
                       "t2i_r10": 100.0, "num": n, "num_texts": 5 * n + 1}  # fmt: skip
    # an unreadable image is left out with its captions and listed; the run goes on
    bad = ds.image_root / ds.keys()[5]
    bad.write_bytes(bad.read_bytes()[:40])
    r = retrieval_recall(karpathy_perfect(n), ds, image_size=SIZE, batch_size=5, ks=(1,))
    assert r["cls1/captions"] == {"i2t_r1": 100.0, "t2i_r1": 100.0, "num": n - 1, "num_texts": 5 * n - 4}
    assert (
        r["skipped/unreadable"]["num"] == 1 and r["skipped/unreadable"]["images"][0]["image"] == ds.keys()[5]
    )


def test_karpathy_hand_computed_recall(tmp_path):
    write_karpathy(tmp_path, "coco", hand_captions())
    ds = load_eval_dataset("karpathy", root=str(tmp_path), json="dataset_coco.json")
    r = retrieval_recall(karpathy_hand(), ds, image_size=SIZE, batch_size=3, num_workers=2)
    c0, c1 = r["cls0/captions"], r["cls1/captions"]
    assert (c0["num"], c0["num_texts"]) == (4, 21)
    # cls0 (image i = e_i): image->text best-caption ranks [0, 5, 1, 0]; text->image ranks: 11 zeros, 10 ones
    assert (c0["i2t_r1"], c0["i2t_r5"], c0["i2t_r10"]) == (50.0, 75.0, 100.0)
    assert c0["t2i_r1"] == pytest.approx(100 * 11 / 21) and c0["t2i_r5"] == c0["t2i_r10"] == 100.0
    # cls1 (image i = e_{3-i}): image->text ranks [11, 7, 10, 5]; text->image ranks: 10 ones, 10 twos, one 3
    assert (c1["i2t_r1"], c1["i2t_r5"], c1["i2t_r10"]) == (0.0, 0.0, 50.0)
    assert (c1["t2i_r1"], c1["t2i_r5"], c1["t2i_r10"]) == (0.0, 100.0, 100.0)
    # the first 2 images and their 10 captions only: image ranks [0, 4]; text ranks t0 0, t1-4 1, t5-9 0
    r2 = retrieval_recall(karpathy_hand(), ds, image_size=SIZE, max_images=2, ks=(1,))
    assert r2["cls0/captions"] == {"i2t_r1": 50.0, "t2i_r1": 60.0, "num": 2, "num_texts": 10}


def test_karpathy_missing_images_and_bad_files(tmp_path):
    write_karpathy(tmp_path, "coco", [["image 0 caption 0"], ["image 1 caption 0"], ["image 2 caption 0"]])
    (tmp_path / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    with pytest.raises(ValueError, match=r"1 of 3 test images .* missing='skip'"):
        load_eval_dataset("coco_karpathy", root=str(tmp_path))
    ds = load_eval_dataset("coco_karpathy", root=str(tmp_path), missing="skip")
    assert len(ds) == 2 and ds.identity()["skipped"] == [
        {"image": "val2014/COCO_val2014_000000000001.jpg", "reason": "image file missing"}
    ]
    with pytest.raises(ValueError, match="split 'dev'; use one of"):
        load_eval_dataset("coco_karpathy", root=str(tmp_path), split="dev")
    (tmp_path / "bad.json").write_text('{"images": [{"filename": "a.jpg"}]}')
    with pytest.raises(ValueError, match=r"bad.json: images\[0\] needs 'filename' and 'split'"):
        load_eval_dataset("coco_karpathy", root=str(tmp_path), json="bad.json")
    with pytest.raises(ValueError, match="dataset_flickr30k.json is neither in"):
        load_eval_dataset("flickr30k_karpathy", root=str(tmp_path / "val2014"))


def test_in_set_retrieval_still_one_caption_per_image():
    from test_eval_toymodel import ListDataset

    # 3 images, one caption each in two granularities; the "short" caption of image 2 is missing
    items = [{"key": str(i), "image": torch.full((3, 20, 24), (10 * i + 5) / 255),
              "captions": {"alt": f"image {i} alt", **({"short": f"image {i} short"} if i < 2 else {})}}
             for i in range(3)]  # fmt: skip
    r = retrieval_recall(karpathy_perfect(3), ListDataset(items, []), image_size=SIZE, ks=(1,))
    assert r["cls0/alt"] == {"i2t_r1": 100.0, "t2i_r1": 100.0, "num": 3, "num_texts": 3}
    assert r["cls1/short"]["num"] == 2


# ------------------------------------------------------------------------------------------ ImageNet
@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_imagenet_perfect_and_known_errors(tmp_path, layout):
    val = write_imagenet(tmp_path, layout)
    ds = load_eval_dataset("imagenet", root=str(val))
    ident = ds.identity()
    assert (
        ident["layout"] == ("flat_csv" if layout == "flat" else "wnid_folders")
        and ident["num_classes"] == 1000
    )
    assert len(ds) == 8 and sorted(ds.targets()) == sorted(CLS_IDX[k] for k in IMAGE_CLASS)
    assert ds.label_names[409] == ["analog clock"] and ds.wnids == imagenet_wnids()
    if layout == "folders":
        assert ident["ignored"] == [{"path": "n01440764/notes.md", "reason": "not an image"}]
    else:
        assert ident["synsets"].endswith("LOC_synset_mapping.txt")
    r = classification_accuracy(imagenet_perfect(), ds, image_size=SIZE, cache_dir=None, batch_size=3)
    assert r["cls0"] == r["cls1"] == {"top1": 100.0, "top5": 100.0, "num": 8}
    assert r["num_classes"] == 1000 and r["text"]["templates"] == 80
    r = classification_accuracy(imagenet_errors(), ds, image_size=SIZE, cache_dir=None)
    assert r["cls0"] == {"top1": 62.5, "top5": 87.5, "num": 8}
    assert r["cls1"] == {"top1": 100.0, "top5": 100.0, "num": 8}


def test_imagenet_class_subset_and_flat_csv_checks(tmp_path):
    wnids = imagenet_wnids()
    val = write_imagenet(tmp_path, "folders")
    sub = load_eval_dataset("imagenet", root=str(val), classes=[wnids[c] for c in CLS_IDX[:3]])
    assert len(sub) == 6 and sub.wnids == [wnids[c] for c in CLS_IDX[:3]]
    assert {"path": f"{wnids[999]}/*", "reason": "class outside classes= (2 files)"} in sub.identity()[
        "ignored"
    ]
    # head of 3: image 3 (A-.3B) now has rank 2 (A, C above), image 5 rank 2 (A, B above): top-1 3/6, top-5 all
    r = classification_accuracy(imagenet_errors(), sub, image_size=SIZE, cache_dir=None)
    assert r["cls0"] == {"top1": 50.0, "top5": 100.0, "num": 6} and r["num_classes"] == 3
    # image 1 (.8B+.6A, a top-1 miss) unreadable: left out and listed, top-1 3/5
    (val / sub.keys()[1]).write_bytes(b"not a jpeg")
    r = classification_accuracy(imagenet_errors(), sub, image_size=SIZE, cache_dir=None)
    assert r["cls0"] == {"top1": 60.0, "top5": 100.0, "num": 5}
    assert [b["image"] for b in r["unreadable"]["images"]] == [sub.keys()[1]]

    flat = tmp_path / "kaggle"
    fval = write_imagenet(flat, "flat")
    paint(fval / "ILSVRC2012_val_00000099.JPEG", 0)  # on disk, not in the solution file
    (fval / "ILSVRC2012_val_00000002.JPEG").unlink()  # in the solution file, not on disk
    with pytest.raises(ValueError, match=r"1 images listed in .*LOC_val_solution.csv are not in"):
        load_eval_dataset("imagenet", root=str(fval))
    ds = load_eval_dataset("imagenet", root=str(fval), missing="skip")
    ident = ds.identity()
    assert len(ds) == 7 and ident["missing"] == ["ILSVRC2012_val_00000002"]
    assert ident["ignored"] == [
        {"path": "ILSVRC2012_val_00000099.JPEG", "reason": "not in the solution file"}
    ]
    (flat / "LOC_val_solution.csv").write_text("ImageId,Label\nx,y\n")
    with pytest.raises(ValueError, match="needs ImageId and PredictionString"):
        load_eval_dataset("imagenet", root=str(fval))
    (flat / "LOC_val_solution.csv").unlink()
    with pytest.raises(ValueError, match="no WordNet-id folders .* no LOC_val_solution.csv"):
        load_eval_dataset("imagenet", root=str(fval))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_karpathy_and_imagenet(tmp_path, capsys):
    from tipsdistill.scripts.evaluate import main

    n = 11
    write_karpathy(
        tmp_path / "coco", "coco", [[f"image {i} caption {j}" for j in range(5)] for i in range(n)]
    )
    rc = main(["--model", f'perfect=python:test_eval_retrieval_cls:karpathy_perfect:{{"n": {n}}}',
               "--retrieval", "coco_karpathy", "--retrieval-root", str(tmp_path / "coco"),
               "--retrieval-image-size", str(SIZE), "--out", str(tmp_path / "r"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["task"] == "retrieval" and res["dataset"]["name"] == "coco_karpathy"
    assert res["models"]["perfect"]["cls1/captions"]["t2i_r10"] == 100.0
    assert "| perfect | cls0/captions | 100.0 | 100.0 | 100.0 |" in capsys.readouterr().out

    val = write_imagenet(
        tmp_path / "in", "folders"
    )  # and retrieval next to it, on 8 images (the tables' size)
    write_karpathy(
        tmp_path / "coco8", "coco", [[f"image {i} caption {j}" for j in range(5)] for i in range(8)]
    )
    rc = main(["--model", "perfect=python:test_eval_retrieval_cls:imagenet_perfect",
               "--model", "errors=python:test_eval_retrieval_cls:imagenet_errors",
               "--classification", "imagenet", "--classification-root", str(val),
               "--retrieval", "coco_karpathy", "--retrieval-root", str(tmp_path / "coco8"),
               "--classification-image-size", str(SIZE), "--retrieval-image-size", str(SIZE),
               "--text-cache", "none", "--out", str(tmp_path / "both"), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    cls = json.loads((tmp_path / "both" / "classification" / "results.json").read_text())
    assert cls["task"] == "classification" and cls["settings"]["templates"] == "openai"
    assert (
        cls["models"]["errors"]["cls0"]["top1"] == 62.5 and cls["models"]["perfect"]["cls1"]["top5"] == 100.0
    )
    assert (tmp_path / "both" / "retrieval" / "results.md").is_file()
    assert "| errors | cls0 | 62.50 | 87.50 | 8 | 1000 |" in capsys.readouterr().out
    rc = main(["--model", "python:test_eval_retrieval_cls:imagenet_perfect", "--classification", "imagenet",
               "--classification-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), "--quiet"])  # fmt: skip
    assert rc == 2 and "is not a folder" in capsys.readouterr().err
