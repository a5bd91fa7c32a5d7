"""Mixture-of-experts feed-forward layer with stacked GeGLU experts, and the dense GeGLU.

Contents, top to bottom:

* :class:`GatedFeedForward` — Gemma's dense gated-GELU FFN, used for dense layers and shared experts.
* :class:`MoEAux` — what an MoE layer reports beside its output (aux losses, load statistics).
* :func:`routed_experts` — the dispatcher: runs the routed experts with one of three backends,
  chosen by an explicit string (``loop`` | ``grouped_mm`` | ``megablocks``):

  - ``loop``: the plain reference. Per expert, gather its tokens, compute in fp32, cast back,
    scatter-add weighted. Clear and obviously right; the other backends are tested against it.
  - ``grouped_mm`` (default): sort the token-slots by expert, then two
    ``torch.nn.functional.grouped_mm`` calls (gate/up, down) over all experts at once, no
    Python loop over experts and no host synchronisation.
  - ``megablocks``: MegaBlocks' permutation kernels and grouped GEMM on our weights (CUDA, bf16).

* :class:`MoEFeedForward` — router + stacked experts (+ optional shared experts).

Why stacked parameters instead of a ``ModuleList`` of experts: one ``[E, D, 2F]`` and one
``[E, F, D]`` tensor feed a grouped GEMM directly, ZeRO-3 shards and gathers them like any other
parameter, and ``zero_to_fp32`` consolidates them without special cases (see ARCHITECTURE.md).

Expert layout, so a dense Gemma FFN can be upcycled by copying: ``w_gate_up[e] =
cat([gate_proj.weight.T, up_proj.weight.T], dim=-1)`` and ``w_down[e] = down_proj.weight.T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.model.choices import MoEBackend
from moe_rec.model.router import Router, load_balancing_loss, router_z_loss

_MEGABLOCKS_HINT = (
    "the 'megablocks' MoE backend needs MegaBlocks and grouped_gemm on a CUDA machine: "
    "`pip install -e .[megablocks]` (see README, 'MegaBlocks backend'); "
    "the default backend 'grouped_mm' needs neither"
)


class GatedFeedForward(nn.Module):
    """Gemma's gated-GELU feed-forward: ``down(gelu_tanh(gate(x)) * up(x))``.

    Parameter names follow Hugging Face's Gemma (``gate_proj``, ``up_proj``, ``down_proj``), so a
    dense Gemma checkpoint loads into it unchanged.

    Args:
        hidden_size: D.
        intermediate_size: F, width of the gated hidden layer.
    """

    def __init__(self, *, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D), in the input's dtype."""
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


@dataclass
class MoEAux:
    """What an MoE layer reports beside its output.

    Attributes:
        load_balancing_loss: scalar fp32, :func:`~moe_rec.model.router.load_balancing_loss`
            (carries gradient to the router).
        z_loss: scalar fp32, :func:`~moe_rec.model.router.router_z_loss` (carries gradient).
        expert_load: (num_domains, E) int64 token-slot counts per service and expert
            (detached); sums to N * k.
        router_entropy: scalar fp32, mean per-token entropy of the router's full softmax
            (detached); ``log E`` is uniform, 0 is one-hot.
    """

    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_load: torch.Tensor
    router_entropy: torch.Tensor


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    backend: MoEBackend,
) -> torch.Tensor:
    """Run every token through its top-k experts and sum the outputs weighted by the router.

    ``out[n] = sum_j weights[n, j] * expert_{indices[n, j]}(x[n])`` with
    ``expert_e(x) = (gelu_tanh(x @ W_gate_e) * (x @ W_up_e)) @ W_down_e``. No token is dropped:
    every expert takes however many tokens are routed to it (zero included).

    Args:
        x: (N, D) tokens.
        weights: (N, k) routing weights (fp32 from the router).
        indices: (N, k) int64 expert index per slot.
        w_gate_up: (E, D, 2F) stacked ``[gate | up]`` projections.
        w_down: (E, F, D) stacked down projections.
        backend: ``loop`` (fp32 reference), ``grouped_mm`` or ``megablocks``.

    Returns:
        (N, D) in the dtype of ``x``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown MoE backend {backend!r}; use one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](x, weights, indices, w_gate_up, w_down)


def _experts_loop(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Reference backend: one expert at a time, in fp32, cast back to ``x.dtype`` at the end."""
    x32 = x.float()
    out = torch.zeros_like(x32)  # (N, D)
    for e in range(w_gate_up.shape[0]):
        token, slot = torch.nonzero(indices == e, as_tuple=True)  # (n_e,) each
        gate, up = (x32[token] @ w_gate_up[e].float()).chunk(2, dim=-1)  # (n_e, F) each
        y = (F.gelu(gate, approximate="tanh") * up) @ w_down[e].float()  # (n_e, D)
        out = out.index_add(0, token, y * weights[token, slot, None].float())
    return out.to(x.dtype)


def _experts_grouped_mm(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """Sorted token-slots through ``F.grouped_mm``; computes in ``x.dtype``.

    Steps: sort the N*k token-slots by expert (stable, so each expert sees its tokens in order);
    ``offs[e]`` = number of slots routed to experts ``<= e`` (int32, found with ``searchsorted`` on
    the sorted ids, so no host sync); gather the tokens in that order; two grouped GEMMs; un-permute
    back to token-major ``(N, k, D)`` and combine the k slots with one batched ``(1, k) @ (k, D)``
    product (no zero-filled output and no atomic adds in the forward; bf16 accumulates in fp32
    inside the GEMM; on CPU it measured faster than a weighted ``index_add``). An expert with no
    tokens is an empty group, which ``grouped_mm`` handles.

    Requirements of ``grouped_mm`` (the same on CPU and CUDA): row strides must be multiples of 16
    bytes, i.e. D and F multiples of 8 in bf16 (4 in fp32). Sizes that are not are zero-padded here
    (a copy of the weights on every call; pick aligned sizes to avoid it). On CUDA the fast CUTLASS
    kernel needs bf16 activations and weights on SM90/SM100; other dtypes or GPUs run PyTorch's
    per-group fallback (correct, slower, with a host sync). Weights are cast to ``x.dtype``,
    which is free when the model is held in that dtype (DeepSpeed bf16).
    """
    n, d = x.shape
    k = indices.shape[1]
    num_experts, _, two_f = w_gate_up.shape
    w_gate_up, w_down = w_gate_up.to(x.dtype), w_down.to(x.dtype)
    multiple = 16 // x.element_size()
    pad_d, pad_f = -d % multiple, -(two_f // 2) % multiple
    if pad_d or pad_f:
        x, w_gate_up, w_down = _zero_pad(x, w_gate_up, w_down, pad_d, pad_f)

    sorted_experts, order = torch.sort(indices.reshape(-1), stable=True)  # (N*k,): slot ids by expert
    offs = torch.searchsorted(
        sorted_experts, torch.arange(num_experts, device=x.device), right=True, out_int32=True
    )  # (E,) cumulative slot counts
    xs = x.index_select(0, order // k)  # (N*k, D) tokens, expert-major

    h = _contiguous_grad(F.grouped_mm(xs, w_gate_up, offs=offs))  # (N*k, 2F)
    gate, up = h.chunk(2, dim=-1)  # (N*k, F) each
    y = _contiguous_grad(F.grouped_mm(F.gelu(gate, approximate="tanh") * up, w_down, offs=offs))  # (N*k, D)

    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))  # slot -> row
    y = y[:, :d].index_select(0, inverse).view(n, k, d)  # (N, k, D) token-major
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # (N, 1, k) @ (N, k, D) -> (N, D)


def _zero_pad(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, pad_d: int, pad_f: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-pad D by ``pad_d`` and F by ``pad_f``; padded units contribute exactly zero.

    Returns x (N, D'), w_gate_up (E, D', 2F'), w_down (E, F', D') with D' = D + pad_d and
    F' = F + pad_f. The extra output columns (beyond D) are sliced off by the caller.
    """
    num_experts, d, two_f = w_gate_up.shape
    f = two_f // 2
    x = F.pad(x, (0, pad_d))  # (N, D')
    w_gate_up = F.pad(w_gate_up.view(num_experts, d, 2, f), (0, pad_f, 0, 0, 0, pad_d))  # (E, D', 2, F')
    w_gate_up = w_gate_up.reshape(num_experts, d + pad_d, 2 * (f + pad_f))  # (E, D', 2F')
    w_down = F.pad(w_down, (0, pad_d, 0, pad_f))  # (E, F', D')
    return x, w_gate_up, w_down


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``grouped_mm``'s backward rejects a non-contiguous gradient (its strides break the 16-byte
    rule); ``.contiguous()`` is free when the gradient already is.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(t)


def _import_megablocks() -> tuple[ModuleType, ModuleType]:
    """MegaBlocks' ops and grouped_gemm's ops, or an ``ImportError`` saying how to install them."""
    try:
        import megablocks.ops as mb_ops
        from megablocks import grouped_gemm_util
    except ImportError as err:
        raise ImportError(_MEGABLOCKS_HINT) from err
    if grouped_gemm_util.ops is None:
        raise ImportError(_MEGABLOCKS_HINT + " (grouped_gemm is missing)")
    return mb_ops, grouped_gemm_util.ops


def _experts_megablocks(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
) -> torch.Tensor:
    """MegaBlocks' dMoE computation (grouped GLU, ``mlp_impl='grouped'``) on our weights.

    Same steps as ``megablocks.layers.dmoe.ParallelDroplessMLP.grouped_forward_once``: radix sort
    and histogram of the expert ids, its gather kernel, grouped_gemm's ``gmm`` with our stacked
    ``[E, D, 2F]`` / ``[E, F, D]`` weights, its weighted scatter. CUDA and bf16 only; ``gmm``
    takes the group sizes on the host, so this path syncs once per call (as MegaBlocks does).
    """
    if not x.is_cuda or x.dtype != torch.bfloat16:
        raise ValueError(f"the 'megablocks' backend runs on CUDA in bf16; got {x.device} {x.dtype}")
    mb_ops, gmm_ops = _import_megablocks()
    num_experts, k = w_gate_up.shape[0], indices.shape[1]
    flat = indices.reshape(-1).int()  # (N*k,)
    with torch.no_grad():
        bin_ids, order = mb_ops.sort(flat, max((num_experts - 1).bit_length(), 1))
        tokens_per_expert = mb_ops.histogram(flat, num_experts)  # (E,)
        bins = mb_ops.inclusive_cumsum(tokens_per_expert, 0).view(-1)  # (E,)
    xs = mb_ops.gather(x.contiguous(), order, bin_ids, bins, k)  # (N*k, D), expert-major
    batch_sizes = tokens_per_expert.cpu().long()
    gate, up = gmm_ops.gmm(xs, w_gate_up.to(x.dtype), batch_sizes).chunk(2, dim=-1)  # (N*k, F) each
    y = gmm_ops.gmm(F.gelu(gate, approximate="tanh") * up, w_down.to(x.dtype), batch_sizes)  # (N*k, D)
    return mb_ops.scatter(y, order, bin_ids, weights.reshape(-1).to(x.dtype), bins, k)  # (N, D)


_BACKENDS: dict[MoEBackend, Callable[..., torch.Tensor]] = {
    "loop": _experts_loop,
    "grouped_mm": _experts_grouped_mm,
    "megablocks": _experts_megablocks,
}


class MoEFeedForward(nn.Module):
    """Mixture-of-experts GeGLU feed-forward: routed experts (+ optional shared experts).

    Every token goes through its top-k routed experts, weighted by the router; no token is ever
    dropped (no capacity factor), whatever the imbalance. Shared experts are one dense GeGLU of
    width ``num_shared_experts * shared_intermediate_size`` that every token goes through, added
    to the routed output (n shared GeGLUs summed are one GeGLU of their concatenated width).

    Args:
        hidden_size: D.
        intermediate_size: F, width of each routed expert.
        num_experts: E; must match the router.
        top_k: k; must match the router.
        router: the :class:`~moe_rec.model.router.Router` that picks experts.
        num_shared_experts: dense experts every token goes through (0 = none).
        shared_intermediate_size: width of one shared expert; default ``intermediate_size``.
        backend: how the routed experts run, see :func:`routed_experts`.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        router: Router,
        num_shared_experts: int = 0,
        shared_intermediate_size: int | None = None,
        backend: MoEBackend = "grouped_mm",
    ) -> None:
        super().__init__()
        if (router.hidden_size, router.num_experts, router.top_k) != (hidden_size, num_experts, top_k):
            raise ValueError(
                f"router (hidden_size={router.hidden_size}, num_experts={router.num_experts}, "
                f"top_k={router.top_k}) does not match the layer ({hidden_size}, {num_experts}, {top_k})"
            )
        if backend not in _BACKENDS:
            raise ValueError(f"unknown MoE backend {backend!r}; use one of {sorted(_BACKENDS)}")
        if backend == "megablocks":
            _import_megablocks()
        if num_shared_experts < 0:
            raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.backend = backend
        self.router = router
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.w_down = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.shared_expert: GatedFeedForward | None = None
        if num_shared_experts > 0:
            self.shared_expert = GatedFeedForward(
                hidden_size=hidden_size,
                intermediate_size=num_shared_experts * (shared_intermediate_size or intermediate_size),
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Experts initialised as ``nn.Linear`` would be: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        nn.init.uniform_(self.w_gate_up, -1 / math.sqrt(self.hidden_size), 1 / math.sqrt(self.hidden_size))
        bound = 1 / math.sqrt(self.intermediate_size)
        nn.init.uniform_(self.w_down, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        domain_ids: torch.Tensor,
        user_ids: torch.Tensor | None = None,
        profile: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MoEAux]:
        """Route, run the experts, add the shared experts.

        Args:
            x: (B, T, D) hidden states.
            domain_ids: (B, T) service index per token in ``[0, num_domains)``; always used for
                ``expert_load``, read by the router in ``domain`` / ``domain_user`` modes.
            user_ids: (B,) user buckets in ``[0, num_user_buckets)`` (``domain_user`` mode).
            profile: (B, T, D) optional profile vectors (``domain_user`` mode).
            token_mask: (B, T) 1 for real tokens, 0 for padding; padding still flows through the
                experts but is left out of the auxiliary losses and statistics.

        Returns:
            out: (B, T, D) in the dtype of ``x``.
            aux: :class:`MoEAux` for this layer.
        """
        b, t, d = x.shape
        weights, indices, logits = self.router(x, domain_ids, user_ids, profile)  # (N, k), (N, k), (N, E)
        flat = x.reshape(b * t, d)  # (N, D)
        out = routed_experts(flat, weights, indices, self.w_gate_up, self.w_down, backend=self.backend)
        if self.shared_expert is not None:
            out = out + self.shared_expert(flat)
        domains = domain_ids.reshape(-1)  # (N,)
        if token_mask is not None:
            keep = token_mask.reshape(-1).bool()  # (N,)
            logits, indices, domains = logits[keep], indices[keep], domains[keep]
        aux = MoEAux(
            load_balancing_loss=load_balancing_loss(logits, indices, self.num_experts, self.top_k),
            z_loss=router_z_loss(logits),
            expert_load=_expert_load(domains, indices, self.router.num_domains, self.num_experts),
            router_entropy=_router_entropy(logits),
        )
        return out.view(b, t, d), aux


@torch.no_grad()
def _expert_load(
    domain_ids: torch.Tensor, indices: torch.Tensor, num_domains: int, num_experts: int
) -> torch.Tensor:
    """(num_domains, E) int64 count of token-slots per (service, expert); domain_ids (N,), indices
    (N, k); no host sync."""
    cell = domain_ids.reshape(-1, 1) * num_experts + indices  # (N, k) flat (domain, expert) index
    counts = torch.zeros(num_domains * num_experts, dtype=torch.long, device=indices.device)
    counts.scatter_add_(
        0, cell.reshape(-1), torch.ones(cell.numel(), dtype=torch.long, device=indices.device)
    )
    return counts.view(num_domains, num_experts)


@torch.no_grad()
def _router_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the entropy (nats) of the router's full softmax; logits (N, E)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E); 0 where an expert is masked (-inf)
    return torch.special.entr(probs).sum(dim=-1).mean()  # entr(0) = 0, where p log p is 0 x -inf
