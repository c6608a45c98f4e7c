"""The task scaffold: one seeded cohort split, per-round seeds and node-local data folders.

Every fedsim task works on one cohort that is split once, by ``cfg.seed`` only:

1. a global test set is held out for the server (:meth:`CohortTask.hold_out_global`: a seeded
   random share by default, stratified where a task needs it);
2. the rest is divided among the clients by the partitioner (``--partition``), balancing the
   cohort's *strata* (class labels, or another per-sample group such as "has a missing landmark");
3. every client splits its share into its parts (:meth:`CohortTask.split_client`: train / test,
   or train / validation / test).

A node started with its own ``data-dir`` (deployment) uses that whole folder as its share (step 3
only). With ``--partition sites`` the data folder holds one folder per site
(:mod:`fedsim.data.sites`): the sites' samples form the cohort, and step 2 gives every client the
rest of its own site (:meth:`CohortTask.site_layout`, one per task). Seeds of a round's shuffling and augmentation come from ``(seed, round, client)``
(:meth:`CohortTask.round_seed`, with a per-task salt). A task supplies its strata, its client
split, its data, one epoch of training and its evaluation.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from fedsim.clients.tasks.base import Task
from fedsim.config import ConfigError, ResolvedConfig
from fedsim.data.partition import PartitionParams, partition
from fedsim.faults import fault_of, few_data, noisy_labels


@dataclass(frozen=True)
class CohortSplit:
    """Cohort indices: the global test set and each client's parts (e.g. ``(train, test)``)."""

    global_test: np.ndarray
    clients: tuple[tuple[np.ndarray, ...], ...]


class CohortTask(Task):
    """A :class:`~fedsim.clients.tasks.base.Task` on one cohort split by seed (see the module docstring).

    Class attributes:

    * ``unit``: what a sample is called in messages (``"samples"``, ``"volumes"``, ``"cases"``);
    * ``min_global_test``: the smallest global test set of the default hold-out;
    * ``seed_salt``: extra entries of the per-round seed (tasks added later used one, so that their
      streams differ from the older tasks'; kept so results stay the same);
    * ``num_classes``: classes of a classification task (``label-noise`` draws among them); 0 for
      tasks whose targets are not classes (they override :meth:`train_labels`).

    Injected faults (:mod:`fedsim.faults`) that concern data apply here, so every task gets them:
    ``few-data`` in :meth:`client_split` (the first part, the training split, keeps a seeded share)
    and ``label-noise`` in :meth:`train_labels`.
    """

    unit: str = "samples"
    min_global_test: int = 1
    seed_salt: tuple[int, ...] = ()
    num_classes: int = 0

    # ------------------------------------------------------------ what a task supplies
    @abstractmethod
    def strata(self, cfg: ResolvedConfig, data_dir: str) -> np.ndarray:
        """One integer per cohort sample (class label or another group) that partitioners and
        stratified splits balance; cheap (no volume decoded or generated). ``data_dir`` is the
        data folder (``""``: the synthetic cohort)."""

    @abstractmethod
    def split_client(self, cfg: ResolvedConfig, idx: np.ndarray, strata: np.ndarray, who: str) -> tuple[np.ndarray, ...]:
        """Split one client's cohort indices ``idx`` into its parts (e.g. ``(train, test)``);
        raise :class:`~fedsim.config.ConfigError` naming ``who`` when they are too few."""

    def check_config(self, cfg: ResolvedConfig) -> None:
        """Task-specific checks of the resolved config before the split (e.g. image sizes)."""

    def site_layout(self, cfg: ResolvedConfig, data_dir: str) -> tuple[tuple[str, ...], np.ndarray] | None:
        """For a multi-site ``data_dir`` (``--partition sites``): the site names in client order and
        the site index of every cohort sample; cheap (file names only). ``None``: the task cannot
        read a multi-site folder (the default)."""
        return None

    # ------------------------------------------------------------ multi-site folders
    def site_names(self, cfg: ResolvedConfig) -> tuple[str, ...]:
        """The clients' site names (``--partition sites``; client ``k`` is site ``k``), else ``()``."""
        return self.sites_of(cfg)[0] if cfg.partition == "sites" else ()

    def sites_of(self, cfg: ResolvedConfig) -> tuple[tuple[str, ...], np.ndarray]:
        """The run's site names and each cohort sample's site, checked against ``cfg.clients``."""
        if not cfg.data_dir:
            raise ConfigError(
                "partition 'sites' reads the sites from --data-dir DATA_DIR (one folder per site, DATA_DIR/<site>/...); give one"
            )
        layout = self.site_layout(cfg, cfg.data_dir)
        if layout is None:
            raise ConfigError(f"task {self.name!r} cannot read a multi-site folder; use another --partition")
        names, site_of = layout
        if len(names) != cfg.clients:
            raise ConfigError(
                f"{cfg.data_dir} has {len(names)} site folder(s) ({', '.join(names)}) but the run has {cfg.clients} clients; "
                f"with --partition sites the sites set the number of clients: drop --clients (or give --clients {len(names)})"
            )
        return names, site_of

    # ------------------------------------------------------------ the shared handling
    def data_source(self, cfg: ResolvedConfig, data_dir: str | None = None) -> str:
        """The folder to read: a node-local ``data_dir`` if given, else the run's (``""``: synthetic)."""
        return cfg.data_dir if data_dir is None else data_dir

    def round_seed(self, cfg: ResolvedConfig, server_round: int, partition_id: int) -> int:
        """The seed of client ``partition_id``'s shuffling / augmentation in ``server_round``."""
        return int(np.random.default_rng([cfg.seed, server_round, partition_id, *self.seed_salt]).integers(2**31))

    def hold_out_global(self, cfg: ResolvedConfig, strata: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(global test, pool)``: a seeded random ``global_test_fraction`` of the cohort (at least
        ``min_global_test``) and the rest, both sorted."""
        n = len(strata)
        perm = np.random.default_rng([cfg.seed, 1]).permutation(n)
        n_global = max(self.min_global_test, round(cfg.global_test_fraction * n))
        return np.sort(perm[:n_global]), np.sort(perm[n_global:])

    def make_split(self, cfg: ResolvedConfig, strata: np.ndarray) -> CohortSplit:
        """The seeded global-test / partition / client split of a cohort with these strata."""
        global_test, pool = self.hold_out_global(cfg, strata)
        sites = tuple(int(k) for k in self.sites_of(cfg)[1][pool]) if cfg.partition == "sites" else ()
        params = PartitionParams(alpha=cfg.alpha, fractions=cfg.fractions, sites=sites)
        try:
            parts = partition(cfg.partition, strata[pool], cfg.clients, cfg.seed, params)
        except ValueError as exc:
            raise ConfigError(f"cannot partition {len(pool)} training {self.unit} among {cfg.clients} clients: {exc}") from exc
        return CohortSplit(
            global_test, tuple(self.split_client(cfg, pool[p], strata, self.client_name(cfg, k)) for k, p in enumerate(parts))
        )

    def client_name(self, cfg: ResolvedConfig, k: int) -> str:
        """How messages name client ``k``: ``client k``, with its site ``client k (site NAME)``."""
        names = self.site_names(cfg)
        return f"client {k} (site {names[k]})" if names else f"client {k}"

    def reads_sites(self, cfg: ResolvedConfig, source: str) -> bool:
        """Whether ``source`` is read as a multi-site folder: the run's own ``data_dir`` with
        ``--partition sites`` (a node-local folder is that node's own data)."""
        return cfg.partition == "sites" and bool(source) and source == cfg.data_dir

    def client_split(
        self, cfg: ResolvedConfig, partition_id: int, data_dir: str | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The cohort strata and client ``partition_id``'s parts; with a node-local ``data_dir``,
        the whole folder is that client's share."""
        strata = self.strata(cfg, self.data_source(cfg, data_dir))
        if data_dir:
            parts = self.split_client(cfg, np.arange(len(strata)), strata, f"node data folder {data_dir}")
        else:
            parts = self.make_split(cfg, strata).clients[partition_id]
        fault = fault_of(cfg.fault_specs(), partition_id, "few-data")
        if fault is not None:  # the client keeps a seeded share of its training split
            parts = (few_data(parts[0], fault.level, cfg.seed, partition_id), *parts[1:])
        return strata, parts

    def train_labels(self, cfg: ResolvedConfig, partition_id: int, labels: np.ndarray, train_idx: np.ndarray) -> np.ndarray:
        """The cohort ``labels`` as client ``partition_id`` sees them for training: with a
        ``label-noise`` fault, a seeded share of its ``train_idx`` carry a wrong class (a copy;
        test labels stay true)."""
        fault = fault_of(cfg.fault_specs(), partition_id, "label-noise")
        if fault is None:
            return labels
        if self.num_classes < 2:
            raise NotImplementedError(f"task {self.name!r} has no classes: it must override train_labels for label-noise")
        return noisy_labels(labels, train_idx, fault.level, self.num_classes, cfg.seed, partition_id)

    def global_test(self, cfg: ResolvedConfig) -> tuple[np.ndarray, np.ndarray]:
        """The cohort strata and the global test set's indices."""
        strata = self.strata(cfg, cfg.data_dir)
        return strata, self.make_split(cfg, strata).global_test

    def check_data(self, cfg: ResolvedConfig) -> list[int]:
        """Run :meth:`check_config` and the split (no data decoded); the samples per client."""
        self.check_config(cfg)
        split = self.make_split(cfg, self.strata(cfg, cfg.data_dir))
        return [sum(len(p) for p in parts) for parts in split.clients]


__all__ = ["CohortSplit", "CohortTask"]
