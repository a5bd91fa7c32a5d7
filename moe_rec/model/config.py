"""``MoERecConfig``: the decoder's hyper-parameters, a ``transformers`` config.

Sizes are named (:data:`SIZES`, built by :func:`build_config`) so experiments say
``model.size: small`` instead of twenty numbers. Every layer is a mixture of experts unless
``ffn_types`` marks it ``dense``; the shared-bottom baseline is the all-dense twin with the same
active parameters per token (:meth:`MoERecConfig.dense_twin`).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from moe_rec.model.choices import MODEL_SIZES, MOE_BACKENDS, ROUTER_MODES, ModelSize, MoEBackend, RouterMode


class MoERecConfig(PretrainedConfig):
    model_type = "moe_rec"
    # the output's cache field: past_key_values before transformers 5.24, cache from then on
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 1024,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 1,
        head_dim: int = 64,
        intermediate_size: int = 1024,  # dense FFN width (dense layers, shared expert default)
        moe_intermediate_size: int = 512,  # width of each routed expert
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        num_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,  # default: moe_intermediate_size
        ffn_types: list[str] | None = None,  # "moe" | "dense" per layer; default all "moe"
        router_mode: RouterMode = "domain_user",  # one of choices.ROUTER_MODES
        num_domains: int = 8,  # services the router and domain embedding know (vocab service slots)
        num_user_buckets: int = 4096,  # hashed user buckets for the user routing signal
        router_signal_dim: int = 32,  # size of the domain / user embeddings the router reads
        domain_expert_bias: bool = True,  # learned per-domain bias over experts
        domain_expert_groups: int = 0,  # >0: hard routing, service d uses expert group d % this only
        router_use_profile: bool = True,  # domain_user: also a causal running mean of the history
        router_aux_loss_coef: float = 0.01,
        router_z_loss_coef: float = 0.001,
        moe_backend: MoEBackend = "grouped_mm",  # one of choices.MOE_BACKENDS
        use_post_norms: bool = False,  # Gemma 2/3 sandwich norms around attention and FFN
        use_qk_norm: bool = False,  # Gemma 3 RMSNorm on queries and keys
        query_pre_attn_scalar: float | None = None,  # attention scale 1/sqrt(this); default head_dim
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rope_thetas: list[float] | None = None,  # per-layer rotary base (Gemma 3); default rope_theta
        rms_norm_eps: float = 1e-6,
        attention_dropout: float = 0.0,
        hidden_dropout: float = 0.0,  # on the embeddings and on each attention / FFN output (training only)
        initializer_range: float = 0.02,
        pad_token_id: int = 0,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        sid_token_offset: int = 0,  # first id of our vocabulary (after an upcycled LM's text tokens)
        # item-level model (moe_rec.model.item_model): the token id range [start, stop) of each code
        # position of an item (L levels, then dedup); its heads score those rows of the embedding
        code_token_ranges: list[list[int]] | None = None,
        item_head_temperature: float = 0.07,  # cosine-similarity code logits are divided by this
        service_heads: bool = False,  # + per service a learned change of the code heads' projections
        # (zero at the start: every service starts from the shared heads, weight decay pulls it back)
        service_codes: bool = False,  # + per service a learned change of every code's embedding, in its
        # events' input and in the heads' code rows (zero at the start, as service_heads)
        # codes: cross-entropy of each code of the next item (RPG); items: one softmax over every item
        # of the next item's service, an item's logit the mean of its codes' logits (ranks as at test)
        item_loss: str = "codes",
        item_loss_balance: str = "positions",  # item_loss=items: positions: every scored position counts
        # once (a service weighs by its share of the positions); services: each service asked in a step
        # counts once (the mean of its positions' losses), however few positions it has
        item_embedding: bool = False,  # item_loss=items: + a per-item vector (zero at start; cold items
        # keep zero) added to the item's input positions and dotted with the query for its score
        num_items: int = 0,  # rows of that per-item table: the SID table's items (set from it)
        item_negatives: int = 0,  # item_loss=items: > 0 samples this many items per service (uniformly) per
        # step instead of normalising over the whole catalogue (a sampled softmax; 0: every item)
        item_text: bool = False,  # item_embedding: + a learned projection of the item's (frozen) text
        # embedding in its per-item vector, so an item unseen in training still has one
        item_text_dim: int = 0,  # width of those text embeddings (set from the SID stage's encoder)
        service_text: bool = False,  # item_text: + per service a learned change of that projection (zero at
        # the start), for services whose texts differ (titles against keywords)
        item_text_prior: bool = False,  # item_text: + w x cos(text of the position's own item, text of
        # the candidate), w learned (0 for the own item itself: "more like the last item, not it again")
        item_text_prior_by_service: bool = False,  # item_text_prior: one w per asked service (services
        # whose text differs, titles against keywords, may want different weights) instead of one
        item_text_prior_same_service: bool = True,  # item_text_prior: the "last item" is the last one of
        # the asked service at or before the position (in a history of several services the position's
        # own item may be of another); False: the position's own item, whatever its service
        text_token_range: list[int] | None = None,  # item-level model with text: the subword tokens'
        # [start, stop); a text head (tied to those rows and [EOS]) writes narratives
        text_loss_weight: float = 1.0,  # the narrative loss's weight beside the item loss
        critique_plain_weight: float = 0.0,  # ranking a request with a critique: + this many times its
        # scores without the critique (a product of the two distributions: the critique's reading,
        # tempered by what the model knows of the user; moe_rec.eval.exact.request_parts)
        narrative_copy: bool = False,  # item_embedding with text_token_range: the text head adds, per
        # field f, c_f(h_t) to the logit of every subword of the explained item's field f (the item
        # at or before t; the item words' table of item_words), so a narrative can name the brand,
        # category and band of the item it is about
        narrative_history_copy: bool = False,  # narrative_copy: + per field f h_f(h_t) times the share of
        # the history's items (the explained item's service, before it) whose field f holds each
        # subword, so the taste line can name the user's own categories and brands
        item_vector_dropout: float = 0.0,  # item_embedding: in training, each item's learned vector is
        # left out with this probability per forward (its text part stays), so items also learn to
        # rank without one, as items unseen in training must (the cold-start benchmark)
        item_words: bool = False,  # item_embedding with text_token_range: at a critique's last word, + the
        # critique's words matched to each item's words (brand, leaf category, price band, title:
        # moe_rec.data.item_words) through the shared embeddings, each word weighted in its context
        item_word_slots: int = 0,  # subwords per field of that table (set from the data)
        item_words_input: bool = False,  # item_words: + the mean of an item's field vectors in its input
        item_phrases: bool = False,  # item_words: + at a critique's last word, each item field (brand,
        # leaf category, price band) whose whole subword sequence occurs in the critique (the longest
        # match only), weighted by the decoder at the match's end and at the critique's end
        item_phrase_rank: int = 16,  # item_phrases: width of the (critique end, match end) bilinear weight
        item_terms: bool = False,  # item_phrases: + each item's distinctive title terms and colour word
        # (what a critique names as terms or colour) as phrases of a fourth field, matched whole
        item_term_shape: list[int] | None = None,  # (terms per item, subwords per term) of that table (set
        # from the data)
        critique_field_query: bool = False,  # item_words: + at a critique's words W_f h_t against each
        # item's unit field-f vector (the decoder at the critique's end asks for a field directly, e.g.
        # a band below the previous item's for "anything cheaper?")
        critique_previous: bool = False,  # item_phrases: + at a critique's words g_f(h_t) for each item whose
        # field f (brand, category, band) is the previous item's (of the asked service): "not that
        # brand again" without reading the brand's name
        critique_named_previous: bool = False,  # item_phrases: a matched phrase that the previous item
        # holds gets d_f(h_s) more (h_s at the match's end): naming the previous item's brand or
        # category asks to leave it whatever the wording, naming another asks for it
        critique_relative_scale: float = 1.0,  # the critique_previous and item_price_bins terms times this
        # (their weights start at zero and, under Adam, grow about as fast whatever the scale: a larger
        # one lets them reach a larger term in as many steps)
        item_price_bins: int = 0,  # item_words: Q > 0 adds each item's price as a one-hot over Q quantile
        # bins of its service's prices (items without a price: zeros), and at a critique's words a query
        # over the bins from the decoder and the previous item's bin (of the asked service): "cheaper
        # than the item before" as one dot product
        item_amounts: bool = False,  # item_words: + the same for each item's size (a log grid of amounts
        # and counts, size words by rank: moe_rec.data.item_words.size_bin) and pack count, against the
        # previous item's of the same kind: "a bigger bottle", "a smaller pack"
        ordinal_word_votes: bool = False,  # item_price_bins / item_amounts: the bins' weights at a
        # critique's word t are the sum of the decoder's weights at every word s <= t of the critique
        # (each word votes in its context, as item_words' a_f(h_s)), not those at t alone: "bigger"
        # is read where it is written (demo: size critiques .56 against .44, docs/critiques.md)
        critique_loss_weight: float = 1.0,  # item_loss=items with text tokens: the item loss of a position
        # that reads a critique (its token is a critique's last word) counts this many times (the other
        # positions unchanged): a critique sample has one such position, a plain window dozens of others
        distill_weight: float = 1.0,  # item_loss=items, in a batch with teacher targets
        # (moe_rec.train.distill): the item loss plus this times the KL from the teacher's distribution
        # over its top K items to the model's over the same K, at each position the teacher scored
        distill_over: str = "teacher_items",  # the model's distribution in that KL: "teacher_items" its
        # softmax over the teacher's K items (their order only), "catalogue" its softmax over the item
        # loss's candidates (the catalogue, or with item_negatives the drawn items) and the K, read at
        # the K (also how much of its mass they hold: the KL of "teacher_items" plus -log of that mass)
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.num_shared_experts = num_shared_experts
        self.shared_intermediate_size = shared_intermediate_size or moe_intermediate_size
        self.ffn_types = list(ffn_types) if ffn_types is not None else ["moe"] * num_hidden_layers
        self.router_mode = router_mode
        self.num_domains = num_domains
        self.num_user_buckets = num_user_buckets
        self.router_signal_dim = router_signal_dim
        self.domain_expert_bias = domain_expert_bias
        self.domain_expert_groups = domain_expert_groups
        self.router_use_profile = router_use_profile
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.moe_backend = moe_backend
        self.use_post_norms = use_post_norms
        self.use_qk_norm = use_qk_norm
        self.query_pre_attn_scalar = query_pre_attn_scalar
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_thetas = list(rope_thetas) if rope_thetas is not None else [rope_theta] * num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.attention_dropout = attention_dropout
        self.hidden_dropout = hidden_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.sid_token_offset = sid_token_offset
        self.code_token_ranges = [list(map(int, r)) for r in code_token_ranges] if code_token_ranges else None
        self.item_head_temperature = item_head_temperature
        self.service_heads = service_heads
        self.service_codes = service_codes
        self.item_loss = item_loss
        self.item_loss_balance = item_loss_balance
        self.item_negatives = item_negatives
        self.item_embedding = item_embedding
        self.num_items = num_items
        self.item_text = item_text
        self.item_text_dim = item_text_dim
        self.service_text = service_text
        self.item_text_prior = item_text_prior
        self.item_text_prior_by_service = item_text_prior_by_service
        self.item_text_prior_same_service = item_text_prior_same_service
        self.item_vector_dropout = item_vector_dropout
        self.item_words = item_words
        self.item_word_slots = item_word_slots
        self.item_words_input = item_words_input
        self.item_phrases = item_phrases
        self.item_terms = item_terms
        self.item_term_shape = list(item_term_shape) if item_term_shape else None
        self.item_phrase_rank = item_phrase_rank
        self.critique_field_query = critique_field_query
        self.item_price_bins = item_price_bins
        self.item_amounts = item_amounts
        self.ordinal_word_votes = ordinal_word_votes
        self.critique_previous = critique_previous
        self.critique_named_previous = critique_named_previous
        self.critique_relative_scale = critique_relative_scale
        self.critique_loss_weight = critique_loss_weight
        self.distill_weight = distill_weight
        self.distill_over = distill_over
        self.text_token_range = [int(x) for x in text_token_range] if text_token_range else None
        self.text_loss_weight = text_loss_weight
        self.narrative_copy = narrative_copy
        self.narrative_history_copy = narrative_history_copy
        self.critique_plain_weight = critique_plain_weight
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        if len(self.ffn_types) != self.num_hidden_layers:
            raise ValueError(
                f"ffn_types has {len(self.ffn_types)} entries for {self.num_hidden_layers} layers"
            )
        if len(self.rope_thetas) != self.num_hidden_layers:
            raise ValueError(
                f"rope_thetas has {len(self.rope_thetas)} entries for {self.num_hidden_layers} layers"
            )
        if bad := sorted(set(self.ffn_types) - {"moe", "dense"}):
            raise ValueError(f"ffn_types: unknown {bad}; use 'moe' or 'dense'")
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"router_mode {self.router_mode!r} not in {ROUTER_MODES}")
        if self.moe_backend not in MOE_BACKENDS:
            raise ValueError(f"moe_backend {self.moe_backend!r} not in {MOE_BACKENDS}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, {self.num_experts}]"
            )
        g = self.domain_expert_groups
        if g < 0 or (g and (self.num_experts % g or self.num_experts // g < self.num_experts_per_tok)):
            raise ValueError(
                f"domain_expert_groups={g} must split num_experts={self.num_experts} into equal groups "
                f"of at least num_experts_per_tok={self.num_experts_per_tok} experts (or be 0)"
            )
        for name in ("service_heads", "service_codes"):
            if getattr(self, name) and self.code_token_ranges is None:
                raise ValueError(f"{name} needs the item-level model (model.kind: item)")
        if self.code_token_ranges is not None:
            bad = [
                r for r in self.code_token_ranges if len(r) != 2 or not 0 <= r[0] < r[1] <= self.vocab_size
            ]
            if bad:
                raise ValueError(
                    f"code_token_ranges {bad} are not [start, stop) ranges inside the vocabulary"
                )
            if self.item_loss not in ("codes", "items"):
                raise ValueError(f"item_loss {self.item_loss!r} not in ('codes', 'items')")
            if self.item_loss_balance not in ("positions", "services"):
                raise ValueError(
                    f"item_loss_balance {self.item_loss_balance!r} not in ('positions', 'services')"
                )
            if self.item_loss_balance == "services" and self.item_loss != "items":
                raise ValueError("item_loss_balance='services' needs item_loss='items'")
            if self.item_embedding and (self.item_loss != "items" or self.num_items < 1):
                raise ValueError(
                    "item_embedding needs item_loss='items' and num_items >= 1 (the catalogue's size)"
                )
            if self.item_text and (not self.item_embedding or self.item_text_dim < 1):
                raise ValueError(
                    "item_text needs item_embedding and item_text_dim >= 1 (the text embeddings' width)"
                )
            if self.service_text and not self.item_text:
                raise ValueError("service_text needs item_text (the projection it changes per service)")
            if self.item_text_prior and not self.item_text:
                raise ValueError("item_text_prior needs item_text (the text embeddings it compares)")
            if self.item_text_prior_by_service and not self.item_text_prior:
                raise ValueError("item_text_prior_by_service needs item_text_prior")
            if self.item_negatives < 0:
                raise ValueError(f"item_negatives must be >= 0, got {self.item_negatives}")
            r = self.text_token_range
            if r is not None and (len(r) != 2 or not 0 <= r[0] < r[1] <= self.vocab_size):
                raise ValueError(f"text_token_range {r} is not a [start, stop) range inside the vocabulary")
            if self.item_vector_dropout and not (self.item_embedding and 0 < self.item_vector_dropout < 1):
                raise ValueError(
                    f"item_vector_dropout {self.item_vector_dropout} needs item_embedding and a value in [0, 1)"
                )
            if self.item_words and not (self.item_embedding and r is not None and self.item_word_slots >= 1):
                raise ValueError(
                    "item_words needs item_embedding, text_token_range (sequences with critiques) and "
                    "item_word_slots >= 1"
                )
            if self.item_words_input and not self.item_words:
                raise ValueError("item_words_input needs item_words (the item word vectors it adds)")
            if self.critique_plain_weight and not (self.critique_plain_weight > 0 and r is not None):
                raise ValueError(
                    f"critique_plain_weight {self.critique_plain_weight} needs a value >= 0 and "
                    "text_token_range (sequences with critiques)"
                )
            if self.narrative_copy and not (
                self.item_embedding and r is not None and self.item_word_slots >= 1
            ):
                raise ValueError(
                    "narrative_copy needs item_embedding, text_token_range (sequences with critiques and "
                    "narratives) and item_word_slots >= 1 (the explained item's words it copies)"
                )
            if self.narrative_history_copy and not self.narrative_copy:
                raise ValueError("narrative_history_copy needs narrative_copy (the copy path it extends)")
            if self.critique_field_query and not self.item_words:
                raise ValueError("critique_field_query needs item_words (the field vectors it meets)")
            if self.item_price_bins and not (self.item_words and self.item_price_bins >= 2):
                raise ValueError("item_price_bins needs item_words (critique positions) and at least 2 bins")
            if self.item_amounts and not self.item_words:
                raise ValueError("item_amounts needs item_words (critique positions)")
            if self.ordinal_word_votes and not (self.item_price_bins or self.item_amounts):
                raise ValueError(
                    "ordinal_word_votes needs item_price_bins or item_amounts (the bins it weighs)"
                )
            for name in ("critique_previous", "critique_named_previous"):
                if getattr(self, name) and not self.item_phrases:
                    raise ValueError(f"{name} needs item_phrases (the phrases it weights)")
            if self.item_terms and not (
                self.item_phrases and self.item_term_shape and min(self.item_term_shape) >= 1
            ):
                raise ValueError(
                    "item_terms needs item_phrases (the matching it joins) and item_term_shape "
                    f"(terms per item, subwords per term; got {self.item_term_shape})"
                )
            if self.item_phrases and not (self.item_words and self.item_phrase_rank >= 0):
                raise ValueError(
                    "item_phrases needs item_words (the fields it matches) and item_phrase_rank >= 0"
                )
            if self.critique_loss_weight != 1.0 and not (
                self.critique_loss_weight > 0 and self.item_loss == "items" and r is not None
            ):
                raise ValueError(
                    f"critique_loss_weight {self.critique_loss_weight} needs a value > 0, item_loss='items' "
                    "and text_token_range (sequences with critiques)"
                )
            if self.distill_weight < 0:
                raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
            if self.distill_over not in ("teacher_items", "catalogue"):
                raise ValueError(
                    f"distill_over must be 'teacher_items' or 'catalogue', got {self.distill_over!r}"
                )
            if self.item_head_temperature <= 0:
                raise ValueError(f"item_head_temperature must be > 0, got {self.item_head_temperature}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict[str, Any]:
        """A saved config (a checkpoint's or a bundle's; every load from a file comes here), with
        what a config saved before a field existed meant by its absence: a text prior saved without
        ``item_text_prior_same_service`` read the position's own item (before December 5), so the
        model scores as it was trained."""
        d = super()._dict_from_json_file(json_file)
        if d.get("item_text_prior") and "item_text_prior_same_service" not in d:
            d["item_text_prior_same_service"] = False
        return d

    def dense_twin(self) -> MoERecConfig:
        """The shared-bottom baseline: every layer dense, FFN width = the MoE layer's active width
        (top-k routed experts + shared experts), so active parameters per token match."""
        d = self.to_dict()
        d["ffn_types"] = ["dense"] * self.num_hidden_layers
        d["intermediate_size"] = (
            self.num_experts_per_tok * self.moe_intermediate_size
            + self.num_shared_experts * self.shared_intermediate_size
        )
        for key in ("model_type", "transformers_version", "architectures"):
            d.pop(key, None)
        return MoERecConfig(**d)


AutoConfig.register("moe_rec", MoERecConfig, exist_ok=True)  # model_type moe_rec

SIZES: dict[ModelSize, dict[str, int]] = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 intermediate_size=256, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                  intermediate_size=1024, moe_intermediate_size=512, num_experts=8, num_experts_per_tok=2),
    "base": dict(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4, head_dim=64,
                 intermediate_size=3072, moe_intermediate_size=1536, num_experts=16, num_experts_per_tok=2),
}  # fmt: skip


def build_config(size: ModelSize, **overrides: Any) -> MoERecConfig:
    """A named size (one of :data:`~moe_rec.model.choices.MODEL_SIZES`) with field overrides."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {list(MODEL_SIZES)}")
    return MoERecConfig(**{**SIZES[size], **overrides})
