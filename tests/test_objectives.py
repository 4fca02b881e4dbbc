"""Objectives vs plain float64 loop re-computations (values and gradients), masking, captions, EMA."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from tipsdistill.distill import (
    CaptionSampler,
    ContrastiveLoss,
    DINOLoss,
    FrozenHead,
    HeadEMA,
    ImageTextLoss,
    KoLeoLoss,
    MaskGenerator,
    PatchFeatureLoss,
    PatchPrototypeLoss,
    block_mask,
    build_loss,
    random_mask,
    sinkhorn_knopp,
)
from tipsdistill.distill.schedules import cosine, linear_warmup
from tipsdistill.students import build_head

torch.set_num_threads(1)


def _leaf(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_(True)


def _log_softmax_loop(v: list[float]) -> list[float]:
    m = max(v)
    lse = m + math.log(sum(math.exp(x - m) for x in v))
    return [x - lse for x in v]


def _softmax_loop(v: list[float]) -> list[float]:
    return [math.exp(x) for x in _log_softmax_loop(v)]


# ----------------------------------------------------------------------------- contrastive
def _ref_infonce(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, valid: list[bool]
) -> torch.Tensor:
    """Loop re-computation with autograd-capable float64 scalars."""
    B = img.shape[0]
    idx = [i for i in range(B) if valid[i]]
    inorm = [img[i] / img[i].norm() for i in range(B)]
    tnorm = [txt[i] / txt[i].norm() for i in range(B)]
    total = img.new_zeros(())
    for i in idx:
        li = torch.stack([scale * (inorm[i] * tnorm[j]).sum() for j in idx])
        lt = torch.stack([scale * (tnorm[i] * inorm[j]).sum() for j in idx])
        pos = idx.index(i)
        total = total + 0.5 * (-(li[pos] - torch.logsumexp(li, 0)) - (lt[pos] - torch.logsumexp(lt, 0)))
    return total / len(idx)


@pytest.mark.parametrize("with_invalid", [False, True])
def test_contrastive_matches_loop(with_invalid: bool) -> None:
    B, D = 5, 7
    img, txt = _leaf(B, D, seed=1), _leaf(B, D, seed=2)
    valid = [True, False, True, True, False] if with_invalid else [True] * B
    loss_mod = ContrastiveLoss(init_temperature=0.2).double()
    out = loss_mod(img, txt, torch.tensor(valid))
    out.backward()
    g_img, g_txt, g_scale = img.grad.clone(), txt.grad.clone(), loss_mod.log_scale.grad.clone()
    img.grad = txt.grad = None
    log_scale = torch.tensor(math.log(1 / 0.2), dtype=torch.float64, requires_grad=True)
    ref = _ref_infonce(img, txt, log_scale.exp(), valid)
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(g_img, img.grad, atol=1e-5)
    assert torch.allclose(g_txt, txt.grad, atol=1e-5)
    assert g_scale.item() == pytest.approx(log_scale.grad.item(), rel=1e-4, abs=1e-6)
    if with_invalid:
        assert torch.all(g_img[1] == 0) and torch.all(g_img[4] == 0)


def test_contrastive_temperature_clamped_and_learnable() -> None:
    loss = ContrastiveLoss(init_temperature=0.07, min_temperature=0.01)
    with torch.no_grad():
        loss.log_scale.fill_(math.log(1 / 0.0001))
    assert loss.temperature == pytest.approx(0.01)
    assert loss.log_scale.requires_grad
    assert not ContrastiveLoss(learnable=False).log_scale.requires_grad


def test_image_text_loss_averages_cls1_alt_and_cls2_caption() -> None:
    B, D = 4, 6
    g = _leaf(B, 2, D, seed=3)
    alt, cap = _leaf(B, D, seed=4), _leaf(B, D, seed=5)
    obj = ImageTextLoss(init_temperature=0.1).double()
    out = obj(g, {"alt": alt, "caption": cap}, {"caption": torch.tensor([True, True, False, True])})
    s = torch.tensor(10.0, dtype=torch.float64)
    ref = 0.5 * (
        _ref_infonce(g[:, 0], alt, s, [True] * B) + _ref_infonce(g[:, 1], cap, s, [True, True, False, True])
    )
    assert set(out) == {"clip"}
    assert out["clip"].item() == pytest.approx(ref.item(), rel=1e-6)
    (ga,) = torch.autograd.grad(out["clip"], g)
    (gr,) = torch.autograd.grad(ref, g)
    assert torch.allclose(ga, gr, atol=1e-6)


def test_image_text_loss_errors() -> None:
    g = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="global token 1"):
        ImageTextLoss()(g, {"alt": torch.randn(3, 8), "caption": torch.randn(3, 8)})
    with pytest.raises(ValueError, match="text_dim=5"):
        ImageTextLoss(pairs=[("alt", 0)])(g, {"alt": torch.randn(3, 5)})
    assert not list(ImageTextLoss().parameters())[1:]  # the temperature only: the projection is the student's


def _ddp_worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, q) -> None:  # noqa: ANN001
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    B = img.shape[0] // world
    li = img[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    lt = txt[rank * B : (rank + 1) * B].clone().requires_grad_(True)
    loss = ContrastiveLoss(init_temperature=0.1).double()(li, lt)
    loss.backward()
    q.put((rank, loss.item(), li.grad.tolist()))  # plain lists: tensors would need the sender alive
    dist.destroy_process_group()


def test_contrastive_gathers_negatives_across_ranks() -> None:
    """Two gloo ranks: each rank's loss equals the loop loss of its rows against the full batch.

    The ranks are spawned, not forked: a fork of the pytest process (torch's thread pools, earlier
    tests' state) hung now and then on this machine, and the test timed out waiting for them."""
    import torch.multiprocessing as mp

    from tests.launch_helpers import free_port

    B, D = 6, 5
    img, txt = _leaf(B, D, seed=6).detach(), _leaf(B, D, seed=7).detach()
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, img, txt, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = sorted(q.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    scale = torch.tensor(10.0, dtype=torch.float64)
    # gradient reference: every rank's loss (its rows against all columns) summed, all rows leaves;
    # the differentiable all_gather gives rank r the sum over ranks of d(loss_s)/d(rows of r), so
    # averaging parameter gradients over ranks yields the gradient of the mean loss (one process)
    full_i, full_t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    total = sum(_ref_infonce_rows(full_i, full_t, scale, list(range(r * 3, r * 3 + 3))) for r in range(2))
    total.backward()
    for rank, loss, grad in results:
        rows = list(range(rank * 3, rank * 3 + 3))
        with torch.no_grad():
            ref = _ref_infonce_rows(img, txt, scale, rows)
        assert loss == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(torch.tensor(grad, dtype=torch.float64), full_i.grad[rows], atol=1e-6)


def _ref_infonce_rows(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """Loop loss of the given query rows against every column (all ranks' negatives)."""
    B = img.shape[0]
    inorm = [img[i] / img[i].norm() for i in range(B)]
    tnorm = [txt[i] / txt[i].norm() for i in range(B)]
    total = img.new_zeros(())
    for i in rows:
        li = torch.stack([scale * (inorm[i] * tnorm[j]).sum() for j in range(B)])
        lt = torch.stack([scale * (tnorm[i] * inorm[j]).sum() for j in range(B)])
        total = total + 0.5 * (-(li[i] - torch.logsumexp(li, 0)) - (lt[i] - torch.logsumexp(lt, 0)))
    return total / len(rows)


# ----------------------------------------------------------------------------- DINO
def test_dino_loss_matches_loop_and_updates_center() -> None:
    S, T, B, K = 3, 2, 4, 6
    s = _leaf(S, B, K, seed=8)
    t = _leaf(T, B, K, seed=9).detach()
    loss_mod = DINOLoss(K, teacher_temp=0.07).double()
    center0 = torch.randn(1, K, dtype=torch.float64) * 0.1
    loss_mod.center.copy_(center0)
    step = 4
    out = loss_mod(s, t, teacher_temp=linear_warmup(step, 10, 0.04, 0.07))["dino"]  # the loop's schedule
    tt = 0.04 + 0.03 * 4 / 10
    ref = s.new_zeros(())
    for i in range(S):
        for j in range(T):
            for b in range(B):
                p = _softmax_loop([(t[j, b, k].item() - center0[0, k].item()) / tt for k in range(K)])
                ls = torch.log_softmax(s[i, b] / 0.1, dim=0)
                ref = ref - sum(p[k] * ls[k] for k in range(K))
    ref = ref / (S * T * B)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(out, s)
    (g2,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-8)
    expected_center = 0.9 * center0 + 0.1 * t.reshape(-1, K).mean(0, keepdim=True)
    assert torch.allclose(loss_mod.center, expected_center)
    loss_mod.eval()
    loss_mod(s, t)
    assert torch.allclose(loss_mod.center, expected_center)  # no update in eval mode


def test_teacher_temperature_schedule() -> None:
    assert linear_warmup(0, 100, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup(50, 100, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup(100, 100, 0.04, 0.07) == pytest.approx(0.07)
    assert linear_warmup(5000, 100, 0.04, 0.07) == pytest.approx(0.07)


def test_sinkhorn_knopp_marginals() -> None:
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    q = sinkhorn_knopp(logits, 0.1, iters=50)
    assert torch.allclose(q.sum(1), torch.ones(40), atol=1e-4)
    assert torch.allclose(q.sum(0), torch.full((8,), 40 / 8), atol=1e-2)
    loss = DINOLoss(8, centering="sinkhorn_knopp")
    out = loss(torch.randn(2, 40, 8, requires_grad=True), logits)
    assert torch.isfinite(out["dino"])


# ----------------------------------------------------------------------------- patch prototype
def _ref_patch_proto(s, t, center, mask, mw, vw, st=0.1, tt=0.07):  # noqa: ANN001, ANN202
    B, N, K = s.shape
    per_image = []
    for b in range(B):
        num, den = s.new_zeros(()), 0.0
        for n in range(N):
            w = mw if (mask is not None and bool(mask[b, n])) else vw
            if w == 0:
                continue
            p = _softmax_loop([(t[b, n, k].item() - center[k]) / tt for k in range(K)])
            ls = torch.log_softmax(s[b, n] / st, dim=0)
            num = num - w * sum(p[k] * ls[k] for k in range(K))
            den += w
        if den > 0:
            per_image.append(num / den)
    return torch.stack(per_image).mean()


@pytest.mark.parametrize("mw,vw", [(1.0, 0.0), (1.0, 1.0), (2.0, 0.5)])
def test_patch_prototype_matches_loop(mw: float, vw: float) -> None:
    B, N, K = 3, 6, 5
    s = _leaf(B, N, K, seed=10)
    t = _leaf(B, N, K, seed=11).detach()
    mask = random_mask(B, (2, 3), 0.5, generator=torch.Generator().manual_seed(0))
    loss = PatchPrototypeLoss(K, masked_weight=mw, visible_weight=vw).double()
    out = loss(s, t, mask)["patch"]
    ref = _ref_patch_proto(s, t, [0.0] * K, mask, mw, vw)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(out, s)
    (g2,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-8)


def test_ibotpp_visible_zero_equals_ibot_and_ratio_zero_equals_distillation() -> None:
    B, h, w, K = 4, 3, 3, 7
    s = _leaf(B, h, w, K, seed=12)
    t = _leaf(B, h * w, K, seed=13).detach()
    mask = random_mask(B, (h, w), 0.75, generator=torch.Generator().manual_seed(1))
    ibot = build_loss("ibot", out_dim=K).double()(s, t, mask)["patch"]
    ibotpp0 = build_loss("ibot++", out_dim=K, visible_weight=0.0).double()(s, t, mask)["patch"]
    assert ibot.item() == pytest.approx(ibotpp0.item(), rel=1e-12)
    # mask ratio 0: iBOT++ == all-token distillation (uniform mean over every token)
    zero = random_mask(B, (h, w), 0.0)
    assert not zero.any()
    ibotpp = build_loss("ibot++", out_dim=K).double()(s, t, zero)["patch"]
    distil = build_loss("patch_proto", out_dim=K, masked_weight=0.0, visible_weight=1.0).double()(s, t, None)[
        "patch"
    ]
    ref = _ref_patch_proto(s.reshape(B, h * w, K), t, [0.0] * K, None, 1.0, 1.0)
    assert ibotpp.item() == pytest.approx(distil.item(), rel=1e-12)
    assert ibotpp.item() == pytest.approx(ref.item(), rel=1e-6)


def test_patch_prototype_center_ema() -> None:
    K = 4
    loss = PatchPrototypeLoss(K, center_momentum=0.9)
    t = torch.randn(2, 5, K)
    loss(torch.randn(2, 5, K), t, None)
    assert torch.allclose(loss.center, 0.1 * t.reshape(-1, K).mean(0, keepdim=True), atol=1e-6)


# ----------------------------------------------------------------------------- feature losses
@pytest.mark.parametrize("kind", ["cosine", "smooth_l1", "mse"])
def test_patch_feature_losses_match_loop(kind: str) -> None:
    B, N, Ds, Dt = 2, 4, 5, 3
    s = _leaf(B, N, Ds, seed=14)
    t = _leaf(B, N, Dt, seed=15, scale=2.0).detach()
    mean = torch.randn(Dt, dtype=torch.float64)
    std = torch.rand(Dt, dtype=torch.float64) + 0.5
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]])
    loss = PatchFeatureLoss(
        kind, student_dim=Ds, teacher_dim=Dt, teacher_mean=mean, teacher_std=std, visible_weight=0.5
    )
    loss = loss.double()
    out = loss(s, t, mask)["patch"]
    W, bias = loss.adapter.weight.detach(), loss.adapter.bias.detach()
    per_image = []
    for b in range(B):
        num, den = s.new_zeros(()), 0.0
        for n in range(N):
            w = 1.0 if mask[b, n] else 0.5
            a = [sum(W[o, i] * s[b, n, i] for i in range(Ds)) + bias[o] for o in range(Dt)]
            z = [(t[b, n, o] - mean[o]) / std[o] for o in range(Dt)]
            if kind == "cosine":
                dot = sum(a[o] * z[o] for o in range(Dt))
                na = torch.sqrt(sum(a[o] ** 2 for o in range(Dt)))
                nz = math.sqrt(sum(float(z[o]) ** 2 for o in range(Dt)))
                lt = 1 - dot / (na * nz)
            elif kind == "mse":
                lt = sum((a[o] - z[o]) ** 2 for o in range(Dt)) / Dt
            else:
                terms = []
                for o in range(Dt):
                    d = (a[o] - z[o]).abs()
                    terms.append(0.5 * d**2 if d < 1.0 else d - 0.5)
                lt = sum(terms) / Dt
            num = num + w * lt
            den += w
        per_image.append(num / den)
    ref = torch.stack(per_image).mean()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(out, s)
    (g2,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g1, g2, atol=1e-8)


def test_koleo_matches_loop() -> None:
    x = _leaf(6, 4, seed=16)
    out = KoLeoLoss()(x)["koleo"]
    xn = [x[i] / x[i].norm() for i in range(6)]
    ref = x.new_zeros(())
    for i in range(6):
        d = min(((xn[i] - xn[j]).norm() for j in range(6) if j != i), key=lambda v: v.item())
        ref = ref - torch.log(d + 1e-8)
    ref = ref / 6
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)
    (g1,) = torch.autograd.grad(out, x)
    (g2,) = torch.autograd.grad(ref, x)
    assert torch.allclose(g1, g2, atol=1e-5)


# ----------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("mode", ["random", "block"])
def test_masks_exact_ratio(ratio: float, mode: str) -> None:
    gen = MaskGenerator(ratio, mode, seed=3)
    m = gen(8, (6, 7))
    assert m.dtype == torch.bool and m.shape == (8, 42)
    assert (m.sum(1) == round(ratio * 42)).all()
    m2 = MaskGenerator(ratio, mode, seed=3)(8, (6, 7))
    assert torch.equal(m, m2)


def test_block_mask_is_blocky() -> None:
    m = block_mask(16, (14, 14), 0.4, generator=torch.Generator().manual_seed(0)).reshape(16, 14, 14)
    r = random_mask(16, (14, 14), 0.4, generator=torch.Generator().manual_seed(0)).reshape(16, 14, 14)

    def same_neighbours(x: torch.Tensor) -> float:
        return float((x[:, 1:] == x[:, :-1]).float().mean() + (x[:, :, 1:] == x[:, :, :-1]).float().mean())

    assert same_neighbours(m) > same_neighbours(r) + 0.2


# ----------------------------------------------------------------------------- captions
def test_caption_sampling_frequencies() -> None:
    sampler = CaptionSampler({"short": 0.3, "detailed": 0.7}, seed=0)
    n = 20000
    caps = [{"alt": "a", "short": "s", "detailed": "d"}] * n
    texts, grans = sampler.sample(caps)
    frac = sum(g == "short" for g in grans) / n
    assert abs(frac - 0.3) < 0.015
    assert texts[:5] == [{"short": "s", "detailed": "d"}[g] for g in grans[:5]]
    default = CaptionSampler(seed=1).draw(n)
    assert abs(default.count("short") / n - 0.5) < 0.015


def test_caption_fallback_order_and_embeddings() -> None:
    sampler = CaptionSampler({"detailed": 1.0}, seed=0)
    caps = [{"detailed": "d", "short": "s"}, {"short": "s", "alt": "a"}, {"alt": "a", "detailed": ""}, {}]
    texts, grans = sampler.sample(caps)
    assert grans == ["detailed", "short", "alt", None] and texts == ["d", "s", "a", None]
    assert sampler.num_fallbacks == 2 and sampler.num_missing == 1
    sampler = CaptionSampler({"short": 1.0}, seed=0)
    emb = {"short": torch.ones(3, 2), "detailed": 2 * torch.ones(3, 2), "alt": 3 * torch.ones(3, 2)}
    valid = {"short": torch.tensor([True, False, False]), "detailed": torch.tensor([False, True, False])}
    out, ok, grans = sampler.sample_embeddings(emb, valid)
    assert grans == ["short", "detailed", "alt"]
    assert out[:, 0].tolist() == [1.0, 2.0, 3.0] and ok.all()


@pytest.mark.parametrize(
    "probs,match",
    [
        ({"short": 0.5, "detailed": 0.6}, "sum to"),
        ({"short": -0.1, "detailed": 1.1}, ">= 0"),
        ({"poem": 1.0}, "fallback"),
    ],
)
def test_caption_sampler_bad_probs(probs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CaptionSampler(probs)


# ----------------------------------------------------------------------------- EMA heads
def test_head_ema_update_formula_and_only_head_params() -> None:
    torch.manual_seed(0)
    encoder = nn.Linear(4, 8)
    head = build_head("dino", 8, 16, hidden_dim=12, bottleneck_dim=6)
    ema = HeadEMA(head)

    def momentum(step: int) -> float:  # the loop's schedule
        return cosine(step, 100, 0.9, 1.0)

    enc_before = [p.detach().clone() for p in encoder.parameters()]
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    head_before = [p.detach().clone() for p in head.parameters()]
    ema_before = [p.detach().clone() for p in ema.ema.parameters()]
    calls = []

    @contextlib.contextmanager
    def gather(params):  # noqa: ANN001, ANN202
        calls.append(len(params))
        yield

    m = ema.update(head, momentum=momentum(0), gather=gather)
    assert m == pytest.approx(0.9) and calls == [len(head_before)]
    for pe, e0, h0 in zip(ema.ema.parameters(), ema_before, head_before, strict=True):
        assert torch.allclose(pe, 0.9 * e0 + 0.1 * h0)
    for p, h0 in zip(head.parameters(), head_before, strict=True):
        assert torch.equal(p, h0)
    for p, e0 in zip(encoder.parameters(), enc_before, strict=True):
        assert torch.equal(p, e0)
    assert all(not p.requires_grad for p in ema.parameters())
    # plain tensors path (e.g. gathered by the caller under ZeRO-3)
    ema_mid = [p.detach().clone() for p in ema.ema.parameters()]
    ema.update([p.detach() for p in head.parameters()], momentum=momentum(100))  # momentum 1.0 -> unchanged
    for pe, e0 in zip(ema.ema.parameters(), ema_mid, strict=True):
        assert torch.equal(pe, e0)
    with pytest.raises(ValueError, match="tensors"):
        ema.update([torch.zeros(1)], momentum=momentum(1))
    x = torch.randn(3, 8, requires_grad=True)
    assert not ema(x).requires_grad


def test_cosine_momentum_and_frozen_head() -> None:
    assert cosine(0, 10, 0.994, 1.0) == pytest.approx(0.994)
    assert cosine(5, 10, 0.994, 1.0) == pytest.approx(0.997)
    assert cosine(10, 10, 0.994, 1.0) == pytest.approx(1.0)
    fh = FrozenHead(build_head("linear", 4, 3))
    fh.train()
    assert not fh.training and not fh(torch.randn(2, 4, requires_grad=True)).requires_grad


# ----------------------------------------------------------------------------- bad configs
def test_bad_configs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("ibot+++")
    with pytest.raises(ValueError, match="unknown head"):
        build_head("dino2", 4, 4)
    with pytest.raises(ValueError, match="unknown feature loss"):
        PatchFeatureLoss("l1")
    with pytest.raises(ValueError, match="mismatched widths"):
        PatchFeatureLoss("cosine", student_dim=4, teacher_dim=6, adapter=None)
    with pytest.raises(ValueError, match="mismatched widths"):
        PatchFeatureLoss("cosine")(torch.randn(2, 3, 4), torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="prototypes"):
        PatchPrototypeLoss(8)(torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        MaskGenerator(1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        random_mask(2, (3, 3), -0.1)
    with pytest.raises(ValueError, match="unknown centering"):
        DINOLoss(4, centering="none")
    with pytest.raises(ValueError, match="both 0"):
        PatchPrototypeLoss(4, masked_weight=0.0, visible_weight=0.0)
