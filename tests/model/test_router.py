"""Router: logits per mode against a float64 recomputation from the parameters, top-k weights,
aux losses against a plain float64 loop over tokens, and what each routing mode listens to."""

from __future__ import annotations

import math
import random

import pytest
import torch

from moe_rec.model.router import Router, load_balancing_loss, router_z_loss
from tests.model.routers import make_router


@pytest.fixture
def seed() -> int:
    """A fresh seed per test run (printed on failure through the assertion messages)."""
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s


def _inputs(
    b: int = 3, t: int = 7, d: int = 16, domains: int = 3, users: int = 5
) -> tuple[torch.Tensor, ...]:
    x = torch.randn(b, t, d)
    domain_ids = torch.randint(0, domains, (b, t))
    user_ids = torch.randint(0, users, (b,))
    profile = torch.randn(b, t, d)
    return x, domain_ids, user_ids, profile


def _logits_float64(r: Router, x, domain_ids, user_ids, profile) -> torch.Tensor:
    """Logits recomputed from the parameters in float64, one signal at a time: (N, E)."""
    f64 = torch.float64
    out = x.to(f64) @ r.gate.weight.to(f64).T  # (B, T, E)
    if r.mode != "token":
        out = out + r.domain_embedding.weight.to(f64)[domain_ids] @ r.domain_proj.weight.to(f64).T
        out = out + r.domain_bias.to(f64)[domain_ids]
    if r.mode == "domain_user":
        out = out + (r.user_embedding.weight.to(f64)[user_ids] @ r.user_proj.weight.to(f64).T)[:, None]
        out = out + profile.to(f64) @ r.profile_proj.weight.to(f64).T
    return out.reshape(-1, r.num_experts)


@pytest.mark.parametrize("mode", ["token", "domain", "domain_user"])
@pytest.mark.parametrize("k", [1, 2, 6])
def test_logits_weights_indices_match_float64(seed: int, mode: str, k: int) -> None:
    r = make_router(mode, k=k)
    with torch.no_grad():
        if r.domain_bias is not None:
            r.domain_bias.normal_()
    x, domain_ids, user_ids, profile = _inputs()
    weights, indices, logits = r(x, domain_ids, user_ids, profile)
    ref = _logits_float64(r, x, domain_ids, user_ids, profile)
    # fp32 against float64: logits of order 5, fp32 rounding ~5e-7 (measured); the same below
    torch.testing.assert_close(logits, ref.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")
    assert weights.shape == indices.shape == (x.shape[0] * x.shape[1], k)
    assert weights.dtype == logits.dtype == torch.float32
    probs = torch.softmax(ref, dim=-1)  # (N, E) float64
    for n in range(probs.shape[0]):
        top = sorted(range(r.num_experts), key=lambda e: -probs[n, e].item())[:k]
        assert indices[n].tolist() == top, f"seed {seed}, token {n}"
        norm = sum(probs[n, e].item() for e in top)
        expected = [probs[n, e].item() / norm for e in top]
        assert weights[n].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6), f"seed {seed}"


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_losses_match_plain_float64_loop(seed: int, k: int) -> None:
    n_tok, e = 37, 5
    logits = torch.randn(n_tok, e) * 3
    indices = torch.topk(logits, k, dim=-1).indices  # (N, k)
    counts = [0] * e
    prob_sum = [0.0] * e
    lse_sq = 0.0
    for n in range(n_tok):
        row = [float(v) for v in logits[n]]
        m = max(row)
        z = sum(math.exp(v - m) for v in row)
        for j in range(e):
            prob_sum[j] += math.exp(row[j] - m) / z
        for j in indices[n].tolist():
            counts[j] += 1
        lse_sq += (m + math.log(z)) ** 2
    lb_ref = e * sum((counts[j] / (n_tok * k)) * (prob_sum[j] / n_tok) for j in range(e))
    z_ref = lse_sq / n_tok  # float64; the losses are fp32
    assert load_balancing_loss(logits, indices, e, k).item() == pytest.approx(lb_ref, rel=1e-5), (
        f"seed {seed}"
    )
    assert router_z_loss(logits).item() == pytest.approx(z_ref, rel=1e-5), f"seed {seed}"


def test_load_balancing_loss_is_one_when_uniform() -> None:
    e, k = 4, 2
    logits = torch.zeros(8, e)  # uniform probabilities
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert gets N*k/E slots
    assert load_balancing_loss(logits, indices, e, k).item() == pytest.approx(1.0)


def test_aux_losses_send_gradient_to_logits(seed: int) -> None:
    logits = torch.randn(10, 4, requires_grad=True)
    indices = torch.topk(logits.detach(), 2, dim=-1).indices
    (load_balancing_loss(logits, indices, 4, 2) + router_z_loss(logits)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0, f"seed {seed}"


def _routes_for_signal(r: Router, x_row: torch.Tensor, *, domains=None, users=None) -> list[list[int]]:
    """Expert choices for one hidden state repeated, varying only the domain or the user."""
    count = len(domains if domains is not None else users)
    x = x_row.expand(count, 1, -1)  # (count, 1, D): the same hidden state per row
    domain_ids = torch.tensor(domains if domains is not None else [0] * count)[:, None]  # (count, 1)
    user_ids = torch.tensor(users if users is not None else [0] * count)  # (count,)
    _, indices, _ = r(x, domain_ids, user_ids)
    return [sorted(row) for row in indices.tolist()]


def test_domain_mode_routes_same_hidden_state_by_domain() -> None:
    torch.manual_seed(0)
    r = make_router("domain", e=8, k=2, domains=4)
    x_row = torch.randn(16)
    routes = _routes_for_signal(r, x_row, domains=[0, 1, 2, 3])
    assert len({tuple(c) for c in routes}) > 1, routes
    with torch.no_grad():  # the per-domain bias alone can pin a service to its own experts
        r.domain_bias.copy_(torch.full((4, 8), -20.0))
        for d in range(4):
            r.domain_bias[d, 2 * d : 2 * d + 2] = 20.0
    assert _routes_for_signal(r, x_row, domains=[0, 1, 2, 3]) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_domain_user_mode_routes_same_hidden_state_by_user() -> None:
    torch.manual_seed(0)
    r = make_router("domain_user", e=8, k=2, domains=1, users=6)
    routes = _routes_for_signal(r, torch.randn(16), users=list(range(6)))
    assert len({tuple(c) for c in routes}) > 1, routes


def test_domain_user_profile_changes_logits(seed: int) -> None:
    r = make_router("domain_user")
    x, domain_ids, user_ids, profile = _inputs()
    without = r.logits(x, domain_ids, user_ids)
    with_profile = r.logits(x, domain_ids, user_ids, profile)
    assert not torch.allclose(without, with_profile), f"seed {seed}"


def test_token_mode_ignores_domain_and_user(seed: int) -> None:
    r = make_router("token")
    assert list(r.parameters()) == [r.gate.weight]
    x, domain_ids, user_ids, profile = _inputs()
    a = r(x, domain_ids, user_ids, profile)
    b = r(x, (domain_ids + 1) % 3, (user_ids + 1) % 5, torch.randn_like(profile))
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=0, atol=0, msg=lambda m: f"seed {seed}: {m}")


def test_domain_mode_ignores_user(seed: int) -> None:
    r = make_router("domain")
    x, domain_ids, user_ids, profile = _inputs()
    torch.testing.assert_close(
        r.logits(x, domain_ids, user_ids, profile), r.logits(x, domain_ids), rtol=0, atol=0
    )


def test_bf16_inputs_route_in_fp32(seed: int) -> None:
    r = make_router("domain_user")
    x, domain_ids, user_ids, profile = _inputs()
    x, profile = x.bfloat16(), profile.bfloat16()
    r_bf16 = make_router("domain_user")
    r_bf16.load_state_dict(r.state_dict())
    r_bf16.to(torch.bfloat16)
    weights, _, logits = r_bf16(x, domain_ids, user_ids, profile)
    assert weights.dtype == logits.dtype == torch.float32
    ref = _logits_float64(r_bf16, x, domain_ids, user_ids, profile)  # fp32 logits: fp32 rounding only
    torch.testing.assert_close(logits, ref.float(), rtol=1e-5, atol=1e-5, msg=lambda m: f"seed {seed}: {m}")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="domain_expert_bias"):
        Router(
            hidden_size=8,
            num_experts=4,
            top_k=2,
            mode="token",
            num_domains=2,
            num_user_buckets=0,
            signal_dim=4,
            domain_expert_bias=True,
        )
    with pytest.raises(ValueError, match="top_k"):
        Router(
            hidden_size=8,
            num_experts=4,
            top_k=5,
            mode="token",
            num_domains=2,
            num_user_buckets=0,
            signal_dim=4,
            domain_expert_bias=False,
        )
    with pytest.raises(ValueError, match="mode"):
        Router(
            hidden_size=8,
            num_experts=4,
            top_k=2,
            mode="user",
            num_domains=2,
            num_user_buckets=0,
            signal_dim=4,
            domain_expert_bias=False,
        )
    r = make_router("domain_user")
    x, domain_ids, _, _ = _inputs()
    with pytest.raises(ValueError, match="user_ids"):
        r(x, domain_ids)


@pytest.mark.parametrize("mode", ["token", "domain", "domain_user"])
@pytest.mark.parametrize("groups,e,k", [(2, 6, 2), (3, 6, 1), (3, 9, 3), (4, 8, 2)])
def test_expert_groups_route_each_service_within_its_group(seed: int, mode: str, groups, e, k) -> None:
    """With expert_groups G, a token of service d picks only experts e with e // (E / G) == d % G,
    and among them the same top-k as the ungrouped router's logits restricted to the group (a
    plain loop per token); weights still sum to 1 and gradients stay finite."""
    domains = 5  # more services than groups: service d shares group d % G
    r = Router(
        hidden_size=16, num_experts=e, top_k=k, mode=mode, num_domains=domains, num_user_buckets=5,
        signal_dim=8, domain_expert_bias=mode != "token", use_profile=mode == "domain_user",
        expert_groups=groups,
    )  # fmt: skip
    x, domain_ids, user_ids, profile = _inputs(domains=domains)
    x.requires_grad_(True)
    weights, indices, logits = r(x, domain_ids, user_ids, profile if mode == "domain_user" else None)
    free = _logits_float64(r, x.detach(), domain_ids, user_ids, profile if mode == "domain_user" else None)
    size = e // groups
    for n, d in enumerate(domain_ids.reshape(-1).tolist()):
        group = list(range((d % groups) * size, (d % groups + 1) * size))
        ranked = sorted(group, key=lambda j: -free[n, j].item())
        assert sorted(indices[n].tolist()) == sorted(ranked[:k]), (seed, n, d)
        outside = [j for j in range(e) if j not in group]
        assert all(math.isinf(logits[n, j].item()) for j in outside), (seed, n)
    assert torch.allclose(weights.sum(-1), torch.ones(len(weights))), seed
    loss = load_balancing_loss(logits, indices, e, k) + router_z_loss(logits) + (weights**2).sum()
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(x.grad).all()), seed


def test_expert_groups_must_split_the_experts() -> None:
    for e, k, g in [(6, 2, 4), (6, 3, 3), (4, 1, -1)]:
        with pytest.raises(ValueError, match="expert_groups"):
            Router(
                hidden_size=8, num_experts=e, top_k=k, mode="domain", num_domains=3,
                num_user_buckets=0, signal_dim=4, domain_expert_bias=True, expert_groups=g,
            )  # fmt: skip
