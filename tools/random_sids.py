"""Give every item of a prepared catalogue a random semantic ID, without the text encoder.

``moe-rec sids build`` embeds item text with the offline MiniLM package (88 MB), which a machine
reached only by a small copy of the repository (the GPU check, ``tools/gpu_check.sh``) does not
have. For a speed check the codes need not mean anything: this writes the same SID table (and
trie) that stage writes, with uniform random codes of the config's ``sid.levels`` x
``sid.codebook_size`` and dedup codes for the rare collisions, so ``moe-rec sequences build`` and
``moe-rec train`` run unchanged. A model trained on it learns popularity and order, not content:
its metrics say nothing about quality.

    python tools/random_sids.py --config configs/experiments/demo.yaml run_dir=runs/x sid.levels=3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from moe_rec.config import load_config
from moe_rec.console import console
from moe_rec.data.store import ITEMS_DIR, load_table
from moe_rec.experiment import ExperimentConfig
from moe_rec.sid.table import SIDTable
from moe_rec.sid.trie import TRIE_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML (its run_dir holds data/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, as for moe-rec")
    args = parser.parse_args()
    cfg = load_config(ExperimentConfig, args.config, args.overrides)
    items = load_table(cfg.data_dir, ITEMS_DIR)
    rng = np.random.default_rng(args.seed)
    codes = torch.from_numpy(
        rng.integers(0, cfg.sid.codebook_size, (items.num_rows, cfg.sid.levels))
    )  # (N, L)
    table = SIDTable.from_quantized(
        services=items.column("service").to_pylist(),
        item_ids=items.column("item_id").to_pylist(),
        codes=codes,
        codebook_size=cfg.sid.codebook_size,
        max_dedup=cfg.sid.max_dedup,
        quantizer="random",
        encoder="none (tools/random_sids.py)",
    )
    table.save(cfg.sid_dir)
    if table.packable:
        table.trie().save(cfg.sid_dir / TRIE_FILE)
    console.print(
        f"random semantic IDs: {len(table):,} items, {cfg.sid.levels} x {cfg.sid.codebook_size} codes -> {cfg.sid_dir}"
    )


if __name__ == "__main__":
    main()
