"""KV caches for decoding, and attention over the beam-search cache.

* :class:`MoERecCache` — a ``transformers.DynamicCache`` that also carries the router's running
  profile (:class:`ProfileState`); what ``generate`` and every prefill use.
* :class:`BeamCache` — the cache of constrained beam search after its prefill. The ``W`` beams of
  a prompt share the prompt's keys and values, so those are kept once per prompt, ``(B, Hkv, T, hd)``,
  and only the few generated tokens are kept per beam, in buffers allocated once,
  ``(B*W, Hkv, max_new_tokens, hd)``. Reordering beams then moves only generated tokens (a parent
  beam always belongs to the same prompt), where a ``DynamicCache`` copies ``W`` copies of every
  prompt twice per step (reorder, then append).
* :func:`shared_prefix_attention` — attention of the beams' queries over that split cache: one
  softmax over prompt and generated keys, the prompt's keys read once per prompt instead of once
  per beam. ``scaled_dot_product_attention`` over the concatenated keys is the reference it is
  tested against.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class ProfileState:
    """The router's running profile of a history: sum ``(N, D)`` and count ``(N, 1)`` of its token
    embeddings (fp32), ``None`` until the first forward pass that reads it."""

    profile_sum: torch.Tensor | None = None
    profile_count: torch.Tensor | None = None

    def _select_profile(self, index: torch.Tensor) -> None:
        """Keep the profile rows ``index`` (beam reorder / expansion)."""
        if self.profile_sum is not None:
            self.profile_sum = self.profile_sum.index_select(0, index.to(self.profile_sum.device))
            self.profile_count = self.profile_count.index_select(0, index.to(self.profile_count.device))

    def _repeat_profile(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (one copy per beam)."""
        if self.profile_sum is not None:
            self.profile_sum = self.profile_sum.repeat_interleave(repeats, dim=0)
            self.profile_count = self.profile_count.repeat_interleave(repeats, dim=0)


class MoERecCache(DynamicCache, ProfileState):
    """A ``DynamicCache`` that also keeps the router's running profile, reordered with the beams like
    the keys and values."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_profile(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._repeat_profile(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.profile_sum is not None:
            self.profile_sum = self.profile_sum[indices]
            self.profile_count = self.profile_count[indices]


class BeamCache(ProfileState):
    """Beam-search cache: prompt keys/values once per prompt, generated ones per beam.

    Rows are beams, prompt-major: row ``b * W + j`` is beam ``j`` of prompt ``b``.

    Args:
        prompts: the cache of the prefill over the ``B`` prompts (every layer filled, same length).
        beams: ``W``, beams per prompt; each starts as a copy of its prompt (profile included).
        max_new_tokens: how many tokens will be appended after the prompt.
    """

    def __init__(self, prompts: MoERecCache, beams: int, max_new_tokens: int) -> None:
        if not prompts.layers or prompts.get_seq_length() == 0:
            raise ValueError("BeamCache needs the cache of a prefill (no layer holds keys)")
        self.prefix_keys = [layer.keys for layer in prompts.layers]  # (B, Hkv, T, hd) per layer
        self.prefix_values = [layer.values for layer in prompts.layers]
        b, hkv, t, hd = self.prefix_keys[0].shape
        self.beams, self.prefix_len, self.max_new_tokens = beams, t, max_new_tokens
        self.new_keys = [k.new_empty(b * beams, hkv, max_new_tokens, hd) for k in self.prefix_keys]
        self.new_values = [v.new_empty(b * beams, hkv, max_new_tokens, hd) for v in self.prefix_values]
        self.lengths = [0] * len(self.prefix_keys)  # generated tokens held, per layer
        self.profile_sum, self.profile_count = prompts.profile_sum, prompts.profile_count
        self._repeat_profile(beams)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_len + self.lengths[layer_idx]

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens' ``keys``/``values`` ``(B*W, Hkv, t, hd)`` of one layer.

        Returns:
            the prompt's keys and values ``(B, Hkv, T, hd)`` and the beams' generated keys and
            values so far ``(B*W, Hkv, s, hd)``, the new tokens included.
        """
        n, t = self.lengths[layer_idx], keys.shape[2]
        if n + t > self.max_new_tokens:
            raise ValueError(f"BeamCache holds {self.max_new_tokens} new tokens; {n + t} were appended")
        self.new_keys[layer_idx][:, :, n : n + t] = keys
        self.new_values[layer_idx][:, :, n : n + t] = values
        self.lengths[layer_idx] = n + t
        return (
            self.prefix_keys[layer_idx],
            self.prefix_values[layer_idx],
            self.new_keys[layer_idx][:, :, : n + t],
            self.new_values[layer_idx][:, :, : n + t],
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]`` (a beam of the same prompt): only generated
        tokens and the profile move."""
        for layer, n in enumerate(self.lengths):
            self.new_keys[layer][:, :, :n] = self.new_keys[layer][beam_idx, :, :n]
            self.new_values[layer][:, :, :n] = self.new_values[layer][beam_idx, :, :n]
        self._select_profile(beam_idx)


def shared_prefix_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Softmax attention of every beam over its prompt's keys and its own generated keys.

    Args:
        q: (B*W, H, t, hd) queries of the new tokens, beams prompt-major.
        prefix_k, prefix_v: (B, Hkv, T, hd), shared by the ``W`` beams of each prompt.
        new_k, new_v: (B*W, Hkv, s, hd), per beam (the new tokens' own included).
        mask: (B*W, 1, t, T + s) bool, True = attend (padding and causality), or None.
        scale: multiplier of the dot products.

    Returns:
        (B*W, H, t, hd) in ``q``'s dtype; scores and softmax in fp32.
    """
    bw, h, t, hd = q.shape
    b, hkv, prefix_len, _ = prefix_k.shape
    w, g = bw // b, h // hkv
    qf = q.float().view(b, w, hkv, g, t, hd)
    s_prefix = torch.einsum("bwkgqd,bktd->bwkgqt", qf, prefix_k.float()).reshape(bw, h, t, prefix_len)
    s_new = torch.einsum("nkgqd,nksd->nkgqs", qf.view(bw, hkv, g, t, hd), new_k.float()).reshape(bw, h, t, -1)
    scores = torch.cat([s_prefix, s_new], dim=-1) * scale  # (B*W, H, t, T+s)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    p_prefix = p[..., :prefix_len].reshape(b, w, hkv, g, t, prefix_len)
    p_new = p[..., prefix_len:].reshape(bw, hkv, g, t, -1)
    out = torch.einsum("bwkgqt,bktd->bwkgqd", p_prefix, prefix_v.float()).reshape(bw, h, t, hd)
    out = out + torch.einsum("nkgqs,nksd->nkgqd", p_new, new_v.float()).reshape(bw, h, t, hd)
    return out.to(q.dtype)


KVCache = DynamicCache | BeamCache  # what the model's forward accepts as ``past_key_values``
