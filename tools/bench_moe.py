"""Benchmark the MoE feed-forward layer (forward + backward) against a dense GeGLU of equal FLOPs.

For each size ``TOKENSxDxFxExK`` it times, in the same run: the dense GeGLU with intermediate
width ``K*F`` (the baseline: same active FLOPs per token), :class:`MoEFeedForward` with the
``grouped_mm`` and ``loop`` backends, and on CUDA, when MegaBlocks is importable, our layer with
the ``megablocks`` backend and MegaBlocks' own ``dMoE`` (grouped GLU). It prints milliseconds per
forward+backward, tokens/s, TFLOP/s and the throughput ratio against the dense baseline.

FLOPs are counted explicitly, forward x 3 for forward + backward:

* experts: 3 matmuls (gate, up, down) x 2*N*k*D*F = 6*N*k*D*F forward;
* router: 2*N*D*E forward (the small domain/user terms are left out);
* dense baseline: 6*N*D*(k*F) forward, equal to the experts.

Inputs are random, so the router spreads tokens roughly evenly; no shared experts.

    python tools/bench_moe.py --device cpu --dtype float32
    python tools/bench_moe.py --device cuda --dtype bfloat16 --sizes 32768x1024x2816x8x2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moe_rec.model.choices import ROUTER_MODES
from moe_rec.model.moe import GatedFeedForward, MoEFeedForward
from moe_rec.model.router import Router

DEFAULT_SIZES = {
    "cpu": ["2048x128x352x8x2", "4096x256x704x8x2", "4096x512x1408x8x2", "2048x256x704x16x4"],
    "cuda": ["32768x1024x2816x8x2", "16384x2048x5632x8x2", "32768x1024x1408x16x4"],
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Size:
    tokens: int
    d: int
    f: int
    e: int
    k: int

    @classmethod
    def parse(cls, text: str) -> Size:
        return cls(*(int(v) for v in text.lower().split("x")))

    def __str__(self) -> str:
        return f"N={self.tokens} d={self.d} f={self.f} E={self.e} k={self.k}"

    def dense_flops(self) -> float:
        """Forward + backward FLOPs of the dense GeGLU of width k*F (= the routed experts')."""
        return 3 * 6 * self.tokens * self.d * self.k * self.f

    def moe_flops(self) -> float:
        """Forward + backward FLOPs of the MoE layer: routed experts + router."""
        return self.dense_flops() + 3 * 2 * self.tokens * self.d * self.e


def _moe(size: Size, mode: str, backend: str) -> MoEFeedForward:
    router = Router(
        hidden_size=size.d,
        num_experts=size.e,
        top_k=size.k,
        mode=mode,
        num_domains=4,
        num_user_buckets=1024,
        signal_dim=32,
        domain_expert_bias=mode != "token",
    )
    return MoEFeedForward(
        hidden_size=size.d,
        intermediate_size=size.f,
        num_experts=size.e,
        top_k=size.k,
        router=router,
        backend=backend,
    )


def _megablocks_dmoe(size: Size, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """MegaBlocks' own dMoE layer (its router, grouped GLU, gelu-tanh, renormalised top-k)."""
    from megablocks.layers.arguments import Arguments
    from megablocks.layers.dmoe import dMoE

    args = Arguments(
        hidden_size=size.d,
        ffn_hidden_size=size.f,
        moe_num_experts=size.e,
        moe_top_k=size.k,
        moe_normalize_expert_weights=1,
        moe_loss_weight=0.0,
        mlp_type="glu",
        mlp_impl="grouped",
        activation_fn=partial(F.gelu, approximate="tanh"),
        bias=False,
        return_bias=False,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        device=device,
    )
    return dMoE(args)


def _candidates(
    size: Size, mode: str, dtype: torch.dtype, device: torch.device
) -> list[tuple[str, Callable[[], nn.Module], Callable[..., torch.Tensor], float]]:
    """(name, build, step, FLOPs): ``step(module, x, domain_ids, user_ids, profile)`` -> output."""

    def moe_step(m: nn.Module, x, domain_ids, user_ids, profile) -> torch.Tensor:
        return m(x, domain_ids, user_ids, profile)[0]

    def plain_step(m: nn.Module, x, *_: torch.Tensor) -> torch.Tensor:
        return m(x)

    out = [
        (
            "dense GeGLU (k*F)",
            lambda: GatedFeedForward(hidden_size=size.d, intermediate_size=size.k * size.f),
            plain_step,
            size.dense_flops(),
        ),
        ("moe grouped_mm", lambda: _moe(size, mode, "grouped_mm"), moe_step, size.moe_flops()),
        ("moe loop", lambda: _moe(size, mode, "loop"), moe_step, size.moe_flops()),
    ]
    if device.type == "cuda":
        try:
            import megablocks  # noqa: F401
        except ImportError:
            print("(MegaBlocks not importable: its rows are skipped)")
        else:
            out.append(("moe megablocks", lambda: _moe(size, mode, "megablocks"), moe_step, size.moe_flops()))
            out.append(
                (
                    "MegaBlocks dMoE",
                    lambda: _megablocks_dmoe(size, dtype, device),
                    plain_step,
                    size.moe_flops(),
                )
            )
    return out


def bench_size(
    size: Size, mode: str, dtype: torch.dtype, device: torch.device, warmup: int, iters: int
) -> list[tuple[str, float, float, float]]:
    """Rows (name, median ms, tokens/s, TFLOP/s) for one size.

    The candidates take turns, one step each per round, so a busy machine slows them alike.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, size.tokens, size.d, generator=gen).to(device, dtype)  # (B=1, T=N, D)
    grad = torch.randn(1, size.tokens, size.d, generator=gen).to(device, dtype)
    domain_ids = torch.randint(0, 4, (1, size.tokens), generator=gen).to(device)
    user_ids = torch.randint(0, 1024, (1,), generator=gen).to(device)
    profile = torch.randn(1, size.tokens, size.d, generator=gen).to(device, dtype)
    candidates = _candidates(size, mode, dtype, device)
    modules = [build().to(device, dtype) for _, build, _, _ in candidates]
    inp = x.clone().requires_grad_(True)

    def step(module: nn.Module, step_fn: Callable[..., torch.Tensor]) -> float:
        module.zero_grad(set_to_none=True)
        inp.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step_fn(module, inp, domain_ids, user_ids, profile).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    times: list[list[float]] = [[] for _ in candidates]
    for i in range(warmup + iters):
        for j, (module, (_, _, step_fn, _)) in enumerate(zip(modules, candidates, strict=True)):
            ms = step(module, step_fn)
            if i >= warmup:
                times[j].append(ms)
    rows = []
    for (name, _, _, flops), ts in zip(candidates, times, strict=True):
        ms = statistics.median(ts)
        rows.append((name, ms, size.tokens / ms * 1e3, flops / ms / 1e9))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda"
    )
    parser.add_argument(
        "--sizes", nargs="+", default=None, help="TOKENSxDxFxExK each; default depends on --device"
    )
    parser.add_argument("--mode", choices=ROUTER_MODES, default="token", help="router mode")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    print(
        f"torch {torch.__version__}, {where}, {torch.get_num_threads()} CPU threads, {dtype}, router {args.mode}"
    )
    print(
        f"median of {args.iters} forward+backward steps after {args.warmup} warm-up, candidates interleaved\n"
    )
    header = f"| {'size':<36} | {'implementation':<18} | {'ms':>9} | {'tokens/s':>10} | {'TFLOP/s':>8} | {'vs dense':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for text in args.sizes or DEFAULT_SIZES[device.type]:
        size = Size.parse(text)
        rows = bench_size(size, args.mode, dtype, device, args.warmup, args.iters)
        dense_tps = rows[0][2]
        for name, ms, tps, tflops in rows:
            print(
                f"| {str(size):<36} | {name:<18} | {ms:>9.2f} | {tps:>10.0f} | {tflops:>8.3f} | {tps / dense_tps:>8.2f} |"
            )


if __name__ == "__main__":
    main()
