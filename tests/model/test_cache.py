"""The beam-search cache: shared-prefix attention against SDPA over each beam's full keys, and the
model stepping beams with a BeamCache against the same steps with a per-beam MoERecCache."""

import pytest
import torch
import torch.nn.functional as F

from moe_rec.model import MoERecCache
from moe_rec.model.cache import BeamCache, shared_prefix_attention
from tests.model.test_modeling import DOMAINS, USERS, V, _model


def _reference(q, prefix_k, prefix_v, new_k, new_v, mask, scale):
    """SDPA over every beam's own copy of its prompt's keys followed by its generated keys."""
    w = q.shape[0] // prefix_k.shape[0]
    k = torch.cat([prefix_k.repeat_interleave(w, 0), new_k], 2)
    v = torch.cat([prefix_v.repeat_interleave(w, 0), new_v], 2)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@pytest.mark.parametrize(
    "b, w, h, hkv, t, prefix_len, s, seed",
    [(1, 1, 2, 1, 1, 5, 1, 0), (3, 4, 4, 2, 1, 9, 2, 1), (2, 5, 4, 4, 2, 7, 3, 2), (4, 3, 6, 2, 1, 16, 3, 3)],
)
def test_shared_prefix_attention_matches_sdpa(b, w, h, hkv, t, prefix_len, s, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    hd = 8
    q = torch.randn(b * w, h, t, hd, generator=g)
    prefix_k, prefix_v = torch.randn(2, b, hkv, prefix_len, hd, generator=g)
    new_k, new_v = torch.randn(2, b * w, hkv, s, hd, generator=g)
    mask = torch.rand(b * w, 1, t, prefix_len + s, generator=g) > 0.3  # padding-like holes
    mask[..., -1] = True  # every query sees at least its own key
    got = shared_prefix_attention(q, prefix_k, prefix_v, new_k, new_v, mask, 0.35)
    want = _reference(q, prefix_k, prefix_v, new_k, new_v, mask, 0.35)
    # fp32 both: only the summation order differs (prefix and new keys as two blocks); measured <= 5e-7
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    bf16 = [x.bfloat16() for x in (q, prefix_k, prefix_v, new_k, new_v)]
    got16 = shared_prefix_attention(*bf16, mask, 0.35)
    assert got16.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (eps 2**-8): inputs and output rounded to it leave an error of
    # about one eps of the largest output (measured 0.8 to 1.35 eps over these cases); allow 4
    torch.testing.assert_close(got16.float(), want, rtol=0, atol=4 * 2**-8 * want.abs().max().item())


@pytest.mark.parametrize("mode, seed", [("token", 0), ("domain", 1), ("domain_user", 2), ("domain_user", 3)])
def test_beam_steps_match_a_per_beam_dynamic_cache(mode: str, seed: int) -> None:
    b, w, t, steps = 3, 4, 7, 3
    model = _model(seed, router_mode=mode)
    g = torch.Generator().manual_seed(seed + 100)
    ids = torch.randint(8, V, (b, t), generator=g)
    domains = torch.randint(0, DOMAINS, (b, t), generator=g)
    users = torch.randint(0, USERS, (b,), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded prompt
    beam_users, beam_mask = users.repeat_interleave(w), mask.repeat_interleave(w, 0)
    with torch.no_grad():

        def prefill() -> MoERecCache:
            return model(
                ids, domains, users, attention_mask=mask, past_key_values=MoERecCache(), use_cache=True
            ).kv_cache

        reference = prefill()
        reference.batch_repeat_interleave(w)  # W full copies of each prompt
        beams = BeamCache(prefill(), w, max_new_tokens=steps)
        for step in range(steps):
            if step:  # shuffle beams within each prompt, as beam search does
                parent = (torch.arange(b)[:, None] * w + torch.randint(0, w, (b, w), generator=g)).reshape(-1)
                reference.reorder_cache(parent)
                beams.reorder_cache(parent)
            token = torch.randint(8, V, (b * w, 1), generator=g)
            domain = torch.randint(0, DOMAINS, (b * w, 1), generator=g)
            beam_mask = torch.cat([beam_mask, beam_mask.new_ones(b * w, 1)], 1)
            want = model(
                token, domain, beam_users, attention_mask=beam_mask, past_key_values=reference, use_cache=True
            )
            got = model(
                token, domain, beam_users, attention_mask=beam_mask, past_key_values=beams, use_cache=True
            )
            # fp32 both: the shared-prefix cache sums in another order (measured <= 3e-7)
            torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
            assert beams.get_seq_length() == reference.get_seq_length() == t + step + 1


def test_beam_cache_refuses_an_empty_prefill_and_overflow() -> None:
    with pytest.raises(ValueError, match="prefill"):
        BeamCache(MoERecCache(), 2, max_new_tokens=1)
    model = _model(0, router_mode="token")
    ids = torch.randint(8, V, (2, 4))
    with torch.no_grad():
        out = model(ids, torch.zeros_like(ids), past_key_values=MoERecCache(), use_cache=True)
        beams = BeamCache(out.kv_cache, 2, max_new_tokens=1)
        step = torch.randint(8, V, (4, 1))
        model(step, torch.zeros_like(step), past_key_values=beams, use_cache=True)
        with pytest.raises(ValueError, match="holds 1 new tokens"):
            model(step, torch.zeros_like(step), past_key_values=beams, use_cache=True)
