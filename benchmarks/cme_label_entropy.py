"""Does the loss *beyond the model's own predictive entropy* tell wrong labels from hard data?

The label test's false alarms are mostly healthy clients whose data the shared model fits worse
(docs/cme-validation.md). The idea: on a client's training images with the labels it holds, the
cross-entropy ``CE = mean(-log p(y_i | x_i))`` equals the model's mean predictive entropy
``H = mean(-sum_c p(c | x_i) log p(c | x_i))`` in expectation when the labels are distributed as
the model predicts; wrong labels raise ``CE`` but not ``H``, while images the model is unsure of
raise both. So ``CE - H`` should be high for wrong labels and not for hard data.

This script measures it on a finished study without retraining: for every main run of the
selected seeds it rebuilds each client's model *after the last round* from the run's
``checkpoint.safetensors`` (the client's private tensors plus the final shared ones: the model a
client would receive next) and evaluates it on the client's training split as the client holds
it (label noise included). Per statistic (``CE``, ``H``, ``CE - H``, error rate) it writes

* for each label-noise run: the noisy client's value minus the highest other client's of its
  model (positive = it is the highest, the margin by which),
* for each fault-free run: the highest client's value minus the second highest of its model (how
  far a healthy client stands out on its own).

A statistic that separates the two needs the first clearly above the second.

docs/cme-validation.md quotes the output of:

    python benchmarks/cme_label_entropy.py runs/cme-validation --seeds 50-69
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cme_label_rules import RESULTS, _emit

NAME = re.compile(r"^(mixed|same-model)-s(\d+)-(fault-free|c(\d+)-label-noise-0\.5)$")
#: The statistics this script compares, in its table's order.
STATISTICS = ("CE", "H", "CE - H", "error")


def label_statistics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``CE``, ``H``, ``CE - H`` and the error rate of ``logits`` (``(n, classes)``) against ``labels``."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    ce = float(-logp[np.arange(len(labels)), labels].mean())
    h = float(-(np.exp(logp) * logp).sum(axis=1).mean())
    return {"CE": ce, "H": h, "CE - H": ce - h, "error": float((logits.argmax(axis=1) != labels).mean())}


def margins(values: Sequence[float], models: Sequence[str], faulty: int | None) -> float | None:
    """The faulty client's value minus the highest other of its model; with ``faulty=None`` the
    highest value of the largest model group minus its second highest. ``None`` without a peer."""
    if faulty is not None:
        peers = [v for k, v in enumerate(values) if k != faulty and models[k] == models[faulty]]
        return values[faulty] - max(peers) if peers else None
    group = max(set(models), key=lambda m: (list(models).count(m), m))
    ranked = sorted(v for v, m in zip(values, models, strict=True) if m == group)
    return ranked[-1] - ranked[-2] if len(ranked) >= 2 else None


def run_statistics(run_dir: Path) -> tuple[list[str], list[dict[str, float]]]:
    """Each client's model name and :func:`label_statistics` after the run's last round."""
    import torch
    from safetensors.torch import load_file

    from fedsim.clients.tasks.brain_mri import BrainMRITask
    from fedsim.clients.tasks.registry import get_task
    from fedsim.clients.training import to_input
    from fedsim.config import ResolvedConfig

    cfg = ResolvedConfig.from_json_dict(json.loads((run_dir / "config.json").read_text()))
    task = get_task(cfg.task)
    if not isinstance(task, BrainMRITask):
        raise SystemExit(f"{run_dir}: task {cfg.task!r}; this script reads the study's brain_mri runs only")
    ckpt = load_file(str(run_dir / "checkpoint.safetensors"))
    shared = {k.removeprefix("global/"): v for k, v in ckpt.items() if k.startswith("global/")}
    names, stats = list(cfg.client_models()), []
    for pid, name in enumerate(names):
        model = task.build_model(name, cfg)
        state = {k.removeprefix(f"client/{pid}/"): v for k, v in ckpt.items() if k.startswith(f"client/{pid}/")}
        model.load_state_dict({**state, **shared}, strict=False)
        model.eval()
        train, _ = task._client_datasets(cfg, pid, None, cfg.rounds)  # the training split as the client holds it
        x, y = train.tensors
        with torch.no_grad():
            logits = torch.cat([model(to_input(x[i : i + 128], torch.device("cpu"))) for i in range(0, len(x), 128)])
        stats.append(label_statistics(logits.double().numpy(), y.numpy()))
    return names, stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the study's --out folder")
    p.add_argument("--seeds", default="50-69", help="A-B: the seeds to score (default: %(default)s)")
    p.add_argument("--styles", default="same-model,mixed", help="scenario styles (default: %(default)s)")
    p.add_argument("--write", type=Path, help=f"also write the table as markdown (e.g. {RESULTS / 'label-entropy.md'})")
    args = p.parse_args(argv)
    lo, _, hi = args.seeds.partition("-")
    seeds, styles = range(int(lo), int(hi or lo) + 1), args.styles.split(",")
    found: dict[tuple[str, str], dict[str, list[float]]] = {}
    for d in sorted((args.out / "runs").iterdir()):
        m = NAME.match(d.name)
        if not m or m.group(1) not in styles or int(m.group(2)) not in seeds or not (d / "checkpoint.safetensors").exists():
            continue
        faulty = int(m.group(4)) if m.group(4) else None
        models, stats = run_statistics(d)
        kind = "label-noise" if faulty is not None else "fault-free"
        for s in STATISTICS:
            margin = margins([c[s] for c in stats], models, faulty)
            if margin is not None:
                found.setdefault((m.group(1), kind), {}).setdefault(s, []).append(margin)
    if not found:
        p.error(f"no finished label-noise or fault-free runs with a checkpoint for seeds {args.seeds} in {args.out / 'runs'}")
    command = f"python benchmarks/cme_label_entropy.py {args.out} --seeds {args.seeds} --styles {args.styles}"
    lines = [
        f"Loss beyond predictive entropy after the last round, seeds {args.seeds} (`{command}`)",
        "",
        (
            "Label-noise runs: the noisy client minus the highest other of its model; fault-free runs: the highest client "
            "minus the second highest (same model). Min / median / max over the runs."
        ),
        "",
        "| style | runs | statistic | label-noise margin | fault-free margin | label-noise runs above every fault-free margin |",
        "|---|---|---|---|---|---|",
    ]
    for style in styles:
        noisy, free = found.get((style, "label-noise"), {}), found.get((style, "fault-free"), {})
        for s in STATISTICS:
            a, b = noisy.get(s, []), free.get(s, [])
            above = f"{sum(x > max(b) for x in a)}/{len(a)}" if a and b else "-"
            lines.append(f"| {style} | {len(a)} + {len(b)} | {s} | {_range(a)} | {_range(b)} | {above} |")
    return _emit(lines, args.write)


def _range(values: Sequence[float]) -> str:
    return f"{min(values):+.3f} / {float(np.median(values)):+.3f} / {max(values):+.3f}" if values else "-"


if __name__ == "__main__":
    sys.exit(main())
