"""How much the services of a joint catalogue share their semantic-ID codes, level by level.

For every code level it prints the share of the codes in use that items of more than one service
use, and the purity: the share of items whose code at that level belongs mostly to their own
service (1.0: every code is one service's; the largest service's share of the items: no
separation at all). A joint model reads each code through one embedding row, so a shared code
means one row for different things (`model.overrides.service_codes` gives each service its own
change of every row; docs/model.md).

    python tools/sid_sharing.py runs/amazon2014-joint/sids
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moe_rec.sid.table import META_FILE, SIDTable


def sharing(codes: np.ndarray, services: np.ndarray, codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(L,) share of used codes used by more than one service, and (L,) purity, per level.

    Args:
        codes: (N, L) each item's code at each level; services: (N,) each item's service index.
    """
    n_services = int(services.max()) + 1
    shared, purity = [], []
    for level in range(codes.shape[1]):
        counts = np.zeros((codebook_size, n_services), dtype=np.int64)  # items per (code, service)
        np.add.at(counts, (codes[:, level], services), 1)
        users = (counts > 0).sum(1)
        shared.append((users > 1).sum() / (users > 0).sum())
        purity.append(counts.max(1).sum() / len(codes))
    return np.asarray(shared), np.asarray(purity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("sids", type=Path, help="a run's sids/ directory")
    args = parser.parse_args()
    if not (args.sids / META_FILE).exists():
        parser.error(f"{args.sids / META_FILE} not found: pass a run's sids/ directory (moe-rec sids build)")
    table = SIDTable.load(args.sids)
    services = table.service_index.numpy()
    levels = table.codes.numpy()[:, : table.codes.shape[1] - 1]  # the last column is the dedup code
    shared, purity = sharing(levels, services, table.codebook_size)
    sizes = np.bincount(services, minlength=len(table.services))
    print(f"{len(services):,} items: " + ", ".join(f"{s} {n:,}" for s, n in zip(table.services, sizes)))
    print(f"no separation: purity {sizes.max() / sizes.sum():.2f} (the largest service's share)")
    print("level  shared codes  purity")
    for level, (s, p) in enumerate(zip(shared, purity)):
        print(f"{level:>5}  {s:>12.2f}  {p:>6.2f}")


if __name__ == "__main__":
    main()
