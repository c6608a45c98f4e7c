"""aicnet3d: the quick-profile runs of ``docs/tasks/aicnet3d.md`` for one recipe.

Runs ``fedsim run --task aicnet3d --profile PROFILE --task-option recipe=RECIPE`` (3 clients, iid,
seed 0, ``aicnet3d_hemiretinal``; the Flower Simulation Engine on Ray, as a user would) once per
``--finetune-rounds`` value: ``0`` is run A (stage 1 only), ``4`` is run B (the last 4 rounds in
stage 2). For each run it records the global model's metrics on the global test set after every
round, the clients' mean training BCE (the BCE part of the recorded training loss) and
MSE(Grad-CAM, CARE) (stage-2 rounds), the final round's metrics, the clients' local-test AUC, the
clients' kept local epoch (early stopping), the global test set's composition and the wall time
(config written -> final parameters saved). A run folder that already holds a finished run is
reused, not retrained.

    python benchmarks/aicnet3d_quick.py --recipe paper --finetune-rounds 0,4 --out-root runs/aicnet3d-quick

Writes ``benchmarks/results/aicnet3d-<profile>-<recipe>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

PER_ROUND = ("auc", "accuracy", "balanced-accuracy")
W = 0.75  # consistency-weight (the task default; this script does not change it)
FINAL = ("loss", "auc", "accuracy", "balanced-accuracy", "sensitivity", "specificity", "f1")


def finished(run: Path, rounds: int | None) -> bool:
    metrics = run / "metrics.jsonl"
    if not (run / "global_params.safetensors").exists() or not metrics.exists():
        return False
    return rounds is None or len(metrics.read_text().splitlines()) == rounds


def test_set(run: Path) -> dict[str, int]:
    """Size and class counts of the run's global test set (from its config; no volume is generated)."""
    from fedsim.clients.tasks import get_task
    from fedsim.clients.tasks.aicnet3d import AICNet3DTask
    from fedsim.config import ResolvedConfig
    from fedsim.rundir import RunDir

    cfg = ResolvedConfig.from_json_dict(RunDir(run).read_config())
    task = get_task("aicnet3d")
    assert isinstance(task, AICNet3DTask)
    labels, idx = task.global_test(cfg)
    return {"volumes": len(idx), "glaucoma": int((labels[idx] == 1).sum()), "normal": int((labels[idx] == 0).sum())}


def summarise(run: Path) -> dict[str, Any]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]

    def mean(vals: list[float]) -> float | None:
        return round(sum(vals) / len(vals), 4) if vals else None

    per_round = []
    for r in lines:
        row = {"round": r["round"], **{k: r["global"][k] for k in PER_ROUND}, "stage": r["clients"][0].get("train_stage")}
        row["train_consistency_mean"] = mean([c["train_consistency"] for c in r["clients"] if "train_consistency" in c])
        # the BCE part of the training loss: loss = (1 - w) BCE + w MSE in stage 2 (w = 0.75, the default)
        row["train_bce_mean"] = mean([(c["train_loss"] - W * c.get("train_consistency", 0.0)) / (1 - W if "train_consistency" in c else 1)
                                      for c in r["clients"]])  # fmt: skip
        per_round.append(row)
    return {
        "rounds": last["round"],
        "global_per_round": per_round,
        "global_final": {k: last["global"][k] for k in FINAL},
        "clients_test_auc": [c["test_auc"] for c in last["clients"]],
        "clients_best_epoch_per_round": [[c.get("train_best_epoch") for c in r["clients"]] for r in lines],
        "global_test_set": test_set(run),
        "wall_seconds": round((run / "global_params.safetensors").stat().st_mtime - (run / "config.json").stat().st_mtime, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--recipe", choices=("paper", "authors"), default="paper")
    ap.add_argument("--finetune-rounds", default="0", help="comma-separated: one run per value (0 = stage 1 only)")
    ap.add_argument("--rounds", type=int, default=None, help="override the profile's rounds")
    ap.add_argument("--out-root", default="runs/aicnet3d-quick")
    args = ap.parse_args()
    root = Path(args.out_root) / args.recipe
    runs: dict[str, Any] = {}
    for k in (int(v) for v in args.finetune_rounds.split(",")):
        run = root / f"finetune-{k}"
        cmd = [sys.executable, "-m", "fedsim.cli", "run", "--task", "aicnet3d", "--profile", args.profile,
               "--task-option", f"recipe={args.recipe}", "--out", str(run)]  # fmt: skip
        if k:
            cmd += ["--task-option", f"finetune-rounds={k}"]
        if args.rounds:
            cmd += ["--rounds", str(args.rounds)]
        if not finished(run, args.rounds):
            print("running", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        runs[f"finetune-{k}"] = {"command": " ".join(["fedsim", *cmd[3:]]), **summarise(run)}
    out = Path(__file__).parent / "results" / f"aicnet3d-{args.profile}-{args.recipe}.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"profile": args.profile, "recipe": args.recipe, "machine": platform.machine(), "runs": runs}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}\n")
    names = list(runs)
    head = [f"{n}: {k}" for n in names for k in ("AUC", "accuracy", "bal. acc.")] + [f"{n}: train MSE" for n in names]
    print("| round | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for i in range(max(len(r["global_per_round"]) for r in runs.values())):
        cells = [f"{runs[n]['global_per_round'][i][k]:.3f}" for n in names for k in PER_ROUND]
        cells += [f"{c:.3f}" if (c := runs[n]["global_per_round"][i]["train_consistency_mean"]) is not None else "" for n in names]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    for n, r in runs.items():
        f = ", ".join(f"{k} {v:.3f}" for k, v in r["global_final"].items())
        print(f"{n}: final {f}; local AUC {r['clients_test_auc']}; test set {r['global_test_set']}; wall {r['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
