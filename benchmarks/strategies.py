"""Benchmark of fedsim's strategies on CPU: heterogeneity, faulty clients, differential privacy.

Three sections, every run seeded and repeated for ``--seeds`` (default 0 1 2), all on the
synthetic brain-MRI task with ``small_cnn`` clients at 32 px, through the real ServerApp and
ClientApp on :class:`~fedsim.server.inprocess.InProcessGrid` (one torch thread):

* ``heterogeneity``: 4 hospitals with their own scanner style (``--site-styles``) and a Dirichlet
  (alpha 0.3) label split; equal_avg, fedavg, fedprox, fedadam, fedyogi, fedbn, fedper. Per client:
  the *local* test accuracy (its own model on its own test split, ``metrics.jsonl``) and the *global*
  test accuracy (its own model, i.e. for FedBN/FedPer its private layers plus the shared rest, on
  the held-out global test set, evaluated here after the run);
* ``faults``: 7 hospitals (iid), one of them (client 0) faulty: ``label-noise:0.5``,
  ``free-rider`` or ``diverge``; fedavg vs fedmedian, fedtrimmedavg, krum and bulyan (``f = 1``):
  the server's global test accuracy and whether the run survived (the server stops a run when a
  client returns non-finite parameters);
* ``privacy``: 4 hospitals (iid), ``dp_fixed`` at two noise multipliers vs the same equal-weighted
  average without DP; global test accuracy vs the epsilon spent (delta 1e-5).

    python benchmarks/strategies.py                     # default size, all sections (~15 min here)
    python benchmarks/strategies.py --size tiny         # smoke test (~1-2 min)
    python benchmarks/strategies.py --tables-only       # re-render the tables and figure from the JSON

Writes ``benchmarks/results/strategies-<size>.json`` (every run; finished runs are reused when the
script is started again), ``benchmarks/results/strategies-<size>.md`` (the tables),
``benchmarks/results/strategies-privacy-<size>.png``, and (except ``--size tiny``) the tables into
``docs/strategies.md`` between the ``benchmark-tables`` (default) or ``benchmark-tables-<size>`` markers.
``--size long`` (600 images, 12 rounds x 2 local epochs, about 4x the default's cost) was run for the
heterogeneity section only: ``python benchmarks/strategies.py --size long --sections heterogeneity``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.config import RunConfig  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "strategies.md"

#: size -> (images, rounds, local epochs); 32 px, lr 2e-3, batch 16 throughout.
SIZES: dict[str, tuple[int, int, int]] = {"tiny": (160, 2, 1), "default": (480, 8, 1), "long": (600, 12, 2)}
LR = 2e-3
HETEROGENEITY = ["equal_avg", "fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedper"]
ROBUST = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "bulyan"]
FAULTS = ["label-noise:0.5", "free-rider", "diverge"]
NOISE = [0.3, 1.0]
CLIP = 2.0
DELTA = 1e-5


@dataclasses.dataclass(frozen=True)
class Job:
    section: str
    strategy: str
    seed: int
    clients: int
    options: tuple[tuple[str, str], ...] = ()
    fault: str = ""
    styles: bool = False

    @property
    def key(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.section}/{self.strategy}[{opts}]/fault={self.fault or '-'}/seed={self.seed}"


def jobs(seeds: Sequence[int], sections: Sequence[str]) -> list[Job]:
    out: list[Job] = []
    for seed in seeds:
        if "heterogeneity" in sections:
            out += [Job("heterogeneity", s, seed, 4, styles=True) for s in HETEROGENEITY]
        if "faults" in sections:
            for fault in FAULTS:
                for s in ROBUST:
                    opts = (("num-malicious", "1"),) if s in ("krum", "bulyan") else ()
                    out.append(Job("faults", s, seed, 7, opts, fault=f"0:{fault}"))
        if "privacy" in sections:
            out.append(Job("privacy", "equal_avg", seed, 4))
            out += [Job("privacy", "dp_fixed", seed, 4, (("noise", str(z)), ("clip", str(CLIP)), ("delta", str(DELTA)))) for z in NOISE]
    return out


def config(job: Job, size: str, out: Path) -> RunConfig:
    images, rounds, epochs = SIZES[size]
    return RunConfig(
        task="brain_mri", scenario=2, profile="tiny", models=("small_cnn",) * job.clients, clients=job.clients,
        num_samples=images, rounds=rounds, local_epochs=epochs, lr=LR, image_size=32, seed=job.seed,
        strategy=job.strategy, strategy_options=job.options, faults=(job.fault,) if job.fault else (),
        site_styles=job.styles, partition="dirichlet" if job.styles else "iid", alpha=0.3, out=str(out),
    )  # fmt: skip


def run(job: Job, size: str, work: Path) -> dict[str, Any]:
    """One federation in this process; per-client local and global accuracies of each client's own model."""
    import torch

    from fedsim.clients.app import STATE_KEY, app
    from fedsim.clients.tasks import get_task, resolve_config
    from fedsim.rundir import RunDir
    from fedsim.server.app import ClientFailedError, run_server
    from fedsim.server.inprocess import InProcessGrid
    from fedsim.study.federation import quiet_logs

    out = work / job.key.replace("/", "_").replace("[", "(").replace("]", ")").replace(",", "+").replace("=", "-")
    cfg = resolve_config(config(job, size, out))
    grid = InProcessGrid(app, cfg.clients, num_threads=1)
    t0 = time.perf_counter()
    error, result = None, None
    with quiet_logs():
        try:
            result = run_server(grid, cfg)
        except ClientFailedError as exc:  # includes NonFiniteUpdateError: the run stopped
            error = f"{type(exc).__name__}: {exc}"
    wall = time.perf_counter() - t0
    rows = RunDir(out).read_metrics()
    last = rows[-1] if rows else None
    rec: dict[str, Any] = {
        "key": job.key, **dataclasses.asdict(job), "size": size, "survived": error is None, "error": error,
        "rounds_done": len(rows), "rounds": cfg.rounds, "wall_s": round(wall, 2),
        "server_global_accuracy": (last.get("global") or {}).get("accuracy") if last else None,
        "local_accuracy": [c.get("test_accuracy") for c in last["clients"]] if last else [],
    }  # fmt: skip
    if result is not None:
        last_round = max(result.train_metrics_clientapp, default=None)
        eps = result.train_metrics_clientapp[last_round].get("dp-epsilon") if last_round is not None else None
        rec["epsilon"] = float(eps) if isinstance(eps, int | float) else None
        task = get_task(cfg.task)
        shared = result.arrays.to_torch_state_dict()
        per_client = []
        for _nid, ctx in sorted(grid.contexts.items()):
            pid = int(ctx.node_config["partition-id"])
            model = task.build_model(cfg.model_for(pid), cfg)
            own = model.state_dict()
            state = {**ctx.state.array_records[STATE_KEY].to_torch_state_dict(), **{k: v.to(own[k].dtype) for k, v in shared.items()}}
            model.load_state_dict(state)
            res = task.evaluate_global(model, cfg, torch.device("cpu"))
            per_client.append(None if res is None else float(res.metrics["accuracy"]))
        rec["global_accuracy"] = per_client
    return rec


# ---------------------------------------------------------------------- tables and figure


def _sections_flag(sections: Sequence[str]) -> str:
    return "" if not sections or set(sections) == {"heterogeneity", "faults", "privacy"} else " --sections " + " ".join(sections)


def _ms(values: Sequence[float | None]) -> str:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return "n/a"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _select(records: list[dict[str, Any]], **kw: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r.get(k) == v for k, v in kw.items())]


def tables(records: list[dict[str, Any]], size: str, seeds: Sequence[int], sections: Sequence[str] = ()) -> str:
    images, rounds, epochs = SIZES[size]
    lines = [
        (
            f"Size `{size}`: synthetic brain MRI, `small_cnn`, 32 px, {images} images, {rounds} rounds x {epochs} local epoch(s), "
            f"lr {LR:g}, seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. "
            f"Made by `python benchmarks/strategies.py{'' if size == 'default' else ' --size ' + size}{_sections_flag(sections)}`; every run is in "
            f"`benchmarks/results/strategies-{size}.json`."
        ),
        "",
    ]
    het = _select(records, section="heterogeneity")
    if het:
        lines += [
            (
                "**Heterogeneity** (4 hospitals, own scanner style each, Dirichlet 0.3 labels). *local*: each client's own model "
                "on its own test split; *global*: each client's own model on the held-out global test set (the same model for "
                "every client except with FedBN/FedPer). Means over clients, then over seeds; *worst local*: the lowest "
                "client's local accuracy."
            ),
            "",
            "| strategy | local accuracy | global accuracy | worst local |",
            "| --- | --- | --- | --- |",
        ]
        for s in HETEROGENEITY:
            rs = _select(het, strategy=s)
            lines.append(
                f"| {s} | {_ms([float(np.mean(r['local_accuracy'])) for r in rs])} | "
                f"{_ms([float(np.mean(r['global_accuracy'])) for r in rs if r.get('global_accuracy')])} | "
                f"{_ms([float(np.min(r['local_accuracy'])) for r in rs])} |"
            )
        lines += ["", "Per client (mean over seeds), local / global:", ""]
        n = max(len(r["local_accuracy"]) for r in het)
        lines += ["| strategy | " + " | ".join(f"client {k}" for k in range(n)) + " |", "| --- |" + " --- |" * n]
        for s in HETEROGENEITY:
            rs = _select(het, strategy=s)
            cells = []
            for k in range(n):
                loc = [r["local_accuracy"][k] for r in rs if len(r["local_accuracy"]) > k]
                glo = [r["global_accuracy"][k] for r in rs if len(r.get("global_accuracy") or []) > k]
                cells.append(f"{np.mean(loc):.2f} / {np.mean(glo):.2f}" if loc and glo else "n/a")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    flt = _select(records, section="faults")
    if flt:
        lines += [
            (
                "**Faults** (7 hospitals, iid; client 0 faulty). Server's global test accuracy after the last round, "
                "and how many seeds' runs survived (a stopped run has no final accuracy)."
            ),
            "",
            "| strategy | " + " | ".join(FAULTS) + " |",
            "| --- |" + " --- |" * len(FAULTS),
        ]
        for s in ROBUST:
            cells = []
            for fault in FAULTS:
                rs = _select(flt, strategy=s, fault=f"0:{fault}")
                ok = [r for r in rs if r["survived"]]
                cells.append(f"{_ms([r['server_global_accuracy'] for r in ok])} ({len(ok)}/{len(rs)} survived)")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        stopped = [r for r in flt if not r["survived"]]
        if stopped:
            first = stopped[0]
            lines += [
                "",
                f"Stopped runs: {len(stopped)}; e.g. `{first['key']}` in round {first['rounds_done'] + 1}: {first['error'][:220]}",
            ]
        lines.append("")
    prv = _select(records, section="privacy")
    if prv:
        lines += [
            (
                f"**Privacy** (4 hospitals, iid; server-side clipping at C = {CLIP:g}, equal weights, delta {DELTA:g}; "
                "epsilon from fedsim's RDP accountant, the exact value in brackets)."
            ),
            "",
            "| run | noise multiplier | epsilon | global accuracy |",
            "| --- | --- | --- | --- |",
        ]
        base = _select(prv, strategy="equal_avg")
        lines.append(f"| equal_avg (no DP) | 0 | inf | {_ms([r['server_global_accuracy'] for r in base])} |")
        for z in NOISE:
            rs = [r for r in _select(prv, strategy="dp_fixed") if dict(r["options"]).get("noise") == str(z)]
            if rs:
                from fedsim.strategies.privacy import gaussian_epsilon_exact

                exact = gaussian_epsilon_exact(z, rs[0]["rounds"], DELTA)
                lines.append(
                    f"| dp_fixed | {z:g} | {rs[0]['epsilon']:.3g} ({exact:.3g}) | {_ms([r['server_global_accuracy'] for r in rs])} |"
                )
        lines.append("")
    return "\n".join(lines)


def figure(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prv = _select(records, section="privacy")
    if not prv:
        return
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    base = [r["server_global_accuracy"] for r in _select(prv, strategy="equal_avg")]
    ax.axhline(float(np.mean(base)), color="k", ls="--", lw=1, label=f"no DP (mean of {len(base)} seeds)")
    for z in NOISE:
        rs = [r for r in _select(prv, strategy="dp_fixed") if dict(r["options"]).get("noise") == str(z)]
        if rs:
            eps = rs[0]["epsilon"]
            acc = [r["server_global_accuracy"] for r in rs]
            ax.scatter([eps] * len(acc), acc, alpha=0.5)
            ax.errorbar(
                [eps], [np.mean(acc)], yerr=[np.std(acc, ddof=1) if len(acc) > 1 else 0], fmt="o", capsize=4, label=f"dp_fixed z={z:g}"
            )
    ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="chance (4 classes)")
    ax.set_xscale("log")
    ax.set_xlabel("epsilon spent (delta 1e-5, RDP)")
    ax.set_ylabel("global test accuracy")
    ax.set_title("Accuracy vs privacy (4 hospitals, server-side clipping)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_doc(text: str, size: str) -> None:
    """Put ``text`` between the size's markers in docs/strategies.md (``benchmark-tables`` for the
    default size, ``benchmark-tables-<size>`` for the others)."""
    name = "benchmark-tables" if size == "default" else f"benchmark-tables-{size}"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = DOC.read_text(encoding="utf-8")
    if start not in doc or end not in doc:
        raise SystemExit(f"{DOC} lacks the markers {start} / {end}")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{start}\n{text}\n{end}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sections", nargs="+", choices=["heterogeneity", "faults", "privacy"], default=["heterogeneity", "faults", "privacy"])
    ap.add_argument("--tables-only", action="store_true", help="re-render tables and figure from the stored JSON")
    ap.add_argument("--no-doc", action="store_true", help="do not write the tables into docs/strategies.md")
    args = ap.parse_args(argv)
    if len(args.seeds) < 3 and args.size == "default":
        print("note: fewer than 3 seeds", file=sys.stderr)
    store = RESULTS / f"strategies-{args.size}.json"
    records: dict[str, dict[str, Any]] = {}
    if store.exists():
        records = {r["key"]: r for r in json.loads(store.read_text(encoding="utf-8"))["runs"]}
    todo = jobs(args.seeds, args.sections)
    if not args.tables_only:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fedsim-strategies-") as tmp:
            for i, job in enumerate(todo, 1):
                if job.key in records:
                    continue
                rec = run(job, args.size, Path(tmp))
                records[job.key] = rec
                print(
                    f"[{i}/{len(todo)}] {job.key}: survived {rec['survived']}, global {rec['server_global_accuracy']}, "
                    f"local {np.round(rec['local_accuracy'], 2).tolist()}, {rec['wall_s']} s",
                    flush=True,
                )
                store.write_text(json.dumps({"size": args.size, "runs": list(records.values())}, indent=1) + "\n", encoding="utf-8")
        print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    chosen = [records[j.key] for j in todo if j.key in records]
    text = tables(chosen, args.size, args.seeds, args.sections)
    (RESULTS / f"strategies-{args.size}.md").write_text(text + "\n", encoding="utf-8")
    figure(chosen, RESULTS / f"strategies-privacy-{args.size}.png")
    if args.size != "tiny" and not args.no_doc:
        write_doc(text, args.size)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
