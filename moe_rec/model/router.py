"""Mixture-of-experts router that reads the token, its service (domain) and its user.

One :class:`Router` per MoE layer turns each token into router logits over the experts, then picks
the top ``k`` (softmax in fp32, top-k, renormalised over the chosen ``k``, as in Mixtral). What
the logits see depends on ``mode``:

* ``token`` — the token's hidden state only (a plain MoE; domain and user ids are ignored).
* ``domain`` — the hidden state plus a learned embedding of the token's service projected onto
  the experts; with ``domain_expert_bias`` also a learned bias over experts per service, so an
  expert can become a specialist for one service (the bias moves that service's tokens toward it
  whatever their content) while the hidden-state term still routes by content.
* ``domain_user`` — all of ``domain`` plus the user: an embedding of the user's hashed bucket and,
  when the caller passes one, a profile vector per token (the model passes a causal running mean
  of the history's embeddings) projected onto the experts.

With ``expert_groups`` G > 0, in any mode, routing by service is hard: the experts are split into G
equal groups and a token of service d may only choose experts of group ``d % G`` (the others'
logits are -inf), so each service has experts of its own while attention and embeddings stay
shared. A joint model of G services then has G times the expert parameters of one service's
model at the same active parameters per token.

Every term is a linear map onto the ``E`` expert logits, so the logits are
``W_h h + W_d e_domain + b_domain + W_u e_user + W_p profile`` — the same as one linear layer over
the concatenated signals. Logits are computed in fp32 whatever the activation dtype, so a bf16
model routes as its fp32 reference does on the same values.

The auxiliary losses are pure functions of the router's outputs: :func:`load_balancing_loss`
(Switch Transformer / Mixtral) and :func:`router_z_loss` (ST-MoE); the model weights them by its
config coefficients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.model.choices import ROUTER_MODES, RouterMode


class Router(nn.Module):
    """Top-k router over ``num_experts`` experts, conditioned on token, domain and user.

    Args:
        hidden_size: D, size of the hidden states (and of the optional profile vectors).
        num_experts: E, number of routed experts.
        top_k: k, experts per token (1 <= k <= E).
        mode: which signals the logits read: ``token``, ``domain`` or ``domain_user``.
        num_domains: number of services; domain ids lie in ``[0, num_domains)``. Also sizes the
            per-service expert-load statistics, so it is required in every mode.
        num_user_buckets: number of hashed user buckets (``domain_user`` only).
        signal_dim: size of the domain and user embeddings (``domain`` / ``domain_user``).
        domain_expert_bias: add a learned ``(num_domains, E)`` bias to the logits, so experts can
            specialise per service (``domain`` / ``domain_user`` only).
        use_profile: ``domain_user`` only: also read a per-token profile vector (B, T, D).
        expert_groups: G > 0: a token of service d routes within expert group ``d % G`` only
            (``num_experts`` must split into G groups of at least ``top_k``); 0: any expert.

    With ``top_k=1`` the renormalised weight is always 1, so the main loss gives the router no
    gradient; it then learns through the auxiliary losses only.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        mode: RouterMode,
        num_domains: int,
        num_user_buckets: int,
        signal_dim: int,
        domain_expert_bias: bool,
        use_profile: bool = False,
        expert_groups: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ROUTER_MODES:
            raise ValueError(f"mode {mode!r} not in {ROUTER_MODES}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if num_domains < 1:
            raise ValueError(f"num_domains={num_domains} must be >= 1")
        if mode == "token" and domain_expert_bias:
            raise ValueError("domain_expert_bias needs mode 'domain' or 'domain_user'")
        if mode == "domain_user" and num_user_buckets < 1:
            raise ValueError(f"num_user_buckets={num_user_buckets} must be >= 1 in mode 'domain_user'")
        if expert_groups < 0 or (
            expert_groups and (num_experts % expert_groups or num_experts // expert_groups < top_k)
        ):
            raise ValueError(
                f"expert_groups={expert_groups} must split num_experts={num_experts} into equal "
                f"groups of at least top_k={top_k} experts (or be 0)"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.mode = mode
        self.num_domains = num_domains

        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.expert_groups = expert_groups
        # (num_domains, E) which experts each service may choose (all with no groups)
        group = torch.arange(num_experts) // max(num_experts // max(expert_groups, 1), 1)
        allowed = group[None, :] == (torch.arange(num_domains) % max(expert_groups, 1))[:, None]
        self.register_buffer("allowed", allowed if expert_groups else None, persistent=False)
        self.domain_embedding: nn.Embedding | None = None
        self.domain_proj: nn.Linear | None = None
        self.domain_bias: nn.Parameter | None = None
        self.user_embedding: nn.Embedding | None = None
        self.user_proj: nn.Linear | None = None
        self.profile_proj: nn.Linear | None = None
        if mode in ("domain", "domain_user"):
            self.domain_embedding = nn.Embedding(num_domains, signal_dim)
            self.domain_proj = nn.Linear(signal_dim, num_experts, bias=False)
            if domain_expert_bias:
                self.domain_bias = nn.Parameter(torch.zeros(num_domains, num_experts))
        if mode == "domain_user":
            self.user_embedding = nn.Embedding(num_user_buckets, signal_dim)
            self.user_proj = nn.Linear(signal_dim, num_experts, bias=False)
            if use_profile:
                self.profile_proj = nn.Linear(hidden_size, num_experts, bias=False)

    def logits(
        self,
        x: torch.Tensor,
        domain_ids: torch.Tensor,
        user_ids: torch.Tensor | None = None,
        profile: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Router logits in fp32.

        Args:
            x: (B, T, D) hidden states.
            domain_ids: (B, T) service index per token (read in ``domain`` / ``domain_user``).
            user_ids: (B,) user buckets in ``[0, num_user_buckets)``; required in ``domain_user``.
            profile: (B, T, D) optional profile vectors (read in ``domain_user`` only).

        Returns:
            (B, T, E) fp32 logits.
        """
        logits = _linear_fp32(x, self.gate)  # (B, T, E)
        if self.domain_embedding is not None:
            logits = logits + _linear_fp32(self.domain_embedding(domain_ids), self.domain_proj)  # (B, T, E)
            if self.domain_bias is not None:
                logits = logits + self.domain_bias.float()[domain_ids]  # (B, T, E)
        if self.user_embedding is not None:
            if user_ids is None:
                raise ValueError("mode 'domain_user' needs user_ids (B,)")
            user_logits = _linear_fp32(self.user_embedding(user_ids), self.user_proj)  # (B, E)
            logits = logits + user_logits[:, None, :]  # (B, T, E)
            if profile is not None:
                if self.profile_proj is None:
                    raise ValueError("a profile was passed to a router built with use_profile=False")
                logits = logits + _linear_fp32(profile, self.profile_proj)  # (B, T, E)
        if self.allowed is not None:
            logits = logits.masked_fill(~self.allowed[domain_ids], float("-inf"))  # (B, T, E)
        return logits

    def forward(
        self,
        x: torch.Tensor,
        domain_ids: torch.Tensor,
        user_ids: torch.Tensor | None = None,
        profile: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route every token to its top-k experts.

        Args: as :meth:`logits`.

        Returns:
            weights: (N, k) fp32 routing weights of the chosen experts, summing to 1 per token,
                N = B * T.
            indices: (N, k) int64 expert indices, in descending weight order.
            logits: (N, E) fp32 router logits, for the auxiliary losses.
        """
        logits = self.logits(x, domain_ids, user_ids, profile).reshape(-1, self.num_experts)  # (N, E)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices, logits


def _linear_fp32(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` computed in fp32 (router math stays fp32 under bf16 weights/activations)."""
    return F.linear(x.float(), layer.weight.float())


def load_balancing_loss(
    logits: torch.Tensor, indices: torch.Tensor, num_experts: int, top_k: int
) -> torch.Tensor:
    """Switch Transformer / Mixtral load-balancing loss.

    ``loss = E * sum_e f_e * P_e`` where ``f_e = (# token-slots routed to e) / (N * k)`` is the
    fraction of the ``N * k`` assignments that went to expert ``e`` (no gradient) and
    ``P_e = mean_n softmax(logits_n)_e`` is the mean router probability of ``e`` (carries the
    gradient). It is 1 when routing is uniform and grows as it concentrates (at most ``E``).
    Hugging Face's Mixtral sums ``f`` over the k slots instead, which is ``k`` times this value.

    Args:
        logits: (N, E) router logits.
        indices: (N, k) chosen experts.
        num_experts: E.
        top_k: k.

    Returns:
        Scalar fp32 loss.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    flat = indices.reshape(-1)  # (N*k,)
    counts = probs.new_zeros(num_experts).index_add_(
        0, flat, probs.new_ones(flat.shape)
    )  # (E,), no host sync
    fraction = counts / max(indices.numel(), 1)  # f_e, sums to 1
    return num_experts * torch.dot(fraction, probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean_n (logsumexp_e logits_{n,e})^2``.

    Keeps the logits small, so the fp32 softmax and bf16 activations around it stay well
    conditioned.

    Args:
        logits: (N, E) router logits.

    Returns:
        Scalar fp32 loss.
    """
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
