"""h3denet: anchor head vs heatmap head vs U-Net baseline on the synthetic CT cohort.

Runs ``fedsim run --task h3denet --profile PROFILE --models M,M,M`` for the three models (3 clients,
iid, seed 0; the Flower Simulation Engine on Ray, as a user would) and tabulates the global
model's metrics on the global test set after the last round, overall and on the incomplete cases,
plus the mean of the clients' local-test MRE, the wall time (config written -> final
parameters saved), and the final model's mean |error| per axis in voxels of the evaluated crop
next to that crop's spacing (how much of the error in mm is voxel size). A run folder that already holds a finished run is reused, not retrained.

    python benchmarks/h3denet_heads.py --profile quick --out-root runs/h3-heads
    python benchmarks/h3denet_heads.py --profile quick --recipe authors --models h3denet --out-root runs/h3-heads-quick-authors

Writes ``benchmarks/results/h3denet-<profile>.json`` (``h3denet-<profile>-<recipe>.json`` with
``--recipe``, which passes ``--task-option recipe=RECIPE`` to every run) and prints a Markdown table.
Both MRE conventions are recorded: pooled over landmarks (``mre``, ``sd``) and per case
(``mre-case``, ``sd-case``: the paper's).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

MODELS = ("h3denet", "h3denet_heatmap", "unet3d")
KEYS = ("mre", "sd", "mre-case", "sd-case", "sdr-2mm", "sdr-2.5mm", "sdr-3mm", "sdr-4mm")


def finished(run: Path, rounds: int | None) -> bool:
    metrics = run / "metrics.jsonl"
    if not (run / "global_params.safetensors").exists() or not metrics.exists():
        return False
    lines = metrics.read_text().splitlines()
    return rounds is None or len(lines) == rounds


def voxel_errors(run: Path, model: str) -> dict[str, list[float]]:
    """The final global model on the global test set: mean |error| per axis in voxels of the
    evaluated crop, and the mean evaluated spacing (mm) per axis."""
    import numpy as np
    import torch

    from fedsim.clients.tasks import get_task
    from fedsim.clients.tasks.h3denet import H3DENetTask
    from fedsim.config import ResolvedConfig
    from fedsim.rundir import RunDir

    rd = RunDir(run)
    cfg = ResolvedConfig.from_json_dict(rd.read_config())
    task = get_task("h3denet")
    assert isinstance(task, H3DENetTask)
    net = task.build_model(model, cfg)
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in rd.load_params().items()}, strict=False)
    _, idx = task.global_test(cfg)
    prepared, pred, _ = task.predict(net, task.cases(cfg, idx), cfg, torch.device("cpu"))
    err = np.abs(pred - np.stack([p.landmarks for p in prepared]))
    return {
        "mean_abs_error_voxels_xyz": [round(float(v), 3) for v in np.nanmean(err, (0, 1))],
        "mean_spacing_mm_xyz": [round(float(v), 3) for v in np.stack([p.spacing for p in prepared]).mean(0)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--rounds", type=int, default=None, help="override the profile's rounds")
    ap.add_argument("--out-root", default="runs/h3denet-heads")
    ap.add_argument("--recipe", choices=("paper", "authors"), default=None, help="pass --task-option recipe=RECIPE (default: none)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    args = ap.parse_args()
    root = Path(args.out_root)
    rows = {}
    for m in args.models.split(","):
        run = root / m
        cmd = [sys.executable, "-m", "fedsim.cli", "run", "--task", "h3denet", "--profile", args.profile,
               "--models", ",".join([m] * 3), "--out", str(run)]  # fmt: skip
        if args.recipe:
            cmd += ["--task-option", f"recipe={args.recipe}"]
        if args.rounds:
            cmd += ["--rounds", str(args.rounds)]
        if not finished(run, args.rounds):
            print("running", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        last = lines[-1]
        g = last["global"]
        rows[m] = {
            "command": " ".join(["fedsim", *cmd[3:]]),
            "rounds": last["round"],
            "global": {k: g[k] for k in KEYS} | {f"{k}-missing": g[f"{k}-missing"] for k in KEYS} | {"landmarks": g["landmarks"]},
            "global_mre_per_round": [r["global"]["mre"] for r in lines],
            "global_mre_case_per_round": [r["global"]["mre-case"] for r in lines],
            "clients_test_mre": [c["test_mre"] for c in last["clients"]],
            "clients_test_mre_case": [c["test_mre_case"] for c in last["clients"]],
            "clients_best_epoch_per_round": [[c.get("train_best_epoch") for c in r["clients"]] for r in lines],
            "wall_seconds": round((run / "global_params.safetensors").stat().st_mtime - (run / "config.json").stat().st_mtime, 1),
            **voxel_errors(run, m),
        }
    name = f"h3denet-{args.profile}" + (f"-{args.recipe}" if args.recipe else "")
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    doc = {"profile": args.profile, "recipe": args.recipe, "machine": platform.machine(), "models": rows}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}\n")
    print("| model | MRE per case +/- SD (mm) | MRE pooled +/- SD (mm) | SDR 2 / 2.5 / 3 / 4 mm (%) "
          "| incomplete cases: MRE per case +/- SD | pooled | SDR 4 mm | clients' local MRE per case | pooled | wall |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m, r in rows.items():
        g = r["global"]
        sdr = " / ".join(f"{g[f'sdr-{t}mm']:.1f}" for t in ("2", "2.5", "3", "4"))
        local_case = ", ".join(f"{v:.2f}" for v in r["clients_test_mre_case"])
        local = ", ".join(f"{v:.2f}" for v in r["clients_test_mre"])
        print(f"| `{m}` | {g['mre-case']:.2f} +/- {g['sd-case']:.2f} | {g['mre']:.2f} +/- {g['sd']:.2f} | {sdr} "
              f"| {g['mre-case-missing']:.2f} +/- {g['sd-case-missing']:.2f} | {g['mre-missing']:.2f} +/- {g['sd-missing']:.2f} "
              f"| {g['sdr-4mm-missing']:.1f} | {local_case} | {local} | {r['wall_seconds']:.0f} s |")  # fmt: skip
    for m, r in rows.items():
        print(f"{m}: mean |error| per axis {r['mean_abs_error_voxels_xyz']} voxels; spacing {r['mean_spacing_mm_xyz']} mm")


if __name__ == "__main__":
    main()
