"""The Gemma-style decoder with mixture-of-experts feed-forward layers, as a ``transformers`` model.

Contents, top to bottom: RMSNorm (Gemma's ``1 + w`` scale), rotary positions, grouped-query
attention through ``scaled_dot_product_attention``, the decoder layer (MoE or dense FFN), the
running user profile used by the router, :class:`MoERecModel` and :class:`MoERecForCausalLM`.

Routing inputs are explicit ``forward`` arguments: ``domain_ids (B, T)`` — the service of each
token's event — and ``user_ids (B,)`` — hashed user buckets. The KV cache is a
``transformers.DynamicCache`` (:class:`MoERecCache` also carries the profile state when the
router reads it), so ``generate`` works with it; our beam search prefills with one and then
continues with a :class:`BeamCache`, whose beams share their prompt's keys (:mod:`moe_rec.model.cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ModelOutput

from moe_rec.model.cache import BeamCache, KVCache, MoERecCache, ProfileState, shared_prefix_attention
from moe_rec.model.config import MoERecConfig
from moe_rec.model.moe import GatedFeedForward, MoEAux, MoEFeedForward
from moe_rec.model.router import Router

# transformers 5.24 renamed every model's ``past_key_values`` to ``cache``: in outputs (``generate``
# reads ``outputs["cache"]``) and in the kwargs ``generate`` hands ``prepare_inputs_for_generation``.
# Our outputs carry the cache under the name of the installed version (read it as ``out.kv_cache``);
# our ``forward`` keeps taking ``past_key_values``.
CACHE_FIELD = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x / rms(x) * (1 + w)`` computed in fp32, ``w`` initialised to zero."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, head_dim) for rotate-half rotary embeddings (computed in fp32)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by cos/sin (B, T, hd)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention: ``H`` query heads share ``H_kv`` key/value heads."""

    def __init__(self, config: MoERecConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.dropout = config.attention_dropout
        d, hd = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps) if config.use_qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps) if config.use_qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        """x (B, T, D); mask (B, 1, T, S) bool (True = attend) or None for plain causal."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if isinstance(cache, BeamCache):  # beams share their prompt's keys: no per-beam copy of them
            out = shared_prefix_attention(q, *cache.append(k, v, self.layer_idx), mask, self.scale)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, Hkv, S, hd)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and t > 1,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )  # (B, H, T, hd)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm attention + FFN (mixture of experts or dense), optional Gemma 2/3 post-norms."""

    def __init__(self, config: MoERecConfig, layer_idx: int) -> None:
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.is_moe = config.ffn_types[layer_idx] == "moe"
        self.input_norm = RMSNorm(d, eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attn_norm = RMSNorm(d, eps) if config.use_post_norms else None
        self.pre_ffn_norm = RMSNorm(d, eps)
        self.post_ffn_norm = RMSNorm(d, eps) if config.use_post_norms else None
        self.dropout = nn.Dropout(config.hidden_dropout)  # before each residual add
        if self.is_moe:
            router = Router(
                hidden_size=d,
                num_experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                mode=config.router_mode,
                num_domains=config.num_domains,
                num_user_buckets=config.num_user_buckets,
                signal_dim=config.router_signal_dim,
                domain_expert_bias=config.domain_expert_bias and config.router_mode != "token",
                use_profile=config.router_mode == "domain_user" and config.router_use_profile,
                expert_groups=config.domain_expert_groups,
            )
            self.mlp: nn.Module = MoEFeedForward(
                hidden_size=d,
                intermediate_size=config.moe_intermediate_size,
                num_experts=config.num_experts,
                top_k=config.num_experts_per_tok,
                router=router,
                num_shared_experts=config.num_shared_experts,
                shared_intermediate_size=config.shared_intermediate_size,
                backend=config.moe_backend,
            )
        else:
            self.mlp = GatedFeedForward(hidden_size=d, intermediate_size=config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        domain_ids: torch.Tensor,
        user_ids: torch.Tensor | None,
        profile: torch.Tensor | None,
        token_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, MoEAux | None]:
        h = self.self_attn(self.input_norm(x), cos, sin, mask, cache)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + self.dropout(h)
        h = self.pre_ffn_norm(x)
        aux = None
        if self.is_moe:
            h, aux = self.mlp(h, domain_ids, user_ids, profile, token_mask)
        else:
            h = self.mlp(h)
        if self.post_ffn_norm is not None:
            h = self.post_ffn_norm(h)
        return x + self.dropout(h), aux


def running_profile(embeds: torch.Tensor, token_mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Causal running mean of the history's (non-pad) embeddings: position t sees tokens <= t.

    Args:
        embeds: (B, T, D) input embeddings.
        token_mask: (B, T) 1 for real tokens, 0 for padding.
        cache: when it carries a :class:`ProfileState`, the sums of earlier steps are read and updated.

    Returns:
        (B, T, D) profile vectors, in the embeddings' dtype.
    """
    m = token_mask[..., None].float()  # (B, T, 1)
    csum = torch.cumsum(embeds.float() * m, dim=1)  # (B, T, D)
    ccount = torch.cumsum(m, dim=1)  # (B, T, 1)
    if isinstance(cache, ProfileState):
        if cache.profile_sum is not None:
            csum = csum + cache.profile_sum[:, None]
            ccount = ccount + cache.profile_count[:, None]
        cache.profile_sum, cache.profile_count = csum[:, -1], ccount[:, -1]
    return (csum / ccount.clamp_min(1.0)).to(embeds.dtype)


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor | None:
    """(B, 1, T, S) boolean mask (True = attend): causal and key padding. ``None`` when plain causal
    attention from position 0 suffices (SDPA's ``is_causal`` fast path). A query always sees
    itself, so padded query rows stay finite."""
    if attention_mask is None and past_len == 0:
        return None
    s = past_len + q_len
    q_pos = torch.arange(past_len, s, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, s)  # (B, 1, T, S)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, :s].bool()
    return mask | (k_pos == q_pos)[None, None]


@dataclass
class MoERecOutput(ModelOutput):
    """``loss`` = ``lm_loss`` + ``aux_loss``; router statistics per MoE layer for monitoring."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    if CACHE_FIELD == "cache":
        cache: KVCache | None = None
    else:
        past_key_values: KVCache | None = None
    lm_loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None  # the item-level model's narrative loss (part of lm_loss)
    aux_loss: torch.Tensor | None = None
    load_balancing_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # (L_moe, num_domains, E) token counts
    router_entropy: torch.Tensor | None = None  # (L_moe,)
    hidden_states: torch.Tensor | None = None

    @property
    def kv_cache(self) -> KVCache | None:
        """The cache to pass back as ``past_key_values`` (whatever transformers calls the field)."""
        return getattr(self, CACHE_FIELD)


def router_stats(auxes: list[MoEAux], config: MoERecConfig) -> dict[str, torch.Tensor]:
    """The :class:`MoERecOutput` fields of the MoE layers' statistics (none without MoE layers):
    summed load-balancing and z losses, their weighted sum ``aux_loss``, expert load, entropy."""
    if not auxes:
        return {}
    lb = torch.stack([a.load_balancing_loss for a in auxes]).sum()
    z = torch.stack([a.z_loss for a in auxes]).sum()
    return {
        "load_balancing_loss": lb,
        "z_loss": z,
        "aux_loss": config.router_aux_loss_coef * lb + config.router_z_loss_coef * z,
        "expert_load": torch.stack([a.expert_load for a in auxes]),
        "router_entropy": torch.stack([a.router_entropy for a in auxes]),
    }


class MoERecPreTrainedModel(PreTrainedModel):
    config_class = MoERecConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            init.zeros_(module.weight)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None:  # [PAD] adds nothing (its row gets no gradient either)
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, MoEFeedForward):  # stacked expert weights
            init.normal_(module.w_gate_up, mean=0.0, std=std)
            init.normal_(module.w_down, mean=0.0, std=std)
        elif isinstance(module, Router) and module.domain_bias is not None:
            init.zeros_(module.domain_bias)  # no service prefers an expert before training


class MoERecModel(MoERecPreTrainedModel):
    """Embeddings (scaled by sqrt(D), as in Gemma) -> decoder layers -> final norm."""

    def __init__(self, config: MoERecConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        domain_ids: torch.LongTensor,
        user_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache | None, list[MoEAux]]:
        """Returns hidden states (B, T, D), the cache, and one :class:`MoEAux` per MoE layer.

        ``inputs_embeds`` (B, T, D), already scaled, replaces ``input_ids``: the item-level model
        composes one vector per event from its tokens (:mod:`moe_rec.model.item_model`).
        """
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        b, t = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
        if domain_ids.shape != (b, t):
            raise ValueError(f"domain_ids {tuple(domain_ids.shape)} must be (B, T) = {(b, t)}")
        if cfg.router_mode == "domain_user" and user_ids is None:
            raise ValueError("router_mode 'domain_user' needs user_ids (B,) hashed user buckets")
        if use_cache and past_key_values is None:
            past_key_values = MoERecCache()
        cache = past_key_values if use_cache or past_key_values is not None else None
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, past_len : past_len + t]
            else:
                position_ids = torch.arange(past_len, past_len + t, device=domain_ids.device)[None].expand(
                    b, t
                )
        if inputs_embeds is None:
            x = self.embed_tokens(input_ids) * math.sqrt(cfg.hidden_size)  # (B, T, D)
        else:
            x = inputs_embeds
        token_mask = (
            attention_mask[:, past_len : past_len + t] if attention_mask is not None else None
        )  # (B, T)
        profile = None
        if cfg.router_mode == "domain_user" and cfg.router_use_profile:
            profile = running_profile(
                x.detach(), token_mask if token_mask is not None else torch.ones_like(domain_ids), cache
            )
        x = self.embed_dropout(x)
        rotary = {theta: rotary_cos_sin(position_ids, cfg.head_dim, theta) for theta in set(cfg.rope_thetas)}
        mask = attention_mask_4d(attention_mask, b, t, past_len, domain_ids.device)
        auxes = []
        for layer, theta in zip(self.layers, cfg.rope_thetas):
            x, aux = layer(x, *rotary[theta], mask, cache, domain_ids, user_ids, profile, token_mask)
            if aux is not None:
                auxes.append(aux)
        return self.norm(x), cache, auxes


class MoERecForCausalLM(MoERecPreTrainedModel, GenerationMixin):
    """Next-token decoder over the semantic-ID vocabulary with a tied output head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoERecConfig) -> None:
        super().__init__(config)
        self.model = MoERecModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        domain_ids: torch.LongTensor,
        user_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MoERecOutput:
        """Args:
        input_ids: (B, T) token ids.
        domain_ids: (B, T) service index of each token.
        user_ids: (B,) hashed user buckets (needed by ``router_mode='domain_user'``).
        attention_mask: (B, S) 1 for real tokens, 0 for padding (S includes cached tokens).
        labels: (B, T) targets aligned with ``input_ids`` (shifted inside); -100 is ignored.
        logits_to_keep: compute logits for only the last this-many positions (0 = all).
        """
        hidden, cache, auxes = self.model(
            input_ids,
            domain_ids,
            user_ids=user_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=bool(use_cache),
        )
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # (B, T', V)
        out = MoERecOutput(logits=logits, **{CACHE_FIELD: cache}, **router_stats(auxes, self.config))
        if labels is not None:
            shift_logits = logits[:, :-1].float()
            out.lm_loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
            )
            out.loss = out.lm_loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        domain_ids: torch.LongTensor | None = None,
        user_ids: torch.LongTensor | None = None,
        cache: KVCache | None = None,
        **kwargs,
    ) -> dict:
        """For ``generate``: feed only new tokens; a generated token takes the domain of the last
        given token (the service token of the requested item). ``generate`` passes the cache as
        ``past_key_values`` before transformers 5.24 and as ``cache`` from then on."""
        if cache is not None:
            past_key_values = cache
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_len == 0 and not isinstance(past_key_values, MoERecCache):
            past_key_values = MoERecCache()  # generate() adopts the cache our forward returns
        if domain_ids is None:
            raise ValueError("generate(...) needs domain_ids=(B, T) for the prompt")
        if domain_ids.shape[1] < input_ids.shape[1]:
            extra = domain_ids[:, -1:].expand(-1, input_ids.shape[1] - domain_ids.shape[1])
            domain_ids = torch.cat([domain_ids, extra], dim=1)
        return {
            "input_ids": input_ids[:, past_len:],
            "domain_ids": domain_ids[:, past_len : input_ids.shape[1]],
            "user_ids": user_ids,
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": True,
        }


AutoModelForCausalLM.register(MoERecConfig, MoERecForCausalLM, exist_ok=True)  # model_type moe_rec


def parameter_report(model: MoERecForCausalLM) -> dict[str, int]:
    """Total parameters and parameters active per token: everything but the experts a token is not
    routed to and the rows of the router's domain / user tables it does not read (the tied
    output head counted once, as the embedding it shares)."""
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.model.layers:
        if not layer.is_moe:
            continue
        mlp = layer.mlp
        inactive += (mlp.w_gate_up[0].numel() + mlp.w_down[0].numel()) * (
            cfg.num_experts - cfg.num_experts_per_tok
        )
        router = mlp.router
        for table in (router.domain_embedding, router.user_embedding):
            if table is not None:
                inactive += table.weight[1:].numel()
        if router.domain_bias is not None:
            inactive += router.domain_bias[1:].numel()
    return {
        "total": total,
        "active_per_token": total - inactive,
        "embedding": model.model.embed_tokens.weight.numel(),
    }
