"""MoE layer: the ``grouped_mm`` backend against the fp32 ``loop`` reference (output, input grad,
every parameter grad incl. the router's) over fresh random inputs and uneven / zero-token routing,
bf16 against the fp32 reference, aux statistics against plain counts, and the GPU backends
(marked ``gpu``, skipped without CUDA)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from moe_rec.model.moe import GatedFeedForward, MoEFeedForward, _contiguous_grad, routed_experts
from moe_rec.model.router import Router
from tests.model.routers import make_router

# fp32 vs fp32: only the summation order differs (per-expert GEMMs vs grouped GEMMs, gather/add).
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
# bf16 vs the fp32 reference on the same bf16-representable values: error relative to the largest
# magnitude of the reference tensor (bf16 keeps 8 significant bits, eps = 2**-8 = 0.0039).
BF16_REL_TOL = 3e-2


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run; every assertion message carries it so a failure can be replayed."""
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _layer(
    *,
    d: int,
    f: int,
    e: int,
    k: int,
    mode: str = "token",
    domains: int = 3,
    users: int = 5,
    shared: int = 0,
    backend: str = "grouped_mm",
) -> MoEFeedForward:
    router = make_router(mode, d=d, e=e, k=k, domains=domains, users=users)
    return MoEFeedForward(
        hidden_size=d,
        intermediate_size=f,
        num_experts=e,
        top_k=k,
        router=router,
        num_shared_experts=shared,
        shared_intermediate_size=8 if shared else None,
        backend=backend,
    )


def _twin(layer: MoEFeedForward, backend: str, **kwargs) -> MoEFeedForward:
    """The same layer (same weights) with another backend."""
    twin = _layer(backend=backend, **kwargs)
    twin.load_state_dict(layer.state_dict())
    return twin


def _run(layer: MoEFeedForward, x, domain_ids, user_ids, profile, grad_out, token_mask=None):
    """Forward + backward of ``sum(out * grad_out) + aux losses``; returns out, aux, grads by name."""
    x = x.detach().clone().requires_grad_(True)
    out, aux = layer(x, domain_ids, user_ids, profile, token_mask)
    loss = (out.float() * grad_out).sum() + aux.load_balancing_loss + aux.z_loss
    loss.backward()
    grads = {"x": x.grad} | {name: p.grad for name, p in layer.named_parameters()}
    return out, aux, grads


# (d, f, e, k, mode, shared): top_k = 1, top_k = E, every routing mode, shared experts, and sizes
# that are not 16-byte aligned (the grouped_mm path zero-pads them).
CASES = [
    (16, 24, 4, 2, "token", 0),
    (32, 16, 8, 1, "domain", 0),
    (16, 8, 4, 4, "domain_user", 1),
    (24, 32, 6, 3, "domain_user", 2),
    (6, 10, 3, 2, "token", 0),
    (12, 6, 5, 2, "domain", 1),
]


def _inputs(d: int, domains: int = 3, users: int = 5, b: int = 3, t: int = 11):
    x = torch.randn(b, t, d)
    domain_ids = torch.randint(0, domains, (b, t))
    user_ids = torch.randint(0, users, (b,))
    profile = torch.randn(b, t, d)
    return x, domain_ids, user_ids, profile


def _token_mask(b: int, t: int, masked: bool, device: torch.device | None = None) -> torch.Tensor | None:
    """(B, T) padding at random places (every row keeps its last token), or None when not ``masked``."""
    if not masked:
        return None
    mask = (torch.rand(b, t, device=device) > 0.3).long()
    mask[:, -1] = 1
    return mask


def _assert_parity(ref, got, seed: int, *, rel: float | None = None) -> None:
    """Outputs and every gradient agree: FP32_TOL, or ``rel`` x max|ref| when given (bf16)."""
    (out_r, aux_r, grads_r), (out_g, aux_g, grads_g) = ref, got
    pairs = [("out", out_r, out_g)] + [(n, grads_r[n], grads_g[n]) for n in grads_r]
    for name, a, b in pairs:
        assert b is not None and a is not None, f"seed {seed}: {name} has no gradient"
        if rel is None:
            torch.testing.assert_close(b, a, **FP32_TOL, msg=lambda m, n=name: f"seed {seed}, {n}: {m}")
        else:
            err = (b.float() - a.float()).abs().max().item()
            scale = a.float().abs().max().item()
            assert err <= rel * scale, f"seed {seed}, {name}: max err {err:.3g} > {rel} x {scale:.3g}"
    torch.testing.assert_close(aux_g.expert_load, aux_r.expert_load, rtol=0, atol=0)


@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize(("d", "f", "e", "k", "mode", "shared"), CASES)
def test_grouped_mm_matches_loop_fp32(
    seed: int, d: int, f: int, e: int, k: int, mode: str, shared: int, masked: bool
) -> None:
    """With padding (``token_mask``) the aux losses and statistics leave the padded tokens out, on
    both paths alike."""
    kwargs = dict(d=d, f=f, e=e, k=k, mode=mode, shared=shared)
    loop = _layer(backend="loop", **kwargs)
    grouped = _twin(loop, "grouped_mm", **kwargs)
    inputs = _inputs(d)
    b, t = inputs[0].shape[:2]
    mask = _token_mask(b, t, masked)
    grad_out = torch.randn(*inputs[0].shape)
    ref, got = _run(loop, *inputs, grad_out, mask), _run(grouped, *inputs, grad_out, mask)
    _assert_parity(ref, got, seed)
    real = b * t if mask is None else mask.sum()
    assert got[1].expert_load.sum() == real * k, f"seed {seed}: padding counted in the expert load"


@pytest.mark.parametrize("k", [1, 2])
def test_uneven_routing_with_empty_experts(seed: int, k: int) -> None:
    """A router biased onto experts 0..2 leaves experts 3..5 with zero tokens; both paths agree."""
    kwargs = dict(d=16, f=16, e=6, k=k, mode="domain", shared=0)
    loop = _layer(backend="loop", **kwargs)
    with torch.no_grad():
        loop.router.domain_bias[:, 3:] = -30.0
        loop.router.domain_bias[0, 0] = 5.0  # service 0 piles onto expert 0
        loop.router.domain_bias[1, 1] = 5.0  # service 1 onto expert 1: two experts surely carry tokens
    grouped = _twin(loop, "grouped_mm", **kwargs)
    inputs = _inputs(16)
    grad_out = torch.randn(*inputs[0].shape)
    ref, got = _run(loop, *inputs, grad_out), _run(grouped, *inputs, grad_out)
    load = got[1].expert_load
    assert load[:, 3:].sum() == 0 and load[:, :3].sum(0).gt(0).sum() >= 2, f"seed {seed}: {load}"
    _assert_parity(ref, got, seed)
    assert got[2]["w_gate_up"][3:].abs().sum() == 0  # unused experts get exactly zero gradient


@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
def test_bf16_grouped_mm_matches_fp32_loop(seed: int, masked: bool) -> None:
    """bf16 grouped_mm (CPU) against the fp32 reference on the same bf16-representable values."""
    kwargs = dict(d=32, f=48, e=6, k=2, mode="domain_user", shared=1)
    loop = _layer(backend="loop", **kwargs)
    with torch.no_grad():
        for p in loop.parameters():
            p.copy_(p.bfloat16().float())
    grouped = _twin(loop, "grouped_mm", **kwargs).to(torch.bfloat16)
    x, domain_ids, user_ids, profile = _inputs(32, b=4, t=16)
    x, profile = x.bfloat16(), profile.bfloat16()
    grad_out = torch.randn(*x.shape)
    mask = _token_mask(*x.shape[:2], masked)
    ref = _run(loop, x.float(), domain_ids, user_ids, profile.float(), grad_out, mask)
    got = _run(grouped, x, domain_ids, user_ids, profile, grad_out, mask)
    assert got[0].dtype == torch.bfloat16 and got[2]["w_down"].dtype == torch.bfloat16
    _assert_parity(ref, got, seed, rel=BF16_REL_TOL)


def test_loop_reference_matches_dense_formula(seed: int) -> None:
    """The reference itself, token by token: sum_j w_j * GeGLU_{e_j}(x) in float64."""
    n, d, f, e, k = 9, 8, 12, 4, 2
    x = torch.randn(n, d)
    w_gate_up, w_down = torch.randn(e, d, 2 * f), torch.randn(e, f, d)
    weights, indices = torch.rand(n, k), torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    out = routed_experts(x, weights, indices, w_gate_up, w_down, backend="loop")
    x64, wgu, wd = x.double(), w_gate_up.double(), w_down.double()
    for t in range(n):
        ref = sum(
            weights[t, j].double()
            * (F.gelu(x64[t] @ wgu[i, :, :f], approximate="tanh") * (x64[t] @ wgu[i, :, f:]))
            @ wd[i]
            for j, i in enumerate(indices[t].tolist())
        )
        # fp32 against float64 on outputs up to ~100, where one fp32 rounding is ~1e-5 (measured 2e-5)
        torch.testing.assert_close(
            out[t].double(), ref, rtol=1e-5, atol=1e-4, msg=lambda m: f"seed {seed}: {m}"
        )


def test_aux_statistics_match_plain_counts(seed: int) -> None:
    domains, e, k = 4, 5, 2
    layer = _layer(d=16, f=8, e=e, k=k, mode="domain", domains=domains)
    x, domain_ids, user_ids, _ = _inputs(16, domains=domains)
    _, aux = layer(x, domain_ids, user_ids)
    _, indices, logits = layer.router(x, domain_ids, user_ids)
    n_tok = x.shape[0] * x.shape[1]
    counts = [[0] * e for _ in range(domains)]
    for dom, chosen in zip(domain_ids.reshape(-1).tolist(), indices.tolist(), strict=True):
        for i in chosen:
            counts[dom][i] += 1
    assert aux.expert_load.tolist() == counts, f"seed {seed}"
    assert aux.expert_load.sum().item() == n_tok * k
    assert not aux.expert_load.requires_grad and not aux.router_entropy.requires_grad
    entropy = 0.0
    for row in logits.double():
        p = torch.softmax(row, dim=0).tolist()
        entropy -= sum(q * math.log(q) for q in p if q > 0)
    # fp32 softmax and mean against float64
    assert aux.router_entropy.item() == pytest.approx(entropy / n_tok, rel=1e-5), f"seed {seed}"
    assert aux.load_balancing_loss.requires_grad and aux.z_loss.requires_grad


def test_shared_expert_is_added(seed: int) -> None:
    layer = _layer(d=16, f=8, e=4, k=2, shared=2)
    plain = _layer(d=16, f=8, e=4, k=2)
    plain.load_state_dict({n: v for n, v in layer.state_dict().items() if not n.startswith("shared_expert.")})
    x, domain_ids, _, _ = _inputs(16)
    assert layer.shared_expert is not None and layer.shared_expert.up_proj.out_features == 2 * 8
    expected = plain(x, domain_ids)[0] + layer.shared_expert(x)
    torch.testing.assert_close(layer(x, domain_ids)[0], expected, **FP32_TOL)


def test_gated_feed_forward_is_gemma_geglu(seed: int) -> None:
    ffn = GatedFeedForward(hidden_size=8, intermediate_size=12)
    x = torch.randn(2, 3, 8)
    gate, up, down = ffn.gate_proj.weight, ffn.up_proj.weight, ffn.down_proj.weight
    expected = (F.gelu(x @ gate.T, approximate="tanh") * (x @ up.T)) @ down.T
    torch.testing.assert_close(ffn(x), expected)


def test_contiguous_grad_guard_for_grouped_mm(seed: int) -> None:
    """grouped_mm's backward rejects a transposed gradient; the guard makes it contiguous."""
    offs = torch.tensor([3, 3, 10], dtype=torch.int32)
    a, b = torch.randn(10, 8, requires_grad=True), torch.randn(3, 8, 4, requires_grad=True)
    grad = torch.randn(4, 10).T  # (10, 4), non-contiguous
    with pytest.raises(RuntimeError):
        F.grouped_mm(a, b, offs=offs).backward(grad)
    _contiguous_grad(F.grouped_mm(a, b, offs=offs)).backward(grad)
    assert a.grad is not None and b.grad is not None


def test_invalid_arguments() -> None:
    router = Router(
        hidden_size=8,
        num_experts=4,
        top_k=2,
        mode="token",
        num_domains=1,
        num_user_buckets=0,
        signal_dim=4,
        domain_expert_bias=False,
    )
    with pytest.raises(ValueError, match="does not match"):
        MoEFeedForward(hidden_size=8, intermediate_size=8, num_experts=8, top_k=2, router=router)
    with pytest.raises(ValueError, match="unknown MoE backend"):
        MoEFeedForward(
            hidden_size=8, intermediate_size=8, num_experts=4, top_k=2, router=router, backend="triton"
        )


def test_megablocks_missing_says_how_to_install() -> None:
    try:
        import megablocks  # noqa: F401

        pytest.skip("megablocks is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install -e \.\[megablocks\]"):
        _layer(d=8, f=8, e=4, k=2, backend="megablocks")


def _gpu_parity(backend: str, cuda: torch.device, seed: int, masked: bool) -> None:
    """``backend`` in bf16 on the GPU against the fp32 loop reference on the same values."""
    kwargs = dict(d=256, f=512, e=8, k=2, mode="domain_user", shared=1)
    loop = _layer(backend="loop", **kwargs).to(cuda)
    with torch.no_grad():
        for p in loop.parameters():
            p.copy_(p.bfloat16().float())
    fast = _twin(loop, backend, **kwargs).to(cuda, torch.bfloat16)
    x, domain_ids, user_ids, profile = (t.to(cuda) for t in _inputs(256, b=8, t=128))
    x, profile = x.bfloat16(), profile.bfloat16()
    grad_out = torch.randn(*x.shape, device=cuda)
    mask = _token_mask(*x.shape[:2], masked, cuda)
    ref = _run(loop, x.float(), domain_ids, user_ids, profile.float(), grad_out, mask)
    got = _run(fast, x, domain_ids, user_ids, profile, grad_out, mask)
    _assert_parity(ref, got, seed, rel=BF16_REL_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
def test_gpu_bf16_grouped_mm_matches_fp32_loop(cuda: torch.device, seed: int, masked: bool) -> None:
    _gpu_parity("grouped_mm", cuda, seed, masked)


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True], ids=["unpadded", "padded"])
def test_gpu_megablocks_matches_fp32_loop(cuda: torch.device, seed: int, masked: bool) -> None:
    pytest.importorskip("megablocks")
    _gpu_parity("megablocks", cuda, seed, masked)
