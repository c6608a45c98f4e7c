"""Input checked before Ray starts: every case is exit code 2, one line naming the problem (and the
file), and no work started (no output folder). Also the --resume config check."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedsim.cli import main
from fedsim.data.folder import KAGGLE_CLASSES

TINY = ["run", "--profile", "tiny", "--models", "small_cnn,small_cnn,small_cnn"]


def _fails(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("fedsim: error: ") and "Traceback" not in err, err
    assert not any(line.startswith("fedsim: ") for line in lines[:-1]), err  # one error line (log lines aside)
    return lines[-1]


def _folder(root: Path, classes, n: int = 3) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _bomb_png(path: Path, side: int = 100_000) -> None:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _truncated_png(path: Path) -> None:
    """Half of a PNG of noise (noise does not compress, so the pixel data is really cut)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(autouse=True)
def _fresh_console_logging():
    """The CLI attaches a stderr handler once per process; drop it after each test, so the next
    test's captured stderr gets its own (a handler on a closed capture stream fails)."""
    from fedsim._logging import _ConsoleHandler, logger

    yield
    for h in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(h)


def test_class_folders_that_are_not_the_tasks_classes(tmp_path, capsys):
    data = _folder(tmp_path / "pets", ["cats", "dogs", "birds", "fish"])
    line = _fails([*TINY, "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert "are birds, cats, dogs, fish, but the task's classes are glioma_tumor, meningioma_tumor, no_tumor, pituitary_tumor" in line
    assert "rename the folders" in line and not (tmp_path / "o").exists()
    five = _folder(tmp_path / "five", [*KAGGLE_CLASSES, "unknown_tumor"])
    line = _fails([*TINY, "--data-dir", str(five), "--out", str(tmp_path / "o")], capsys)
    assert "(unexpected: unknown_tumor; missing: none)" in line


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (_truncated_png, "cannot read image"),
        (_bomb_png, "cannot read image"),
    ],
    ids=["zero-byte", "truncated", "decompression-bomb"],
)
def test_bad_images_are_named_before_any_work(make, says, tmp_path, capsys):
    data = _folder(tmp_path / "kaggle", KAGGLE_CLASSES, n=4)
    bad = data / "no_tumor" / "bad.png"
    make(bad)
    line = _fails([*TINY, "--data-dir", str(data), "--out", str(tmp_path / "o")], capsys)
    assert str(bad) in line and says in line and not (tmp_path / "o").exists()


def test_too_many_megapixels_are_refused_before_decoding(tmp_path):
    from fedsim.data.folder import BadImageError, load_images, scan_image_folder

    data = _folder(tmp_path / "k", KAGGLE_CLASSES[:2], n=1)
    with pytest.raises(BadImageError, match=r"0\.png is 20 x 20 pixels, more than fedsim's limit of 0\.0001 megapixels"):
        load_images(scan_image_folder(data), 16, max_pixels=100)


def test_output_folder_under_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    line = _fails([*TINY, "--out", str(tmp_path / "file" / "run")], capsys)
    assert f"{tmp_path / 'file'} is a file, not a folder; choose another --out" in line


def test_fractions_must_sum_to_one_and_min_clients_fit(tmp_path, capsys):
    line = _fails([*TINY, "--partition", "sizes", "--fractions", "0.5,0.5,0.5", "--out", str(tmp_path / "o")], capsys)
    assert "fractions must sum to 1" in line and "summing to 1.5" in line
    line = _fails([*TINY, "--min-clients", "4", "--out", str(tmp_path / "o")], capsys)
    assert "min_clients=4 exceeds the 3 clients" in line
    assert not (tmp_path / "o").exists()


def _stored_run(tmp_path: Path) -> Path:
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig

    out = tmp_path / "run"
    out.mkdir()
    cfg = resolve_config(RunConfig(profile="tiny", models=("small_cnn",) * 3, out=str(out)))
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict()))
    return out


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, capsys):
    out = _stored_run(tmp_path)
    line = _fails(["run", "--resume", str(out), "--lr", "0.01", "--seed", "3"], capsys)
    assert "the run was made with lr=0.001, seed=0; this command gives lr=0.01, seed=3" in line
    line = _fails(["run", "--resume", str(out), "--out", str(tmp_path / "elsewhere")], capsys)
    assert "differs from --resume" in line
    # the same values, or a new timeout, are fine up to the missing checkpoint
    line = _fails(["run", "--resume", str(out), "--lr", "0.001", "--round-timeout", "60"], capsys)
    assert "has no checkpoint" in line


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    line = _fails(["run", "--resume", str(tmp_path / "nothing")], capsys)
    assert "is not a fedsim run directory (config.json is missing)" in line


def test_analyze_writes_all_or_nothing(tmp_path, capsys, monkeypatch, task_identity):
    from fedsim.clients.app import app
    from fedsim.clients.tasks import resolve_config
    from fedsim.config import RunConfig
    from fedsim.server.app import run_server
    from fedsim.server.inprocess import InProcessGrid

    cfg = resolve_config(RunConfig(profile="tiny", rounds=1, models=("small_cnn",) * 3, out=str(tmp_path / "run")))
    run_server(InProcessGrid(app, 3, num_threads=1), cfg)
    assert main(["analyze", cfg.out]) == 0
    report = (tmp_path / "run" / "analysis" / "report.md").read_text()
    assert "curves.png" in report and f"written to {tmp_path / 'run' / 'analysis'}" in capsys.readouterr().out

    import fedsim.analysis.report as report_module

    def half_done(run_dir, out, settings=None):
        (Path(out) / "curves.png").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "analyze_run", half_done)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["analyze", cfg.out])
    assert (tmp_path / "run" / "analysis" / "report.md").read_text() == report  # the previous analysis is intact
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == []  # no temp folder left


def test_certs_makes_a_ca_a_server_certificate_and_node_keys(tmp_path, capsys):
    from cryptography import x509

    assert main(["certs", str(tmp_path / "c"), "--host", "10.0.0.5", "--host", "link.example", "--nodes", "2"]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    c = tmp_path / "c"
    cert = x509.load_pem_x509_certificate((c / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert san.get_values_for_type(x509.DNSName) == ["link.example"]
    ca = x509.load_pem_x509_certificate((c / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (c / "node1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert all((c / name).stat().st_mode & 0o777 == 0o600 for name in ("ca.key", "server.key", "node0", "node1"))
    line = _fails(["certs", str(c)], capsys)
    assert "already holds a CA (ca.key)" in line
