"""The registered trackers: ``tensorboard`` (PyTorch's SummaryWriter), ``mlflow`` (an optional
extra) and ``none``. Their libraries are imported only when a run opens them."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedsim.config import ConfigError
from fedsim.tracking.base import TRACKERS, Scalar, TrackerSpec, hparams

#: TensorBoard event files go here, inside the run directory.
TB_DIR = "tb"
#: The default MLflow store, inside the run directory (SQLite: MLflow's file store is deprecated).
MLFLOW_DB = "mlflow.db"
#: Artifacts of the default local MLflow store (fedsim logs none itself; MLflow needs a location).
MLFLOW_ARTIFACTS = "mlflow-artifacts"
#: The MLflow experiment every fedsim run is logged under.
MLFLOW_EXPERIMENT = "fedsim"


class NullTracker:
    """``--tracker none``: nothing beyond ``metrics.jsonl``."""

    def log(self, scalars: Sequence[Scalar]) -> None:
        pass

    def close(self, final: Mapping[str, float], ok: bool) -> None:
        pass


def _check_tensorboard() -> None:
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "--tracker tensorboard needs the tensorboard package (PyTorch's SummaryWriter writes its format): "
            "pip install tensorboard, or use --tracker none"
        )


class TensorBoardTracker:
    """Scalars into ``RUN_DIR/tb/`` with PyTorch's ``SummaryWriter`` (``tensorboard --logdir RUN_DIR/tb``).

    The config is written as text at the start and as HParams at the end, with the last round's
    per-client and global metrics as the HParams metrics (the scalar tags of that round). A
    resumed run's ``tb/`` is written afresh: the rounds kept from before the checkpoint are
    logged again from ``metrics.jsonl``, so no round appears twice."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = run_dir / TB_DIR
        if resumed and log_dir.exists():
            shutil.rmtree(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.hparams = hparams(config)
        self.writer.add_text("config", "```\n" + json.dumps(dict(config), indent=1, sort_keys=True, default=str) + "\n```", 0)

    def log(self, scalars: Sequence[Scalar]) -> None:
        for tag, step, value in scalars:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, final: Mapping[str, float], ok: bool) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        exp, ssi, sei = hparams_summaries(self.hparams, dict(final))
        writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei) if ok else (exp, ssi):  # the session-end record only for a finished run
            writer.add_summary(summary)
        self.writer.close()


def _check_mlflow() -> None:
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "--tracker mlflow needs MLflow, an optional extra: pip install 'fedsim[mlflow]' (installs mlflow-skinny); "
            "or use --tracker tensorboard / none"
        )


class MLflowTracker:
    """One MLflow run per fedsim run, in experiment ``fedsim``: the config as params, the
    versions, git commit and run directory as tags, and every scalar as a metric with its step.

    ``uri`` empty: a local SQLite store ``RUN_DIR/mlflow.db`` (browse it with
    ``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db``); otherwise the tracking URI given
    (a server, or any store MLflow accepts). A resumed run starts a new MLflow run holding the
    whole run (the kept rounds are logged again), tagged ``fedsim.resumed``."""

    def __init__(self, run_dir: Path, config: Mapping[str, Any], uri: str, resumed: bool) -> None:
        from mlflow import MlflowClient

        local = not uri
        self.uri = f"sqlite:///{run_dir / MLFLOW_DB}" if local else uri
        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            location = (run_dir / MLFLOW_ARTIFACTS).as_uri() if local else None
            exp_id = self.client.create_experiment(MLFLOW_EXPERIMENT, artifact_location=location)
        env = config.get("environment") or {}
        tags = {"fedsim.run_dir": str(run_dir), "fedsim.resumed": str(resumed).lower()}
        tags |= {f"fedsim.version.{k}": str(v) for k, v in (env.get("versions") or {}).items()}
        if env.get("git"):
            tags |= {"fedsim.git_commit": str(env["git"]["commit"]), "fedsim.git_dirty": str(env["git"]["dirty"]).lower()}
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in hparams(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, scalars: Sequence[Scalar]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(tag, value, now, step) for tag, step, value in scalars]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, final: Mapping[str, float], ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


TRACKERS.register("none")(TrackerSpec("none", "metrics.jsonl only", lambda: None, lambda run_dir, config, uri, resumed: NullTracker()))
TRACKERS.register("tensorboard")(
    TrackerSpec(
        "tensorboard",
        f"PyTorch's SummaryWriter into RUN_DIR/{TB_DIR}/ (tensorboard --logdir RUN_DIR/{TB_DIR})",
        _check_tensorboard,
        lambda run_dir, config, uri, resumed: TensorBoardTracker(run_dir, config, resumed),
    )
)
TRACKERS.register("mlflow")(
    TrackerSpec(
        "mlflow",
        f"MLflow (extra fedsim[mlflow]): RUN_DIR/{MLFLOW_DB}, or --tracking-uri",
        _check_mlflow,
        MLflowTracker,
    )
)
