"""Split-half noise ceiling of CME covariance maps (a design tried for the saturation reference).

For every client and round of the runs under ``RUN_ROOT`` (e.g. ``runs/cme-saturation``, made by
``benchmarks/cme_saturation.py``), the analysis layer's CME matrix of the round's last epoch is
split into two random halves of its columns (incoming connections); the off-diagonal similarity of
the two half-maps, Spearman-Brown corrected, is what two noisy estimates of the *same* map would
give. Prints, per run, the consecutive-map similarity and the 5 % quantile of that ceiling over
``--splits`` random splits (first client only).

    python benchmarks/cme_split_half.py runs/cme-saturation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedsim.analysis.cme import consecutive_similarities, covariance_map, map_similarity
from fedsim.cme import CMEArchive


def ceiling(mat: np.ndarray, splits: int = 20, seed: int = 0) -> np.ndarray:
    """Spearman-Brown corrected similarity of the maps of two random column halves, per split."""
    rng = np.random.default_rng(seed)
    n = mat.shape[1]
    out = []
    for _ in range(splits):
        p = rng.permutation(n)
        rho = map_similarity(covariance_map(mat[:, p[: n // 2]]), covariance_map(mat[:, p[n // 2 :]]))
        out.append(2 * rho / (1 + rho) if rho > -1 else np.nan)
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_root", type=Path)
    ap.add_argument("--layer", default="head.fc2.weight")
    ap.add_argument("--splits", type=int, default=20)
    args = ap.parse_args()
    for run in sorted(p for p in args.run_root.iterdir() if (p / "cme").is_dir()):
        arch = CMEArchive(run)
        client = arch.clients[0]
        mats = [arch.read(client, r).matrices[args.layer][-1] for r in arch.rounds(client)]
        sims = consecutive_similarities([covariance_map(m) for m in mats])
        low = [float(np.nanquantile(ceiling(m, args.splits), 0.05)) for m in mats[1:]]
        print(f"{run.name} client {client}: similarity {np.round(sims, 2).tolist()}")
        print(f"{' ' * len(run.name)}  ceiling (5 %): {np.round(low, 2).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
