"""Multi-site folders (``--partition sites``): one client per site folder, named after it, for all
three tasks; mismatched class sets and client counts are refused naming the site."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsim.analysis.curves import client_curves
from fedsim.cli import _config_from_args, build_parser, main
from fedsim.clients.tasks import get_task, resolve_config
from fedsim.config import ConfigError, RunConfig
from fedsim.data.ct_folder import write_ct_case
from fedsim.data.folder import KAGGLE_CLASSES, DataLayoutError, scan_image_folder
from fedsim.data.partition import PartitionParams, partition
from fedsim.data.sites import SiteLayoutError, site_names
from fedsim.data.synthetic_ct import generate_case

SITES = {"berlin": 5, "lyon": 4, "oslo": 6}  # images per class at each site


def mri_sites(root: Path, sites: dict[str, int] = SITES, classes=KAGGLE_CLASSES) -> Path:
    """``root/<site>/<class>/<i>.png``: small random images, ``n`` per class at each site."""
    rng = np.random.default_rng(0)
    for site, n in sites.items():
        for c in classes:
            (root / site / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(root / site / c / f"{i}.png")
    return root


def test_sites_partitioner_gives_each_client_its_site():
    site = (2, 0, 0, 1, 2, 1, 0)
    parts = partition("sites", np.zeros(7), 3, seed=0, params=PartitionParams(sites=site))
    assert [p.tolist() for p in parts] == [[1, 2, 6], [3, 5], [0, 4]]
    assert [p.tolist() for p in partition("sites", np.zeros(7), 3, seed=9, params=PartitionParams(sites=site))] == [
        [1, 2, 6],
        [3, 5],
        [0, 4],
    ]
    with pytest.raises(ValueError, match="the data has 3 sites but the run has 2 clients"):
        partition("sites", np.zeros(7), 2, 0, PartitionParams(sites=site))
    with pytest.raises(ValueError, match="needs the site of every sample: give --data-dir"):
        partition("sites", np.zeros(7), 3, 0, PartitionParams())


def test_scan_pools_the_sites_in_order(tmp_path):
    files = scan_image_folder(mri_sites(tmp_path), KAGGLE_CLASSES, sites=True)
    assert files.sites == ("berlin", "lyon", "oslo") == site_names(tmp_path)
    assert files.site_of is not None and np.bincount(files.site_of).tolist() == [20, 16, 24]
    assert all(p.parts[-3] == files.sites[s] for p, s in zip(files.paths, files.site_of, strict=True))
    assert files.labels.tolist()[:20] == [c for c in range(4) for _ in range(5)]


def test_a_site_missing_a_class_is_refused_naming_it(tmp_path):
    mri_sites(tmp_path, {"berlin": 3, "oslo": 3})
    mri_sites(tmp_path, {"lyon": 3}, classes=KAGGLE_CLASSES[:3])  # no pituitary_tumor at lyon
    with pytest.raises(SiteLayoutError, match=r"site 'lyon' .* has no pituitary_tumor data, which site\(s\) berlin, oslo have"):
        scan_image_folder(tmp_path, KAGGLE_CLASSES, sites=True)
    cfg = resolve_config(RunConfig(partition="sites", data_dir=str(tmp_path), models=("small_cnn",) * 3, profile="tiny"))
    with pytest.raises(SiteLayoutError, match="site 'lyon'"):
        get_task("brain_mri").check_data(cfg)


def test_one_client_per_site_for_brain_mri(tmp_path):
    data = mri_sites(tmp_path / "data")
    args = build_parser().parse_args(["run", "--partition", "sites", "--data-dir", str(data), "--models", "small_cnn,small_cnn,small_cnn"])
    cfg = resolve_config(_config_from_args(args))
    assert cfg.clients == 3  # from the folders
    task = get_task("brain_mri")
    assert task.site_names(cfg) == ("berlin", "lyon", "oslo")
    strata, global_test = task.global_test(cfg)
    site_of = np.repeat([0, 1, 2], [20, 16, 24])
    for k, parts in enumerate(task.make_split(cfg, strata).clients):
        mine = np.sort(np.concatenate(parts))
        expected = np.setdiff1d(np.flatnonzero(site_of == k), global_test)  # the site minus the global test set
        assert mine.tolist() == expected.tolist()
    assert sum(task.check_data(cfg)) + len(global_test) == 60


def test_conflicting_clients_and_missing_data_dir_are_errors(tmp_path, capsys):
    data = mri_sites(tmp_path / "data")
    cfg = resolve_config(RunConfig(partition="sites", data_dir=str(data), clients=4, models=("small_cnn",) * 4))
    with pytest.raises(ConfigError, match=r"has 3 site folder\(s\) \(berlin, lyon, oslo\) but the run has 4 clients; .*drop --clients"):
        get_task("brain_mri").check_data(cfg)
    with pytest.raises(ConfigError, match="partition 'sites' reads the sites from --data-dir"):
        get_task("brain_mri").check_data(resolve_config(RunConfig(partition="sites", models=("small_cnn",) * 3)))
    assert main(["run", "--partition", "sites", "--data-dir", str(data), "--clients", "2", "--out", str(tmp_path / "o")]) == 2
    assert "has 3 site folder(s) (berlin, lyon, oslo) but the run has 2 clients" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_sites_for_the_3d_tasks(tmp_path):
    # h3denet: DATA_DIR/<site>/<case>_volume.nrrd ... (the authors' layout one level down)
    for k, site in enumerate(("a_clinic", "b_clinic")):
        for i in range(4):
            c = generate_case(10 * k + i, (16, 16, 8), seed=0)
            write_ct_case(tmp_path / "ct" / site, f"case{i}", c.volume, c.landmarks, c.spacing)
    cfg = resolve_config(RunConfig(task="h3denet", profile="tiny", partition="sites", clients=2, data_dir=str(tmp_path / "ct")))
    task = get_task("h3denet")
    assert task.site_names(cfg) == ("a_clinic", "b_clinic")
    strata = task.global_test(cfg)[0]
    for k, parts in enumerate(task.make_split(cfg, strata).clients):
        assert all(i // 4 == k for p in parts for i in p)  # cases 0-3 are a_clinic's, 4-7 b_clinic's
    # aicnet3d: DATA_DIR/<site>/<class>/*.npy; a site without glaucoma volumes is refused, naming it
    rng = np.random.default_rng(0)

    def oct_sites(root: Path, west_classes: tuple[str, ...]) -> RunConfig:
        for site, classes in (("east", ("normal", "glaucoma")), ("west", west_classes)):
            for cls in classes:
                (root / site / cls).mkdir(parents=True)
                for i in range(5):
                    np.save(root / site / cls / f"{i}.npy", rng.integers(0, 255, (16, 24, 14)).astype(np.uint8))
        return resolve_config(RunConfig(task="aicnet3d", profile="tiny", partition="sites", clients=2, data_dir=str(root)))

    cfg = oct_sites(tmp_path / "oct", ("normal", "glaucoma"))
    task = get_task("aicnet3d")
    assert task.site_names(cfg) == ("east", "west")
    strata = task.global_test(cfg)[0]
    for k, parts in enumerate(task.make_split(cfg, strata).clients):
        assert all(i // 10 == k for p in parts for i in p)
    with pytest.raises(DataLayoutError, match=r"oct_bad/west holds only class 'normal'"):
        task.check_data(oct_sites(tmp_path / "oct_bad", ("normal",)))


def test_curves_and_labels_carry_the_site():
    rows = [{"round": 1, "clients": [{"client": 0, "model": "m", "site": "berlin", "test_accuracy": 0.5}], "global": None}]
    curves = client_curves(rows)
    assert curves.sites == ("berlin",) and curves.label(0) == "client 0 [berlin]"
    assert client_curves([{"round": 1, "clients": [{"client": 0, "model": "m"}], "global": None}]).label(0) == "client 0"
