"""Score variants of the two ``weak`` tests on a finished CME validation study.

The verdict's ``weak`` tests (``fedsim.analysis.agreement``) are rank-sum tests of a per-round
statistic against the other clients of the same model, each with an effect-size guard. This
script re-scores the study's runs (``OUT/runs/*/study_record.json``, no retraining).

``--test label`` (the default): the label-agreement test, under each combination of

* statistic: ``train_loss`` (last local epoch, on the client's own labels) and, where the runs
  recorded it (task option ``received-eval``), ``received_loss`` (the model as received, before
  local training, on the same labels);
* round weighting of the rank sum: ``flat``, ``linear`` or ``quadratic`` (:data:`~fedsim.analysis.agreement.WEIGHTINGS`);
* guard: ``clear_outlier`` (last round and median over the rounds) or ``outlier_on_average``
  (weighted mean over the rounds), each with the run's between-client spread pooled as the mean
  of the model groups' ranges (:func:`~fedsim.analysis.agreement.pooled_spread`, the verdict's),
  and ``clear_outlier/max`` / ``outlier_on_average/max`` with the largest range instead (the
  rules before seeds 40-49);

it writes how many label-noise clients each finds and how many healthy clients it flags.

``--test contribution``: the contribution test on the server's ``update_norm`` (log scale, flat
weights, lowest = weak) under each guard: ``outlier_in_last_round``, ``outlier_overall`` (median
over the rounds), ``clear_outlier`` (both: the rule up to ``5bb41d8``) and ``outlier_on_average``
(the verdict's since ``9b4ffb0``); it writes how many few-data and free-rider clients each finds
and how many healthy clients it flags.

Both at the verdict's level (2.5 %) and each test alone (the verdict combines them and adds the
``diverged`` rules). docs/cme-validation.md ("How the rule got here") quotes the output of:

    python benchmarks/cme_label_rules.py runs/cme-validation --seeds 0-29
    python benchmarks/cme_label_rules.py runs/cme-validation --seeds 0-49 --test contribution
    python benchmarks/cme_label_rules.py runs/cme-validation --seeds 50-69

``--test misses`` lists what the verdicts of a finished study (its ``clients.csv``) got wrong.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(mixed|same-model)-s(\d+)-(fault-free|c(\d+)-([a-z-]+)-[0-9.e+]+)$")
RESULTS = Path(__file__).resolve().parent / "results" / "cme-validation"


#: The conditions of the issue's bar (the study's other levels and kinds are left out by default).
CONDITIONS = ("fault-free", "few-data-0.1", "label-noise-0.5", "free-rider-0.01", "diverge-10000")


def load(
    out: Path, seeds: range, conditions: tuple[str, ...] = CONDITIONS
) -> dict[str, tuple[str, int, int | None, str, list[dict[str, Any]]]]:
    """``{run: (style, seed, faulty client, fault kind, metrics rows)}`` of the study's main runs."""
    runs = {}
    for d in sorted((out / "runs").iterdir()):
        m = NAME.match(d.name)
        rec = d / "study_record.json"
        if not m or not rec.exists() or int(m.group(2)) not in seeds:
            continue
        if not any(d.name.endswith("-" + c) for c in conditions):
            continue
        runs[d.name] = (
            m.group(1),
            int(m.group(2)),
            int(m.group(4)) if m.group(4) else None,
            m.group(5) or "none",
            _rows(json.loads(rec.read_text())),
        )
    return runs


def _rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The record's metrics rows, with the probe's update norms filled in where the server did
    not write them (runs recorded before it did: the same ``||w_returned - w_sent||``)."""
    from fedsim.study.federation import with_update_norms

    return with_update_norms(record["metrics"], record["updates"]) if record.get("updates") else record["metrics"]


def _on_average_max(test: Any) -> bool:
    """``outlier_on_average`` with the largest range of any model group as the spread."""
    import numpy as np

    from fedsim.analysis.agreement import round_weights

    if test.peers.shape[0] < 2 or len(test.own) == 0:
        return False
    w = round_weights(len(test.own), test.weighting).astype(np.float64)
    spread = np.max(np.stack([np.ptp(test.peers, axis=0), *(np.ptp(g, axis=0) for g in test.spread_groups)]), axis=0)
    return float(np.average(test.own - test.peers.max(axis=0), weights=w)) > float(np.average(spread, weights=w))


def _clear_outlier_max(test: Any) -> bool:
    """``clear_outlier`` with the largest range of any model group as the spread."""
    import numpy as np

    if test.peers.shape[0] < 2 or len(test.own) == 0:
        return False

    def beyond(x: float, peers: np.ndarray, spreads: list[float]) -> bool:
        spread = max([float(np.ptp(peers)), *spreads])
        return x - float(peers.max()) > spread if test.direction == "high" else float(peers.min()) - x > spread

    last = beyond(float(test.own[-1]), test.peers[:, -1], [float(np.ptp(g[:, -1])) for g in test.spread_groups])
    med = [float(np.ptp(np.median(g, axis=1))) for g in test.spread_groups]
    return last and beyond(float(np.median(test.own)), np.median(test.peers, axis=1), med)


def score(runs: dict[str, Any], statistic: str, weighting: str, guard: str, level: float = 0.025) -> dict[tuple[str, str], list[int]]:
    """``{(style, "label-noise" | "healthy"): [flagged, clients]}``; other faulty clients are skipped."""
    from fedsim.analysis import agreement as ag

    check = {
        "none": lambda test: True,
        "clear_outlier": ag.clear_outlier,
        "outlier_on_average": ag.outlier_on_average,
        "outlier_on_average/max": _on_average_max,
        "clear_outlier/max": _clear_outlier_max,
    }[guard]
    out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for style, _, faulty, kind, rows in runs.values():
        for client, test in ag.label_tests(rows, statistic, weighting=weighting).items():
            if client == faulty and kind != "label-noise":
                continue
            hit = test is not None and test.p_value <= level and check(test)
            cell = out[(style, "label-noise" if client == faulty else "healthy")]
            cell[0] += int(hit)
            cell[1] += 1
    return out


#: Guards of the label test in ``--test label``'s table; ``none`` is the rank-sum test alone (how
#: often its p-value alone is <= the level: its calibration on healthy clients).
LABEL_GUARDS = ("none", "clear_outlier/max", "clear_outlier", "outlier_on_average/max", "outlier_on_average")

#: Guards of the contribution test scored by ``--test contribution``.
CONTRIBUTION_GUARDS = ("outlier_in_last_round", "outlier_overall", "clear_outlier", "outlier_on_average")
#: The faults the contribution test is meant to find.
CONTRIBUTION_FAULTS = ("few-data", "free-rider")


def score_contribution(runs: dict[str, Any], guard: str, level: float = 0.025) -> dict[tuple[str, str], list[int]]:
    """``{(style, "few-data" | "free-rider" | "healthy"): [flagged, clients]}`` of the update-norm
    test under ``guard`` (:data:`CONTRIBUTION_GUARDS`); other faulty clients are skipped."""
    from fedsim.analysis import agreement as ag

    if guard not in CONTRIBUTION_GUARDS:
        raise ValueError(f"unknown guard {guard!r}; valid: {', '.join(CONTRIBUTION_GUARDS)}")
    check = getattr(ag, guard)
    out: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for style, _, faulty, kind, rows in runs.values():
        for client, test in ag.update_tests(rows).items():
            if client == faulty and kind not in CONTRIBUTION_FAULTS:
                continue
            hit = test is not None and test.p_value <= level and check(test)
            cell = out[(style, kind if client == faulty else "healthy")]
            cell[0] += int(hit)
            cell[1] += 1
    return out


def _contribution_table(runs: dict[str, Any], head: str) -> list[str]:
    cols = [(s, k) for s in ("same-model", "mixed") for k in (*CONTRIBUTION_FAULTS, "healthy")]
    lines = [head, "", "| guard | " + " | ".join(f"{s} {k}" for s, k in cols) + " |", "|---|" + "---|" * len(cols)]
    for guard in CONTRIBUTION_GUARDS:
        res = score_contribution(runs, guard)
        lines.append(f"| {guard} | " + " | ".join(f"{res[c][0]}/{res[c][1]}" if res[c][1] else "-" for c in cols) + " |")
    return lines


def misses_report(runs: dict[str, Any], clients_csv: Path, head: str) -> list[str]:
    """What the verdicts in ``clients_csv`` (the study's ``clients.csv``) got wrong, for the runs
    in ``runs``: every faulty client not detected (``weak``; ``diverged`` for ``diverge``) with its
    verdict and, for label noise, its label test (:data:`fedsim.analysis.cme.LABEL_STATISTIC`,
    :data:`~fedsim.analysis.cme.LABEL_WEIGHTING`: p-value, whether the effect-size guard held, the
    first round from which it was the highest of its peers); every healthy client flagged ``weak``
    or ``diverged``, counted by the statistic behind it, and how many were the same client of the
    same seed (the same data partition) flagged in more than one run of the seed. The label test
    is recomputed under the current rule, so ``clients_csv`` should come from the same rule.

    docs/cme-validation.md quotes ``python benchmarks/cme_label_rules.py runs/cme-validation
    --seeds 70-89 --test misses``."""
    import csv

    from fedsim.analysis import agreement as ag
    from fedsim.analysis.cme import LABEL_STATISTIC, LABEL_WEIGHTING

    rows = [r for r in csv.DictReader(clients_csv.open()) if r["condition"] in runs and r.get("cme_verdict")]
    if not rows:
        raise SystemExit(f"{clients_csv} has no verdicts of the selected runs; run the study on these seeds first")
    lines = [head, "", "Faulty clients not detected:", ""]
    for r in rows:
        if r["is_faulty"] != "True" or r["cme_verdict"] == ("diverged" if r["fault_kind"] == "diverge" else "weak"):
            continue
        line = f"- {r['condition']}: client {r['client']} ({r['model']}) `{r['cme_verdict']}` ({r['cme_verdict_statistic']})"
        if r["fault_kind"] == "label-noise":
            test = ag.label_tests(runs[r["condition"]][4], LABEL_STATISTIC, weighting=LABEL_WEIGHTING).get(int(r["client"]))
            if test is not None:
                top = test.ranks >= test.clients
                since = next((int(test.rounds[i]) for i in range(len(top)) if top[i:].all()), None)
                line += (
                    f"; label test p = {test.p_value:.3g}, guard {'held' if ag.outlier_on_average(test) else 'not met'}, "
                    f"highest in {test.top_rounds} of {len(test.ranks)} rounds"
                    + (f", from round {since} on" if since is not None else ", not in the last round")
                )
        lines.append(line)
    if lines[-1] == "":
        lines.append("- none")
    flagged = [r for r in rows if r["is_faulty"] != "True" and r["cme_verdict"] in ("weak", "diverged")]
    healthy = sum(r["is_faulty"] != "True" for r in rows)
    lines += ["", f"Healthy clients flagged: {len(flagged)} of {healthy}", ""]
    by: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in flagged:
        by[(r["style"], r["cme_verdict"], r["cme_verdict_statistic"])] += 1
    lines += [f"- {style}: {n} `{verdict}` by {stat}" for (style, verdict, stat), n in sorted(by.items())]
    same: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in flagged:
        same[(r["style"], r["seed"], r["client"])] += 1
    repeats = {k: n for k, n in same.items() if n > 1}
    lines.append(
        f"- the same client of the same seed flagged in more than one run: {len(repeats)} "
        + ("(" + ", ".join(f"{s} seed {seed} client {c} x{n}" for (s, seed, c), n in sorted(repeats.items())) + ")" if repeats else "")
    )
    return lines


def study_parser(description: str, example: str) -> argparse.ArgumentParser:
    """The arguments the study's re-scoring scripts share: the study folder, ``--seeds``,
    ``--conditions`` and ``--write`` (``example``: a results file name for the help)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("out", type=Path, help="the study's --out folder")
    p.add_argument("--seeds", default="0-29", help="A-B: the seeds to score (default: %(default)s)")
    p.add_argument("--conditions", default=",".join(CONDITIONS), help="run-name suffixes to score (default: %(default)s)")
    p.add_argument("--write", type=Path, help=f"also write the table as markdown (e.g. {RESULTS / example})")
    return p


def load_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, tuple[str, int, int | None, str, list[dict[str, Any]]]]:
    """:func:`load` of the runs :func:`study_parser`'s arguments select; a usage error when none is finished."""
    lo, _, hi = args.seeds.partition("-")
    runs = load(args.out, range(int(lo), int(hi or lo) + 1), tuple(args.conditions.split(",")))
    if not runs:
        p.error(f"no finished study runs for seeds {args.seeds} in {args.out / 'runs'}")
    return runs


def main(argv: list[str] | None = None) -> int:
    from fedsim.analysis.agreement import WEIGHTINGS, has_statistic

    p = study_parser(__doc__.split("\n\n")[0], "label-rules.md")
    p.add_argument(
        "--test",
        choices=("label", "contribution", "misses"),
        default="label",
        help="which weak test to score, or 'misses': what the study's verdicts got wrong (default: %(default)s)",
    )
    p.add_argument("--clients", type=Path, help="--test misses: the study's clients.csv with the verdicts (default: OUT/clients.csv)")
    args = p.parse_args(argv)
    runs = load_args(p, args)
    command = f"python benchmarks/cme_label_rules.py {args.out} --seeds {args.seeds}"
    if args.test == "misses":
        clients = args.clients or args.out / "clients.csv"
        head = f"Verdict misses and false alarms, seeds {args.seeds} of `{args.out}` ({len(runs)} runs; `{command} --test misses`)"
        return _emit(misses_report(runs, clients, head), args.write)
    if args.test == "contribution":
        head = f"Contribution test guards (update norm), seeds {args.seeds} of `{args.out}` ({len(runs)} runs; `{command} --test contribution`)"
        return _emit(_contribution_table(runs, head), args.write)
    rows_all = [r for v in runs.values() for r in v[4]]
    stats = ["train_loss"] + (["received_loss"] if has_statistic(rows_all, "received_loss") else [])
    cols = [(s, k) for s in ("same-model", "mixed") for k in ("label-noise", "healthy")]
    lines = [
        f"Label test variants, seeds {args.seeds} of `{args.out}` ({len(runs)} runs; `{command}`)",
        "",
        "| statistic | weighting | guard | " + " | ".join(f"{s} {k}" for s, k in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for stat in stats:
        for weighting in WEIGHTINGS:
            for guard in LABEL_GUARDS:
                res = score({k: v for k, v in runs.items() if has_statistic(v[4], stat)}, stat, weighting, guard)
                cells = [f"{res[c][0]}/{res[c][1]}" if res[c][1] else "-" for c in cols]
                lines.append(f"| {stat} | {weighting} | {guard} | " + " | ".join(cells) + " |")
    return _emit(lines, args.write)


def _emit(lines: list[str], write: Path | None) -> int:
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
