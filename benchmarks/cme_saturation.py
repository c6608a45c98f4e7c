"""Saturation ground truth for the CME analysis (issue 10, docs/cme-validation.md).

Three kinds of federation, each run in-process (:class:`fedsim.server.inprocess.InProcessGrid`,
no Ray) with CMEs recorded and analysed by ``fedsim analyze``'s own code
(:func:`fedsim.analysis.report.analyze_run`):

* ``lr-to-zero``: the learning rate decays by ``--decay`` per federation epoch (task option
  ``lr-decay``), so training stops moving: the run **must saturate**;
* ``shift``: with site styles, every client's training images switch to the next client's scanner
  style at round ``--shift-round`` (task option ``shift-round``): the run **must not saturate
  before the shift**;
* ``normal``: plain runs; each client's saturation round is compared with the plateau of its local
  test loss (the first round from which the loss stays within the band its last three rounds span,
  i.e. no later round improves on it by more than the final rounds' own scatter).

Writes ``saturation.json`` and ``saturation.md`` into ``--out`` and prints the table.

    python benchmarks/cme_saturation.py --out runs/cme-saturation            # default: 3 + 3 + 5 runs
    python benchmarks/cme_saturation.py --out /tmp/sat --seeds 1 --rounds 5   # a quick check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.analysis.report import analyze_run
from fedsim.clients.app import app
from fedsim.clients.tasks import resolve_config
from fedsim.config import RunConfig
from fedsim.rundir import RunDir
from fedsim.server.app import run_server
from fedsim.server.inprocess import InProcessGrid
from fedsim.study.federation import quiet_logs


def plateau_round(losses: list[float], tail: int = 3) -> int:
    """First round (1-based) from which no later round's loss is lower by more than the scatter of
    the last ``tail`` rounds."""
    x = np.asarray(losses, dtype=np.float64)
    scatter = float(np.ptp(x[-tail:])) if len(x) >= tail else 0.0
    for j in range(len(x)):
        if x[j] <= float(np.min(x[j:])) + scatter:
            return j + 1
    return len(x)


def run(name: str, cfg: RunConfig, out: Path, reanalyze: bool = False) -> dict[str, Any]:
    run_dir = out / name
    trained = (run_dir / "metrics.jsonl").exists() and len(RunDir(run_dir).read_metrics()) == cfg.rounds
    if not trained:
        resolved = resolve_config(cfg.__class__(**{**cfg.__dict__, "out": str(run_dir), "cme": True}))
        t0 = time.perf_counter()
        with quiet_logs():
            run_server(InProcessGrid(app, resolved.clients, num_threads=1), resolved)
        print(f"{name}: trained in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if reanalyze or not trained or not (run_dir / "analysis" / "summary.json").exists():
        t0 = time.perf_counter()
        with quiet_logs():
            analyze_run(run_dir)
        print(f"{name}: analysed in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    rows = RunDir(run_dir).read_metrics()
    clients = []
    for c in summary["clients"]:
        losses = [next(x["test_loss"] for x in r["clients"] if x["client"] == c["client"]) for r in rows]
        clients.append(
            {
                "client": c["client"],
                "saturation_round": c["saturation_round"],
                "plateau_round": plateau_round(losses),
                "verdict": c["verdict"],
                "similarity": c["statistics"]["similarity"][1:],
                "null_upper": [b[1] for b in c["statistics"]["similarity_band"][1:]],
                "ceiling_lower": [b[0] for b in c["statistics"].get("ceiling_band", [[None, None]] * len(rows))[1:]],
            }
        )
    return {"name": name, "clients": clients, "rounds": len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/cme-saturation"))
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the lr-to-zero and shift runs (normal: seeds + 2)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--decay", type=float, default=0.6, help="lr-decay per federation epoch of the lr-to-zero runs")
    ap.add_argument("--shift-round", type=int, default=6)
    ap.add_argument("--reanalyze", action="store_true", help="analyse finished runs again (after the analysis changed; no retraining)")
    args = ap.parse_args()
    base = {"profile": "tiny", "models": ("small_cnn",) * 3, "rounds": args.rounds, "local_epochs": 2, "image_size": 32, "num_samples": 600}
    results: dict[str, list[dict[str, Any]]] = {"lr-to-zero": [], "shift": [], "normal": []}
    for s in range(args.seeds):
        cfg = RunConfig(seed=s, task_options=(("lr-decay", str(args.decay)),), **base)
        results["lr-to-zero"].append(run(f"lr-to-zero-s{s}", cfg, args.out, args.reanalyze))
        cfg = RunConfig(seed=s, site_styles=True, task_options=(("shift-round", str(args.shift_round)),), **base)
        results["shift"].append(run(f"shift-s{s}", cfg, args.out, args.reanalyze))
    for s in range(args.seeds + 2):
        results["normal"].append(run(f"normal-s{s}", RunConfig(seed=s, **base), args.out, args.reanalyze))

    def sats(kind: str) -> list[int | None]:
        return [c["saturation_round"] for r in results[kind] for c in r["clients"]]

    lr0, shift, normal = sats("lr-to-zero"), sats("shift"), sats("normal")
    pairs = [(c["saturation_round"], c["plateau_round"]) for r in results["normal"] for c in r["clients"]]
    within = [s is not None and abs(s - p) <= 1 for s, p in pairs]

    def sim_range(kind: str, first: int, last: int) -> list[float]:
        """min / median / max of the consecutive-map similarities of rounds first..last (all clients)."""
        v = [
            x
            for r in results[kind]
            for c in r["clients"]
            for j, x in enumerate(c["similarity"], start=2)
            if first <= j <= last and x is not None
        ]
        return [round(float(np.min(v)), 2), round(float(np.median(v)), 2), round(float(np.max(v)), 2)] if v else []

    late = (args.rounds // 2 + 1, args.rounds)
    summary: dict[str, Any] = {
        "similarity_late_rounds": {k: sim_range(k, *late) for k in results},
        "similarity_before_shift": sim_range("shift", 2, args.shift_round - 1),
        "similarity_from_shift": sim_range("shift", args.shift_round, args.rounds),
        "null_upper_range": [
            round(min(u for r in results["normal"] for c in r["clients"] for u in c["null_upper"] if u is not None), 3),
            round(max(u for r in results["normal"] for c in r["clients"] for u in c["null_upper"] if u is not None), 3),
        ],
        "ceiling_lower_range": {
            k: [
                round(float(q), 2)
                for q in np.quantile(
                    [u for r in results[k] for c in r["clients"] for u in c["ceiling_lower"] if u is not None], [0, 0.5, 1]
                )
            ]
            for k in results
        },
        "settings": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in base.items()},
            "decay": args.decay,
            "shift_round": args.shift_round,
        },
        "lr_to_zero_saturated": f"{sum(s is not None for s in lr0)}/{len(lr0)} clients",
        "lr_to_zero_rounds": lr0,
        "shift_saturated_before_shift": f"{sum(s is not None and s < args.shift_round for s in shift)}/{len(shift)} clients",
        "shift_rounds": shift,
        "normal_saturated": f"{sum(s is not None for s in normal)}/{len(normal)} clients",
        "normal_saturation_vs_plateau": pairs,
        "normal_within_1_round": f"{sum(within)}/{len(within)} clients",
        "runs": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "saturation.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "| condition | what must hold | result | saturation rounds (per client) |",
        "|---|---|---|---|",
        f"| lr-to-zero (lr x {args.decay}/epoch) | saturates | {summary['lr_to_zero_saturated']} saturated | {lr0} |",
        (
            f"| shift at round {args.shift_round} | no saturation before the shift | "
            f"{summary['shift_saturated_before_shift']} saturated before it | {shift} |"
        ),
        (
            f"| normal, {args.rounds} rounds | saturation within +-1 round of the test-loss plateau | "
            f"{summary['normal_within_1_round']} within; {summary['normal_saturated']} saturated | (saturation, plateau): {pairs} |"
        ),
    ]
    lines += [
        "",
        f"Consecutive-map similarity (off the diagonal), min / median / max over clients, rounds {late[0]}-{late[1]}: "
        + "; ".join(f"{k} {v}" for k, v in summary["similarity_late_rounds"].items())
        + f". Shift runs before the shift {summary['similarity_before_shift']}, from it {summary['similarity_from_shift']}."
        + f" Upper edge of the permutation null band (normal runs): {summary['null_upper_range']}."
        + " Lower edge of the noise ceiling (min / median / max): "
        + "; ".join(f"{k} {v}" for k, v in summary["ceiling_lower_range"].items())
        + ".",
    ]
    (args.out / "saturation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
