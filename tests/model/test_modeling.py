"""The decoder: save/load, Auto classes, KV cache and padding against full recomputation, loss,
parameter counts of the dense twin, and generate()."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from moe_rec.model import MoERecCache, MoERecConfig, MoERecForCausalLM, build_config, parameter_report

V, DOMAINS, USERS = 64, 3, 11


def _model(seed: int = 0, **overrides) -> MoERecForCausalLM:
    torch.manual_seed(seed)
    cfg = build_config("tiny", vocab_size=V, num_domains=DOMAINS, num_user_buckets=USERS, **overrides)
    model = MoERecForCausalLM(cfg).eval()
    with torch.no_grad():  # give the zero-initialised norms and domain biases some signal
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "domain_bias" in name:
                p.normal_(0, 0.3)
    return model


def _batch(b: int = 3, t: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, V, (b, t), generator=g)
    domains = torch.randint(0, DOMAINS, (b, t), generator=g)
    users = torch.randint(0, USERS, (b,), generator=g)
    return ids, domains, users


@pytest.mark.parametrize("mode", ["token", "domain", "domain_user"])
def test_save_load_round_trip_is_exact(tmp_path: Path, mode: str) -> None:
    model = _model(router_mode=mode, num_shared_experts=1, ffn_types=["moe", "dense"])
    ids, domains, users = _batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(back, MoERecForCausalLM)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MoERecConfig)
    sd, sd2 = model.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        assert torch.equal(model(ids, domains, users).logits, back(ids, domains, users).logits)
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()  # tied


@pytest.mark.parametrize("mode", ["domain", "domain_user"])
def test_kv_cache_matches_full_forward(mode: str) -> None:
    model = _model(router_mode=mode)
    ids, domains, users = _batch(t=10)
    with torch.no_grad():
        full = model(ids, domains, users).logits
        cache = MoERecCache()
        out = model(ids[:, :6], domains[:, :6], users, past_key_values=cache, use_cache=True)
        steps = [out.logits]
        for i in range(6, 10):
            out = model(
                ids[:, i : i + 1],
                domains[:, i : i + 1],
                users,
                past_key_values=out.kv_cache,
                use_cache=True,
            )
            steps.append(out.logits)
    # fp32 both: one token at a time over the cache sums in another order (measured <= 5e-7)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded() -> None:
    model = _model()
    ids, domains, users = _batch(b=2, t=8)
    pad = 3
    padded_ids = ids.clone()
    padded_ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        batch = model(padded_ids, domains, users, attention_mask=mask).logits
        alone = model(ids[1:, pad:], domains[1:, pad:], users[1:]).logits
    # fp32 both: masked keys add exact zeros, the longer rows change the blocking (measured 3e-8)
    torch.testing.assert_close(batch[1, pad:], alone[0], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(batch).all()


def test_padding_is_left_out_of_router_statistics() -> None:
    model = _model()
    ids, domains, users = _batch(b=2, t=8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, domains, users, attention_mask=mask)
    real = int(mask.sum())
    k = model.config.num_experts_per_tok
    assert out.expert_load.sum(dim=(1, 2)).tolist() == [real * k] * out.expert_load.shape[0]
    counts = torch.zeros(DOMAINS)
    for d in domains[mask.bool()].tolist():
        counts[d] += k
    torch.testing.assert_close(out.expert_load[0].sum(dim=1).float(), counts)


def test_expert_groups_give_each_service_its_own_experts() -> None:
    """With domain_expert_groups, a service's tokens land only on its group's experts (expert load
    by service, every layer); loss, router entropy and gradients stay finite although the other
    groups' router logits are -inf; a group too small for top-k is a config error."""
    model = _model(domain_expert_groups=2).train()  # tiny: 4 experts, top-2; services 0, 2 -> group 0
    ids, domains, users = _batch(b=4, t=10)
    out = model(ids, domains, users, labels=ids)
    size = model.config.num_experts // 2
    for d in range(DOMAINS):
        group = d % 2
        load = out.expert_load[:, d]  # (L_moe, E)
        assert int(load[:, group * size : (group + 1) * size].sum()) == 2 * int((domains == d).sum()) * len(
            load
        )
        assert int(load.sum()) == int(load[:, group * size : (group + 1) * size].sum())
    assert (
        bool(torch.isfinite(out.router_entropy).all())
        and float(out.router_entropy.max()) <= math.log(size) + 1e-5
    )
    out.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="domain_expert_groups"):
        build_config(
            "tiny", vocab_size=V, num_domains=DOMAINS, num_user_buckets=USERS, domain_expert_groups=3
        )


def test_loss_is_shifted_cross_entropy_plus_weighted_aux() -> None:
    model = _model()
    ids, domains, users = _batch()
    labels = ids.clone()
    labels[:, ::3] = -100
    out = model(ids, domains, users, labels=labels)
    logits = out.logits.double()
    terms = []  # plain loop: position t predicts token t+1
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if labels[b, t + 1] != -100:
                terms.append(-F.log_softmax(logits[b, t], dim=-1)[labels[b, t + 1]])
    # the model's fp32 cross-entropy against float64 over the same logits: fp32 rounding only
    assert out.lm_loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)
    cfg = model.config
    expected_aux = cfg.router_aux_loss_coef * out.load_balancing_loss + cfg.router_z_loss_coef * out.z_loss
    # the same fp32 terms added in another order
    assert out.loss.item() == pytest.approx((out.lm_loss + expected_aux).item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" in n)


def test_hidden_dropout_acts_in_training_only(tmp_path: Path) -> None:
    ids, domains, users = _batch(seed=int(torch.seed() % 2**31))
    plain, dropped = _model(), _model(hidden_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        reference = plain(ids, domains, users).logits
        torch.testing.assert_close(dropped(ids, domains, users).logits, reference)  # eval: no dropout
        plain.train(), dropped.train()
        torch.testing.assert_close(plain(ids, domains, users).logits, reference)  # p = 0: nothing dropped
        outs = []
        for _ in range(2):
            torch.manual_seed(7)
            outs.append(dropped(ids, domains, users).logits)
    assert not torch.allclose(outs[0], reference, atol=1e-3)  # half the units dropped: far beyond rounding
    torch.testing.assert_close(outs[0], outs[1])  # the same seed drops the same units
    dropped.save_pretrained(tmp_path)
    assert MoERecConfig.from_pretrained(tmp_path).hidden_dropout == 0.5


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_backends_agree_in_the_model(padded: bool) -> None:
    """grouped_mm against the loop reference: logits of the real tokens and the loss with its router
    terms, which leave padding out (fp32 both, only the summation order differs)."""
    ref = _model(moe_backend="loop")
    fast = _model(moe_backend="grouped_mm")
    fast.load_state_dict(ref.state_dict())
    ids, domains, users = _batch()
    mask = torch.ones_like(ids)
    if padded:  # left padding of a random length per row, as a batch of requests has
        g = torch.Generator().manual_seed(2)
        for row, n in enumerate(torch.randint(1, ids.shape[1] - 1, (ids.shape[0],), generator=g).tolist()):
            mask[row, :n] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        got, want = (m(ids, domains, users, attention_mask=mask, labels=labels) for m in (fast, ref))
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.expert_load, want.expert_load, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["token", "domain", "domain_user"])
def test_dense_twin_has_equal_active_parameters(mode: str) -> None:
    cfg = build_config("tiny", vocab_size=V, num_domains=DOMAINS, num_user_buckets=USERS, num_shared_experts=1,
                       router_mode=mode)  # fmt: skip
    moe, dense = MoERecForCausalLM(cfg), MoERecForCausalLM(cfg.dense_twin())
    moe_report, dense_report = parameter_report(moe), parameter_report(dense)
    assert dense_report["active_per_token"] == dense_report["total"]
    # hand count of what one token reads in one router: gate, plus one row of each table and its projection
    d, f, e, k, s = (
        cfg.hidden_size,
        cfg.moe_intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.router_signal_dim,
    )
    router = (
        d * e
        + (s + s * e + e if mode != "token" else 0)
        + (s + s * e + d * e if mode == "domain_user" else 0)
    )
    assert moe_report["active_per_token"] - cfg.num_hidden_layers * router == dense_report["total"]
    # experts a token skips: E - k experts of D*2F + F*D per layer, plus the unread table rows
    tables = (DOMAINS - 1) * (s + e) if mode != "token" else 0
    tables += (USERS - 1) * s if mode == "domain_user" else 0
    skipped = cfg.num_hidden_layers * ((e - k) * 3 * d * f + tables)
    assert moe_report["total"] - moe_report["active_per_token"] == skipped


def test_routing_inputs_are_checked() -> None:
    model = _model(router_mode="domain_user")
    ids, domains, users = _batch()
    with pytest.raises(ValueError, match="user_ids"):
        model(ids, domains)
    with pytest.raises(ValueError, match="domain_ids"):
        model(ids, domains[:, :-1], users)
    with pytest.raises(ValueError, match="ffn_types"):
        build_config("tiny", ffn_types=["moe"])
    with pytest.raises(ValueError, match="router_mode"):
        build_config("tiny", router_mode="users")


def test_generate_greedy_matches_manual_loop() -> None:
    model = _model(router_mode="domain_user")
    ids, domains, users = _batch(b=2, t=5)
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids, domain_ids=domains, user_ids=users, max_new_tokens=4, do_sample=False, num_beams=1,
            attention_mask=torch.ones_like(ids), pad_token_id=0,
        )  # fmt: skip
        seq, dom = ids, domains
        for _ in range(4):  # no cache: full recomputation each step
            nxt = model(seq, dom, users).logits[:, -1].argmax(-1, keepdim=True)
            seq, dom = torch.cat([seq, nxt], 1), torch.cat([dom, dom[:, -1:]], 1)
    assert torch.equal(gen, seq)


def test_generate_beam_search_with_profile_cache_runs() -> None:
    model = _model(router_mode="domain_user")
    ids, domains, users = _batch(b=2, t=5)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, domain_ids=domains, user_ids=users, max_new_tokens=3, num_beams=3, do_sample=False,
            attention_mask=torch.ones_like(ids), pad_token_id=0, num_return_sequences=3,
        )  # fmt: skip
    assert out.shape == (6, 8)
    assert torch.equal(out[:, :5], ids.repeat_interleave(3, dim=0))


def test_pad_embedding_starts_at_zero() -> None:
    """[PAD]'s row starts at zero (the normal init would give it a random vector); the item-level
    model, whose positions are bags of tokens with [PAD] filling, also keeps it there
    (tests/model/test_item_model.py)."""
    model = _model(seed=int(torch.randint(1000, (1,))))
    assert not model.model.embed_tokens.weight[model.config.pad_token_id].any()
    assert model.model.embed_tokens.weight[model.config.pad_token_id + 1].any()
