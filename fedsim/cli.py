"""The ``fedsim`` command line: ``fedsim run`` simulates a federation on Ray; ``fedsim list``
shows the registered choices.

Every flag maps onto a :class:`fedsim.config.RunConfig` field; unset flags come from the task's
profile and the scenario. Errors in names, numbers or data are reported before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.analysis.cme import NULL_COVERAGE, NULL_SAMPLES, SATURATION_PATIENCE, SIMILARITY_THRESHOLD
from fedsim.config import OPTION_FIELDS, SCENARIOS, RunConfig

if TYPE_CHECKING:
    from fedsim.analysis.report import AnalysisResult, AnalysisSettings


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="simulate a federated study in Flower's Simulation Engine (Ray)")
    d = RunConfig()
    run.add_argument("--task", default=d.task, help="client task (default: %(default)s; see 'fedsim list')")
    run.add_argument("--scenario", type=int, default=d.scenario, help="CME paper Table 1 scenario 1-4 (default: %(default)s)")
    run.add_argument("--profile", default=d.profile, help="tiny | quick | paper (default: %(default)s)")
    run.add_argument("--rounds", type=int, help="federated rounds (default: from profile)")
    run.add_argument("--local-epochs", type=int, help="local epochs per round (default: from profile)")
    run.add_argument(
        "--clients", type=int, help=f"number of hospitals (default: {d.clients}; with --partition sites the number of site folders)"
    )
    run.add_argument(
        "--fraction-train",
        type=float,
        default=d.fraction_train,
        metavar="F",
        help="client sampling: share of the clients that train in each round, max(1, floor(F x clients)), seeded and "
        "recorded in metrics.jsonl (default: %(default)s = all)",
    )
    run.add_argument(
        "--clients-per-round", type=int, default=d.clients_per_round, metavar="K", help="client sampling: K clients per round (0 = all)"
    )
    run.add_argument("--strategy", default=d.strategy, help="aggregation strategy (default: %(default)s)")
    run.add_argument("--partition", help="partitioner (default: from scenario: iid or identical)")
    run.add_argument("--alpha", type=float, default=d.alpha, help="dirichlet concentration (default: %(default)s)")
    run.add_argument("--fractions", type=_floats, default=(), help="client shares for --partition sizes, e.g. 0.5,0.3,0.2")
    run.add_argument("--data-dir", default="", help="real image folder (Kaggle layout or class-per-folder); default: synthetic cohort")
    run.add_argument("--seed", type=int, default=d.seed)
    run.add_argument("--out", default="", help="output folder (default: runs/<task>-s<scenario>-<profile>-<time>)")
    run.add_argument("--image-size", type=int, help="image side in pixels (default: from profile)")
    run.add_argument("--num-samples", type=int, help="synthetic cohort size (default: from profile)")
    run.add_argument("--batch-size", type=int)
    run.add_argument("--lr", type=float, help="client Adam learning rate (default: from profile)")
    run.add_argument(
        "--models",
        type=_names,
        default=(),
        help="one model per client, overriding the scenario, e.g. small_cnn,small_cnn,small_cnn; one name applies to every client",
    )
    run.add_argument("--server-model", default="", help="server model (default: resnet50, or the clients' model if all equal)")
    run.add_argument("--site-styles", action="store_true", help="give each hospital its own synthetic scanner style")
    run.add_argument(
        "--strategy-option",
        dest="strategy_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="strategy option, repeatable, e.g. mu=0.1 (fedprox) or eta=0.05 (fedadam); see 'fedsim list'",
    )
    run.add_argument(
        "--dp-noise",
        type=float,
        metavar="Z",
        help="differential privacy noise multiplier (= --strategy-option noise=Z; dp_fixed, dp_adaptive)",
    )
    run.add_argument(
        "--dp-clip", type=float, metavar="C", help="differential privacy clip norm (= --strategy-option clip=C; dp_fixed, dp_adaptive)"
    )
    run.add_argument(
        "--client-cpus",
        type=float,
        help="CPUs (torch threads) per simulated client (default: picked for this machine and the models: one client at a time "
        "with every CPU, or one single-thread client per CPU where that trains faster; recorded in config.json)",
    )
    run.add_argument("--client-gpus", type=float, help="GPUs per simulated client (default: 1 if CUDA is available, else 0)")
    run.add_argument(
        "--ray-address",
        default=d.ray_address,
        metavar="HOST:PORT",
        help="join this existing Ray cluster (its head's address, or 'auto') instead of starting Ray here; see docs/deployment.md",
    )
    run.add_argument("--node-timeout", type=float, default=d.node_timeout, help="seconds to wait for client nodes (default: %(default)s)")
    run.add_argument(
        "--round-timeout",
        type=float,
        default=d.round_timeout,
        help="seconds to wait for the clients' replies in a round (default: %(default)s)",
    )
    run.add_argument(
        "--task-option",
        dest="task_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task-specific option, repeatable (see 'fedsim list')",
    )
    run.add_argument(
        "--fault",
        dest="faults",
        action="append",
        default=[],
        metavar="CLIENT:KIND[:LEVEL]",
        help="inject a fault into one client, repeatable: few-data, label-noise, lazy, free-rider, diverge, "
        "crash, hang, nan (e.g. 1:few-data:0.1, 1:crash:2; see docs/cme-validation.md, docs/reliability.md)",
    )
    run.add_argument(
        "-v", "--verbose", action="store_true", help="log every client's metrics and local epochs, and Flower's and Ray's messages"
    )
    rel = run.add_argument_group("reliability (docs/reliability.md)")
    rel.add_argument(
        "--min-clients",
        type=int,
        default=d.min_clients,
        help="a round goes on if at least this many clients deliver; failed clients are logged and recorded "
        "(default: all; a client error stops the run)",
    )
    rel.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="write RUN_DIR/checkpoint.safetensors every N rounds and after the last; 0 = never (default: %(default)s)",
    )
    rel.add_argument(
        "--resume",
        metavar="RUN_DIR",
        default="",
        help="continue an interrupted run from its last checkpoint, with its config (other flags must agree with it)",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        default="",
        help="settings from a TOML file (the Flower run-config keys, e.g. local-epochs = 2) or a run's config.json "
        "(to repeat that run; give --out); flags given as well override the file",
    )
    run.add_argument(
        "--tracker",
        default=d.tracker,
        help="experiment tracker: tensorboard (RUN_DIR/tb/), mlflow (extra fedsim[mlflow]; RUN_DIR/mlflow.db or --tracking-uri) "
        "or none (default: %(default)s)",
    )
    run.add_argument("--tracking-uri", default=d.tracking_uri, help="MLflow tracking URI for --tracker mlflow (default: RUN_DIR/mlflow.db)")
    cme = run.add_argument_group("CME recording (conversational memory elements, CME paper section 3.1)")
    cme.add_argument("--cme", action="store_true", help="record per-epoch CMEs (relative weight changes) for 'fedsim analyze'")
    cme.add_argument(
        "--cme-layers",
        type=_names,
        default=(),
        help="name patterns of layers whose full CME matrix is archived (default: the task's, e.g. head.fc2.weight)",
    )
    cme.add_argument(
        "--cme-threshold",
        type=float,
        default=d.cme_threshold,
        help="weights with |w| below this are masked out of CME statistics (default: %(default)s)",
    )
    cme.add_argument(
        "--cme-max-size",
        type=int,
        default=d.cme_max_size,
        help="larger CME matrices are subsampled (seeded) to at most this many rows and columns (default: %(default)s)",
    )
    cme.add_argument("--cme-biases", action="store_true", help="also record 1-D bias vectors")

    an = sub.add_parser("analyze", help="CME convergence analysis of a run: verdicts per client, figures, summary.json, report.md")
    an.add_argument("run_dir", metavar="RUN_DIR", help="a 'fedsim run' output folder")
    an.add_argument("--out", default=None, help="output folder (default: RUN_DIR/analysis)")
    an.add_argument("--layer", default=None, help="CME matrix layer for covariance maps (default: the run's first, e.g. head.fc2.weight)")
    an.add_argument(
        "--similarity",
        type=float,
        default=SIMILARITY_THRESHOLD,
        help="optional extra floor for the saturation round's map similarity, on top of the permutation null and the noise ceiling (default: %(default)s, none)",
    )
    an.add_argument(
        "--patience",
        type=int,
        default=SATURATION_PATIENCE,
        help="consecutive unchanged rounds that define saturation (default: %(default)s)",
    )
    an.add_argument(
        "--null-samples", type=int, default=NULL_SAMPLES, help="permutations / noise draws behind every null band (default: %(default)s)"
    )
    an.add_argument(
        "--coverage",
        type=float,
        default=NULL_COVERAGE,
        help="central coverage of the null bands, 0.9 = 5-95 %% quantiles (default: %(default)s)",
    )
    an.add_argument("--seed", type=int, default=0, help="seed of the null bands' permutations and draws (default: %(default)s)")

    ex = sub.add_parser(
        "export", help="write a run's metrics.jsonl in another format (CSV: one row per client per round, plus the global model)"
    )
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a 'fedsim run' output folder")
    ex.add_argument("--csv", action="store_true", required=True, help="write CSV (long format)")
    ex.add_argument("--out", default=None, help="output file (default: RUN_DIR/metrics.csv)")

    co = sub.add_parser("compare", help="compare runs: a metric vs round (mean and 95%% interval over seeds) and a table of final metrics")
    co.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="'fedsim run' output folders")
    co.add_argument(
        "--metric",
        default=None,
        help="metric to compare, e.g. accuracy or test_loss (default: the task's primary metric, on the test splits)",
    )
    co.add_argument(
        "--by", default="strategy", help="what tells the runs apart in the figure: strategy, scenario or model (default: %(default)s)"
    )
    co.add_argument("--out", required=True, help="output folder for compare.png and compare.md")

    sub.add_parser("list", help="list tasks, scenarios, models, strategies and partitioners")
    ce = sub.add_parser("certs", help="make a local CA, the SuperLink's TLS certificate and SuperNode key pairs (secured deployment)")
    ce.add_argument("out", metavar="DIR", help="folder for ca.crt, server.pem/.key and node<k>/.pub (refused if it holds ca.key)")
    ce.add_argument(
        "--host",
        dest="hosts",
        action="append",
        default=[],
        help="address the SuperLink is reached at, repeatable (IP or DNS name; default: 127.0.0.1 and localhost)",
    )
    ce.add_argument("--nodes", type=int, default=3, help="SuperNode key pairs to make (default: %(default)s)")
    _add_study_parser(sub)
    return parser


#: The closing summary lists each client of the last round up to this many, else mean and range.
SUMMARY_CLIENT_LINES = 10

#: Flags a resumed run may change: they do not change its results.
RESUME_MAY_CHANGE = ("node_timeout", "round_timeout", "checkpoint_every", "ray_address", "tracker", "tracking_uri")


def _config_fields(args: argparse.Namespace) -> dict[str, object]:
    from fedsim.config import parse_key_values

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "config", "verbose")}
    for key in OPTION_FIELDS:
        if key in fields:
            fields[key] = parse_key_values(fields[key])
    if "faults" in fields:
        fields["faults"] = tuple(fields["faults"])
    if "clients" in fields and fields["clients"] is None:  # not given: the site folders', else RunConfig's default
        del fields["clients"]
        if fields.get("partition") == "sites" and fields.get("data_dir"):
            from fedsim.data.sites import site_names

            fields["clients"] = len(site_names(str(fields["data_dir"])))
    dp = [(key, str(value)) for key, flag in (("noise", "dp_noise"), ("clip", "dp_clip")) if (value := fields.pop(flag, None)) is not None]
    if dp:
        from fedsim.config import ConfigError

        if fields.get("strategy") not in ("dp_fixed", "dp_adaptive"):
            raise ConfigError(f"--dp-noise / --dp-clip need --strategy dp_fixed or dp_adaptive, got {fields.get('strategy')!r}")
        fields["strategy_options"] = (*fields.get("strategy_options", ()), *dp)
    return fields


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(**_config_fields(args))  # type: ignore[arg-type]


def _given_flags(argv: Sequence[str]) -> argparse.Namespace:
    """The ``fedsim run`` flags the user actually gave (defaults suppressed)."""
    parser = build_parser()
    run = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]
    for action in run._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return parser.parse_args(argv)


def _resume_config(run_dir: str, argv: Sequence[str]) -> RunConfig:
    """The config of the run in ``run_dir`` (its ``config.json``), with the allowed changes from
    the given flags; any other flag that differs is an error naming the keys."""
    from fedsim.config import ConfigError
    from fedsim.rundir import RunDir

    rd = RunDir(run_dir).open_existing()
    stored = RunConfig.from_json_dict(rd.read_config())
    given = _config_fields(_given_flags(argv))
    if given.get("out") and Path(str(given["out"])).resolve() != rd.path:
        raise ConfigError(f"--out {given['out']} differs from --resume {rd.path}; a resumed run writes where it was")
    given.pop("out", None)
    merged = dataclasses.replace(stored, **given, out=str(rd.path))  # type: ignore[arg-type]
    differ = [k for k in given if k not in RESUME_MAY_CHANGE and getattr(merged, k) != getattr(stored, k)]
    if differ:
        was = ", ".join(f"{k}={getattr(stored, k)!r}" for k in differ)
        now = ", ".join(f"{k}={getattr(merged, k)!r}" for k in differ)
        raise ConfigError(
            f"--resume: the run was made with {was}; this command gives {now}. A resumed run keeps its config: drop those flags "
            f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_MAY_CHANGE)} may change)"
        )
    from fedsim.server.checkpoint import check_resumable

    check_resumable(rd, int(merged.rounds or 0))  # before Ray starts
    return merged


def _config_with_file(path: str, argv: Sequence[str]) -> RunConfig:
    """The config in ``path`` (:func:`fedsim.configfile.load_config_file`) with the flags given on
    the command line on top."""
    from fedsim.configfile import load_config_file

    return dataclasses.replace(load_config_file(path), **_config_fields(_given_flags(argv)))  # type: ignore[arg-type]


def _cmd_export(args: argparse.Namespace) -> None:
    from fedsim.analysis.runs import write_csv

    out = write_csv(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"fedsim: {out}")


def _cmd_compare(args: argparse.Namespace) -> None:
    from fedsim.analysis.compare import compare_runs

    res = compare_runs([Path(d) for d in args.run_dirs], Path(args.out), metric=args.metric, by=args.by)
    print(f"fedsim: compared {len(args.run_dirs)} runs on {res.metric} by {res.by}: {res.figure}, {res.table}")
    print(res.markdown)


def _option_fields(options_type: type) -> str:
    return ", ".join(f"{f.name.replace('_', '-')}={f.default!r}" for f in dataclasses.fields(options_type))


def _cmd_list() -> None:
    from fedsim.clients.tasks import TASKS
    from fedsim.data.partition import list_partitioners
    from fedsim.models import list_models
    from fedsim.strategies import STRATEGIES

    print("tasks:", ", ".join(TASKS.names()))
    for name in TASKS.names():
        task = TASKS.get(name)
        print(f"  {name}: profiles {', '.join(task.profiles)}; models {', '.join(task.model_choices())}")
        if task.options_type is not None:
            print(f"    --task-option: {_option_fields(task.options_type)}")
    print("scenarios:")
    for s in SCENARIOS.values():
        print(f"  {s.number}: {s.description} ({s.partition}; clients {', '.join(s.client_models)}; server {s.server_model})")
    print("models:", ", ".join(list_models()))
    print("strategies:", ", ".join(STRATEGIES.names()))
    for name in STRATEGIES.names():
        entry = STRATEGIES.get(name)
        print(f"  {name}: {entry.summary}")
        if entry.options_type is not None:
            print(f"    --strategy-option: {_option_fields(entry.options_type)}")
    print("partitioners:", ", ".join(list_partitioners()))
    from fedsim.tracking import TRACKERS

    print("trackers:", ", ".join(TRACKERS.names()))
    for name in TRACKERS.names():
        print(f"  {name}: {TRACKERS.get(name).summary}")


def _cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fedsim._logging import enable_console_logging, set_verbose
    from fedsim.clients.tasks import get_task
    from fedsim.rundir import METRICS_FILE, RunDir, default_out_dir
    from fedsim.server.app import RunInterrupted
    from fedsim.simulation import run_simulation

    set_verbose(bool(getattr(args, "verbose", False)))
    enable_console_logging()
    if args.resume:
        if args.config:
            from fedsim.config import ConfigError

            raise ConfigError("--resume takes the run's own config; drop --config")
        cfg = _resume_config(args.resume, argv)
        out = Path(cfg.out)
    else:
        cfg = _config_with_file(args.config, argv) if args.config else _config_from_args(args)
        out = Path(cfg.out or default_out_dir(cfg.task, cfg.scenario, cfg.profile)).resolve()
        RunDir(out).ensure_free().check_writable()  # refuse an existing run or an unwritable folder before Ray starts
        cfg = dataclasses.replace(cfg, out=str(out))
    try:
        run_simulation(cfg, resume=bool(args.resume))
    except (RunInterrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, RunInterrupted) else signal.SIGINT
        print(f"fedsim: {_interrupted_message(out, signal.Signals(signum).name)}", file=sys.stderr)
        return 128 + int(signum)
    rows = RunDir(out).read_metrics()
    if not rows:
        raise RuntimeError(f"the run wrote no metrics to {out / METRICS_FILE}")
    print(f"\nfedsim: {len(rows)} rounds finished; outputs in {out}")
    for line in closing_summary(rows[-1], get_task(cfg.task).primary_metric, out / METRICS_FILE):
        print(line)
    return 0


def closing_summary(last: dict[str, Any], metric: str, metrics_file: Path) -> list[str]:
    """The lines ``fedsim run`` prints about the last round: one per client up to
    :data:`SUMMARY_CLIENT_LINES` clients, else mean and range of the train and local-test metric;
    then the global model's metrics, when there are any."""
    lines = []
    if len(last["clients"]) > SUMMARY_CLIENT_LINES:  # a large federation: mean and range, not one line per client
        for split in ("train", "local test"):
            values = [c[key] for c in last["clients"] if (key := f"{split.split()[-1]}_{metric}") in c]
            if values:
                lines.append(
                    f"  {len(values)} clients of round {last['round']}: {split} {metric} mean {sum(values) / len(values):.3f}"
                    f" range {min(values):.3f}-{max(values):.3f} (every client in {metrics_file})"
                )
    else:
        for c in last["clients"]:
            lines.append(
                f"  client {c['client']} {c['model']:<13} train {metric} {c.get('train_' + metric, float('nan')):.3f}"
                f"  local test {metric} {c.get('test_' + metric, float('nan')):.3f}"
            )
    if last.get("global"):
        lines.append(f"  global model: {json.dumps(last['global'])}")
    return lines


def _interrupted_message(out: Path, signame: str) -> str:
    """One line: what is saved and the command that continues the run."""
    from fedsim.rundir import RunDir
    from fedsim.server.checkpoint import checkpoint_round

    rd = RunDir(out)
    if not (rd.path / "config.json").exists():
        return f"stopped by {signame} before the run started; nothing was written"
    saved = checkpoint_round(rd)
    rows = len(rd.read_metrics())
    if saved is None:
        return f"stopped by {signame} after {rows} rounds in {out}; no checkpoint was written yet, so the run cannot be resumed"
    rounds = "round 1 is" if saved == 1 else f"rounds 1-{saved} are"
    return f"stopped by {signame}; {rounds} saved in {out} (checkpoint of round {saved}); continue with: fedsim run --resume {out}"


def _cmd_certs(args: argparse.Namespace) -> None:
    from fedsim.config import ConfigError
    from fedsim.server.secure import make_credentials

    out = Path(args.out).resolve()
    if (out / "ca.key").exists():
        raise ConfigError(f"{out} already holds a CA (ca.key); choose another folder (existing keys are never overwritten)")
    if args.nodes < 0:
        raise ConfigError(f"--nodes must be >= 0, got {args.nodes}")
    creds = make_credentials(out, tuple(args.hosts) or ("127.0.0.1", "localhost"), args.nodes)
    print(f"fedsim: credentials in {out} (keep ca.key offline; node<k> stays on SuperNode k)")
    print(f"  flower-superlink --ssl-ca-certfile {creds.ca_cert} --ssl-certfile {creds.server_cert} --ssl-keyfile {creds.server_key} \\")
    print("      --enable-supernode-auth --disable-runtime-dependency-installation --database link.db")
    for k, key in enumerate(creds.node_keys):
        print(f"  flwr supernode register {creds.node_public_key(k)} NAME")
        print(f"  flower-supernode --root-certificates {creds.ca_cert} --auth-supernode-private-key {key} --superlink SERVER:8000 \\")
        print(f"      --node-config 'partition-id={k} num-partitions={len(creds.node_keys)}'")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from fedsim._logging import enable_console_logging
    from fedsim.analysis.report import AnalysisSettings

    enable_console_logging()
    try:
        settings = AnalysisSettings(args.layer, args.similarity, args.patience, args.null_samples, args.coverage, args.seed)
    except ValueError as exc:
        from fedsim.config import ConfigError

        raise ConfigError(str(exc)) from None
    res = _analyze_atomically(Path(args.run_dir), Path(args.out) if args.out else None, settings)
    metric = res.summary["primary_metric"]
    print(f"\nfedsim: analysis of {res.summary['run_dir']} written to {res.out_dir}")
    if not res.has_cme:
        print("  this run has no CME records (run 'fedsim run ... --cme' to record them): curves and final metrics only")
    for c in res.summary["clients"]:
        final = c.get(f"final_test_{metric}")
        tail = f"final test {metric} {final:.3f}" if final is not None else ""
        if res.has_cme:
            sat = c["saturation_round"] if c["saturation_round"] is not None else "not reached"
            print(f"  client {c['client']} {c['model']:<13} {c['verdict'].upper():<12} {c['reason']}")
            print(f"  {'':<22} saturation round {sat}; {c['mean_dead_fraction']:.0%} of {c['layer']} in dead units; {tail}")
        else:
            print(f"  client {c['client']} {c['model']:<13} {tail}")
    print(f"  report: {res.out_dir / 'report.md'}")


def _analyze_atomically(run_dir: Path, out: Path | None, settings: AnalysisSettings) -> AnalysisResult:
    """``analyze_run`` into a temporary sibling folder, then swapped into place: the analysis
    folder holds a whole analysis or the previous one, never a partial one."""
    import os
    import shutil
    import tempfile

    from fedsim.analysis.report import ANALYSIS_DIR, analyze_run
    from fedsim.rundir import RunDir

    rd = RunDir(run_dir).open_existing()
    final = (out or rd.path / ANALYSIS_DIR).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        mask = os.umask(0o022)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        res = analyze_run(rd.path, tmp, settings)
        old = tmp.with_suffix(".old") if final.exists() else None
        if old is not None:
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataclasses.replace(res, out_dir=final, figures=[final / f.relative_to(tmp) for f in res.figures])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)  # --help ends here, before anything heavy is imported
    from fedsim.cme import CMEArchiveError
    from fedsim.config import ConfigError
    from fedsim.data.folder import DataLayoutError
    from fedsim.registry import UnknownNameError
    from fedsim.rundir import CorruptRunError, RunDirExistsError, RunDirUnwritableError
    from fedsim.server.checkpoint import CheckpointError

    try:
        if args.command == "list":
            _cmd_list()
        elif args.command == "certs":
            _cmd_certs(args)
        elif args.command == "analyze":
            _cmd_analyze(args)
        elif args.command == "study":
            _cmd_study(args)
        elif args.command == "export":
            _cmd_export(args)
        elif args.command == "compare":
            _cmd_compare(args)
        else:
            return _cmd_run(args, argv)
    except (
        ConfigError, UnknownNameError, DataLayoutError, RunDirExistsError, RunDirUnwritableError, FileNotFoundError, CheckpointError,
        CorruptRunError,
    ) as exc:  # fmt: skip
        print(f"fedsim: error: {exc}", file=sys.stderr)
        return 2
    except CMEArchiveError as exc:
        print(f"fedsim: CME archive error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        from fedsim.server.app import ClientFailedError, NodeTimeoutError

        if isinstance(exc, ClientFailedError | NodeTimeoutError):
            print(f"fedsim: run failed: {exc}", file=sys.stderr)
            return 1
        raise
    return 0


def _add_study_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("study", help="run a validation study of many in-process federations (no Ray): tables of per-client scores")
    st.add_argument("study", choices=["cme-validation"], help="which study: cme-validation (issue 10: CME statistics vs injected faults)")
    st.add_argument("--size", default="default", choices=["tiny", "default"], help="tiny (tests, ~1 min) or default (<= 45 min on 2 cores)")
    st.add_argument("--out", default="runs/cme-validation", help="output folder; a study there is resumed (default: %(default)s)")
    st.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the size's, 10 for default)")
    st.add_argument("--loo", choices=["none", "faulty", "full"], help="leave-one-out runs (default: faulty)")
    st.add_argument("--workers", type=int, help="parallel processes (default: CPUs / threads)")
    st.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    st.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; run nothing")


def _cmd_study(args: argparse.Namespace) -> None:
    import logging
    import os

    from fedsim._logging import enable_console_logging
    from fedsim.study import cme_validation as cv

    enable_console_logging()
    logging.getLogger("fedsim.study").setLevel(logging.INFO)
    size = cv.size_for(args.size, args.seeds, args.loo)
    workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads)
    plan = cv.plan_study(size)
    minutes = cv.estimate_cpu_seconds(plan) / 60
    print(f"fedsim: {size.name} study, {len(plan.jobs)} federations, ~{minutes / workers:.0f} min with {workers} workers (idle machine)")
    if args.dry_run:
        return
    res = cv.run_study(args.out, size, workers=workers, threads=args.threads)
    print(f"\nfedsim: {len(res.rows)} client rows in {res.out / 'clients.csv'}; AUROC per statistic in {res.out / 'auroc.csv'}")


if __name__ == "__main__":
    sys.exit(main())
