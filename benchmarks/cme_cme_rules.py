"""Score the verdict's rules on the *CME statistics* on a finished CME validation study.

``benchmarks/cme_label_rules.py`` scores the ``weak`` tests on ``metrics.jsonl`` statistics; the
two rules here need each client's :class:`~fedsim.analysis.cme.ClientStatistics` from the run's
CME archive instead (:func:`~fedsim.analysis.cme.client_statistics` of the first matrix layer,
without the maps and the ACF). They take 1-2 s per run, so they are cached in
``OUT/client-stats.pkl`` (``{run: [ClientStatistics, ...]}``; runs not in it yet are computed in
``--workers`` processes and added). No retraining.

``--report magnitude`` (the default): the ``weak`` contribution test's fallback for runs without
update norms, the rank-sum test of the head CME magnitude against the same-model peers
(:func:`~fedsim.analysis.cme.magnitude_rank_test`, lowest = weak, log scale) at the verdict's
level (2.5 %), under each guard: ``clear_outlier`` (last round and median over the rounds, the
rule up to ``5bb41d8``) and ``outlier_on_average`` (the verdict's since ``9b4ffb0``); it writes
how many few-data and free-rider clients each finds and how many healthy clients it flags.

``--report exploding``: the relative part of the ``diverged`` rule
(:func:`~fedsim.analysis.cme.exploding_round`, with the server's update norms) without and with
its requirement, since ``0151f04``, of an update at least
:data:`~fedsim.analysis.cme.EXPLODING_UPDATE_RATIO` times the largest same-model peer's: per
kind of client, how many it calls diverged (clients already diverged by non-finite values or by
the jump fraction are counted apart, as the verdict checks those first) and, over those, the
range of the head CME magnitude and of the update norm in the round it picked, as a ratio to the
largest same-model peer's.

docs/cme-validation.md ("How the rule got here", steps 8 and 10) quotes the output of:

    python benchmarks/cme_cme_rules.py runs/cme-validation --seeds 0-29 --report magnitude
    python benchmarks/cme_cme_rules.py runs/cme-validation --seeds 0-29 --report exploding
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pickle
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# the sibling script by the name `python benchmarks/...` and `mypy benchmarks` give it, also when imported as benchmarks.cme_cme_rules
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cme_label_rules import _emit, load_args, study_parser

if TYPE_CHECKING:
    from fedsim.analysis.cme import ClientStatistics

#: The per-run cache of client statistics, in the study's ``--out`` folder.
CACHE = "client-stats.pkl"
#: Guards of the magnitude test scored by ``--report magnitude``.
MAGNITUDE_GUARDS = ("clear_outlier", "outlier_on_average")
#: The faults the contribution test is meant to find.
CONTRIBUTION_FAULTS = ("few-data", "free-rider")
#: The kinds of client ``--report exploding`` counts apart (``healthy``: not the faulty client).
EXPLODING_WHO = ("diverge", "label-noise", "few-data", "free-rider", "healthy")
#: Progress is logged every this many computed runs.
PROGRESS_EVERY = 20


# ---------------------------------------------------------------------------- client statistics
def run_statistics(run_dir: Path) -> list[ClientStatistics]:
    """Every client's statistics of one run (first matrix layer), without the maps and the ACF."""
    from fedsim.analysis.cme import client_statistics
    from fedsim.cme import CMEArchive

    arch = CMEArchive(run_dir)
    out = []
    with np.errstate(all="ignore"):
        for client in arch.clients:
            s = client_statistics(arch, client, arch.matrix_layers(client)[0])
            out.append(dataclasses.replace(s, maps=[], acf=None))
    return out


def cached_statistics(
    out: Path, runs: Sequence[str], workers: int = 2, progress: Callable[[str], None] | None = None
) -> dict[str, list[ClientStatistics]]:
    """``{run: [ClientStatistics, ...]}`` of ``runs`` (names in ``out/runs``), from
    ``out/client-stats.pkl``; runs not in it are computed in ``workers`` processes and the cache
    is rewritten (also every :data:`PROGRESS_EVERY` runs, so an interrupted pass keeps its work)."""
    path = out / CACHE
    cache: dict[str, list[ClientStatistics]] = pickle.loads(path.read_bytes()) if path.exists() else {}
    missing = [r for r in runs if r not in cache]
    if missing:
        if progress:
            progress(f"computing the client statistics of {len(missing)} runs ({len(cache)} cached) with {workers} workers")
        with ProcessPoolExecutor(max(1, workers)) as pool:
            for i, (name, stats) in enumerate(zip(missing, pool.map(run_statistics, [out / "runs" / r for r in missing]), strict=True)):
                cache[name] = stats
                if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == len(missing):
                    _save(cache, path)
                    if progress:
                        progress(f"{i + 1}/{len(missing)} runs ({name})")
    return {r: cache[r] for r in runs}


def _save(cache: Mapping[str, list[ClientStatistics]], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(dict(cache)))
    tmp.replace(path)


def peer_groups(stats: Sequence[ClientStatistics], s: ClientStatistics) -> tuple[list[ClientStatistics], list[list[ClientStatistics]]]:
    """The other clients of ``s``'s model and the run's other model groups (as ``decide_verdict``)."""
    others = [p for p in stats if p.client != s.client]
    same = [p for p in others if p.model == s.model]
    groups = [[p for p in others if p.model == m] for m in sorted({p.model for p in others} - {s.model})]
    return same, groups


# ---------------------------------------------------------------------------- --report magnitude
def score_magnitude(
    runs: Mapping[str, Any], stats: Mapping[str, Sequence[ClientStatistics]], guard: str, level: float = 0.025
) -> dict[tuple[str, str], list[int]]:
    """``{(style, "few-data" | "free-rider" | "healthy"): [flagged, clients]}`` of the head CME
    magnitude test under ``guard`` (:data:`MAGNITUDE_GUARDS`); other faulty clients are skipped.
    ``runs``: :func:`~benchmarks.cme_label_rules.load`'s result; ``stats``: each run's clients."""
    from fedsim.analysis import agreement as ag
    from fedsim.analysis.cme import magnitude_rank_test

    if guard not in MAGNITUDE_GUARDS:
        raise ValueError(f"unknown guard {guard!r}; valid: {', '.join(MAGNITUDE_GUARDS)}")
    check = getattr(ag, guard)
    out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for name, (style, _, faulty, kind, _rows) in runs.items():
        for s in stats[name]:
            if s.client == faulty and kind not in CONTRIBUTION_FAULTS:
                continue
            same, groups = peer_groups(stats[name], s)
            test = magnitude_rank_test(s, same, groups)
            hit = test is not None and test.p_value <= level and check(test)
            cell = out[(style, kind if s.client == faulty else "healthy")]
            cell[0] += int(hit)
            cell[1] += 1
    return out


def _magnitude_table(runs: Mapping[str, Any], stats: Mapping[str, Sequence[ClientStatistics]], head: str) -> list[str]:
    cols = [(s, k) for s in ("same-model", "mixed") for k in (*CONTRIBUTION_FAULTS, "healthy")]
    lines = [head, "", "| guard | " + " | ".join(f"{s} {k}" for s, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for guard in MAGNITUDE_GUARDS:
        res = score_magnitude(runs, stats, guard)
        lines.append(f"| {guard} | " + " | ".join(f"{res[c][0]}/{res[c][1]}" if res[c][1] else "-" for c in cols) + " |")
    return lines


# ---------------------------------------------------------------------------- --report exploding
@contextlib.contextmanager
def update_ratio(ratio: float) -> Iterator[None]:
    """Within the block, :func:`~fedsim.analysis.cme.exploding_round` needs an update of at least
    ``ratio`` times the largest same-model peer's (restored afterwards). ``1.0`` is the rule before
    ``0151f04``: the update's log excess must already exceed the peers' gap, which is >= 0."""
    from fedsim.analysis import cme

    old = cme.EXPLODING_UPDATE_RATIO
    cme.EXPLODING_UPDATE_RATIO = ratio
    try:
        yield
    finally:
        cme.EXPLODING_UPDATE_RATIO = old


@dataclasses.dataclass
class ExplodingCell:
    """One (style, kind of client) cell of ``--report exploding``."""

    clients: int = 0
    #: diverged before the relative rule is asked: non-finite values, jump fraction
    nonfinite: int = 0
    jump: int = 0
    #: called diverged by the relative rule: (run, client, round, head magnitude ratio, update-norm ratio)
    hits: list[tuple[str, int, int, float, float]] = dataclasses.field(default_factory=list)

    def span(self, index: int) -> str:
        """``min-max`` of the hits' ratio ``index`` (3: head magnitude, 4: update norm)."""
        if not self.hits:
            return "-"
        lo, hi = min(h[index] for h in self.hits), max(h[index] for h in self.hits)
        return f"{lo:.3g}" if lo == hi else f"{lo:.3g}-{hi:.3g}"


def score_exploding(
    runs: Mapping[str, Any], stats: Mapping[str, Sequence[ClientStatistics]], ratio: float | None = None
) -> dict[tuple[str, str], ExplodingCell]:
    """``{(style, kind):`` :class:`ExplodingCell` ``}`` of the relative ``diverged`` rule, kind in
    :data:`EXPLODING_WHO`, with the update-ratio requirement ``ratio`` (``None``: the rule's own,
    :data:`~fedsim.analysis.cme.EXPLODING_UPDATE_RATIO`; ``1.0``: none). The ratios of a hit are
    the client's head CME magnitude (``exp`` of the rule's log excess) and update norm over the
    largest same-model peer's in the round the rule picked (NaN without update norms)."""
    from fedsim.analysis import cme
    from fedsim.analysis.cme import update_norms_by_client

    out: dict[tuple[str, str], ExplodingCell] = defaultdict(ExplodingCell)
    with update_ratio(cme.EXPLODING_UPDATE_RATIO if ratio is None else ratio):
        for name, (style, _, faulty, kind, rows) in runs.items():
            norms = update_norms_by_client(rows)
            for s in stats[name]:
                cell = out[(style, kind if s.client == faulty else "healthy")]
                cell.clients += 1
                if np.any(np.nan_to_num(s.nonfinite_fraction) > 0):
                    cell.nonfinite += 1
                    continue
                if np.any(np.nan_to_num(s.jump_fraction) > cme.EXPLODING_JUMP_FRACTION):
                    cell.jump += 1
                    continue
                same, groups = peer_groups(stats[name], s)
                hit = cme.exploding_round(s, same, groups, norms or None)
                if hit is None:
                    continue
                try:
                    with np.errstate(all="ignore"):
                        un = float(np.float64(norms[s.client][hit.round]) / max(norms[p.client][hit.round] for p in same))
                except (KeyError, ValueError):
                    un = math.nan
                cell.hits.append((name, s.client, hit.round, math.exp(hit.excess), un))
    return out


def _exploding_table(runs: Mapping[str, Any], stats: Mapping[str, Sequence[ClientStatistics]], head: str) -> list[str]:
    from fedsim.analysis.cme import EXPLODING_UPDATE_RATIO

    rules = [("none (before 0151f04)", 1.0), (f">= {EXPLODING_UPDATE_RATIO:g}x (now)", None)]
    lines = [
        head,
        "",
        (
            "Clients called `diverged` by the relative rule (`exploding_round`), by the update-ratio requirement; clients already "
            "`diverged` by non-finite values or by the jump fraction are counted apart (the verdict checks those first). Ratios: "
            "the client's head CME magnitude and update norm over the largest same-model peer's in the round the rule picked, "
            "range over the clients it called diverged."
        ),
        "",
        "| update ratio | style | client | clients | non-finite | jump fraction | relative rule | diverged (any) | head magnitude ratio | update-norm ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    scored = [(label, score_exploding(runs, stats, ratio)) for label, ratio in rules]
    for label, res in scored:
        for style in ("same-model", "mixed"):
            for who in EXPLODING_WHO:
                c = res.get((style, who))
                if c is None or not c.clients:
                    continue
                rel = len(c.hits)
                lines.append(
                    f"| {label} | {style} | {who} | {c.clients} | {c.nonfinite} | {c.jump} | {rel} | {c.nonfinite + c.jump + rel} "
                    f"| {c.span(3)} | {c.span(4)} |"
                )
    label, res = scored[0]
    false = sorted(h for (_, who), c in res.items() if who != "diverge" for h in c.hits)
    if false:
        lines += ["", f"Clients other than the diverging one called `diverged` by the relative rule, update ratio {label}:", ""]
        lines += ["| run | client | round | head magnitude ratio | update-norm ratio |", "|---|---|---|---|---|"]
        lines += [f"| {run} | {client} | {r} | {mag:.3g} | {un:.3g} |" for run, client, r, mag, un in false]
    return lines


# ---------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    p = study_parser(__doc__.split("\n\n")[0], "magnitude-rules.md")
    p.add_argument("--report", choices=("magnitude", "exploding"), default="magnitude", help="which rule to score (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, help=f"processes computing runs missing from OUT/{CACHE} (default: %(default)s)")
    args = p.parse_args(argv)
    runs = load_args(p, args)
    stats = cached_statistics(args.out, sorted(runs), args.workers, progress=lambda m: print(m, file=sys.stderr, flush=True))
    command = f"python benchmarks/cme_cme_rules.py {args.out} --seeds {args.seeds} --report {args.report}"
    if args.report == "magnitude":
        head = f"Contribution test guards (head CME magnitude), seeds {args.seeds} of `{args.out}` ({len(runs)} runs; `{command}`)"
        return _emit(_magnitude_table(runs, stats, head), args.write)
    head = f"Relative `diverged` rule with and without the update ratio, seeds {args.seeds} of `{args.out}` ({len(runs)} runs; `{command}`)"
    return _emit(_exploding_table(runs, stats, head), args.write)


if __name__ == "__main__":
    sys.exit(main())
