"""Archive round-trip, index, corruption detection and interrupted writes."""

import os

import numpy as np
import pytest

from fedsim.cme import CMEArchive, CMEArchiveError, CMEArchiveWriter, EpochCME, NoCMERecordsError, decode, encode
from fedsim.cme.archive import FORMAT
from fedsim.cme.schema import LAG_GROUP_FIELDS, LAG_GROUPS, STAT_FIELDS


def fake_cme(rng, epochs=2, layers=("a.weight", "head.fc2.weight"), size=6):
    stats = {n: rng.normal(size=(epochs, len(STAT_FIELDS))) for n in layers}
    mats = {layers[-1]: rng.normal(size=(epochs, size, size)).astype(np.float32)}
    idx = {layers[-1]: np.arange(size)}
    lags = {n: rng.normal(size=(epochs, LAG_GROUPS, len(LAG_GROUP_FIELDS))) for n in layers}
    return EpochCME(tuple(layers), dict.fromkeys(layers, (size, size)), stats, mats, idx, idx, lags)


def test_round_trip_through_writer_and_reader(tmp_path, rng):
    writer = CMEArchiveWriter(tmp_path)
    originals = {}
    for client in (1, 0):
        for rnd in (1, 2):
            cme = fake_cme(rng)
            originals[client, rnd] = cme
            writer.write(encode(cme, client, rnd, f"model{client}"))
    arch = CMEArchive(tmp_path)
    assert arch.clients == [0, 1] and arch.rounds(0) == [1, 2]
    assert arch.model(1) == "model1" and arch.layers(0) == ["a.weight", "head.fc2.weight"]
    assert arch.matrix_layers(0) == ["head.fc2.weight"]
    for (client, rnd), cme in originals.items():
        rec = arch.read(client, rnd)
        assert rec.epochs == 2 and rec.shapes["a.weight"] == (6, 6)
        for n in cme.layers:
            np.testing.assert_array_equal(rec.stats[n], cme.stats[n])
            np.testing.assert_array_equal(rec.lag_groups[n], cme.lag_groups[n].astype(np.float32))
        np.testing.assert_array_equal(arch.matrix(client, rnd, "head.fc2.weight", epoch=1), cme.matrices["head.fc2.weight"][0])
        np.testing.assert_array_equal(arch.matrix(client, rnd, "head.fc2.weight"), cme.matrices["head.fc2.weight"][-1])
    mean = arch.stats(0, "a.weight", "mean")
    assert mean.shape == (2, 2)
    np.testing.assert_array_equal(mean[1], originals[0, 2].stats["a.weight"][:, STAT_FIELDS.index("mean")])
    with pytest.raises(KeyError, match="no CMEs for client 0 round 7"):
        arch.read(0, 7)
    with pytest.raises(IndexError, match=r"outside 1\.\.2"):
        arch.matrix(0, 1, "head.fc2.weight", epoch=3)


def test_duplicates_are_refused_and_nothing_is_overwritten(tmp_path, rng):
    writer = CMEArchiveWriter(tmp_path)
    first = encode(fake_cme(rng), 0, 1, "m")
    writer.write(first)
    with pytest.raises(CMEArchiveError, match="already archived"):
        CMEArchiveWriter(tmp_path).write(encode(fake_cme(rng), 0, 1, "m"))
    assert (tmp_path / "cme/client0/round0001.safetensors").read_bytes() == first


def test_missing_and_corrupt_archives_are_reported(tmp_path, rng):
    with pytest.raises(NoCMERecordsError, match="--cme"):
        CMEArchive(tmp_path)
    with pytest.raises(CMEArchiveError, match="not a CME record"):
        decode(b"garbage")
    path = CMEArchiveWriter(tmp_path).write(encode(fake_cme(rng), 0, 1, "m"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CMEArchiveError, match="corrupt"):
        CMEArchive(tmp_path).read(0, 1)


def test_interrupted_writes_leave_the_archive_readable(tmp_path, rng, monkeypatch):
    writer = CMEArchiveWriter(tmp_path)
    writer.write(encode(fake_cme(rng), 0, 1, "m"))
    good = CMEArchive(tmp_path).read(0, 1)

    # crash while writing the round file: no temp file is left and the index is unchanged
    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        writer.write(encode(fake_cme(rng), 0, 2, "m"))
    monkeypatch.undo()
    assert not (tmp_path / "cme/client0/round0002.safetensors").exists()
    assert not list((tmp_path / "cme").rglob("*.tmp"))

    # crash after the round file landed but before the index was replaced: the file is ignored
    real_replace = os.replace

    def replace_then_die(src, dst):
        if str(dst).endswith("index.json"):
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        CMEArchiveWriter(tmp_path).write(encode(fake_cme(rng), 0, 3, "m"))
    monkeypatch.undo()
    assert (tmp_path / "cme/client0/round0003.safetensors").exists()
    # a torn temp file from a killed process (no cleanup ran) is ignored too
    (tmp_path / "cme/.index.json.x.tmp").write_bytes(b'{"format": "fedsim-cme/2", "entr')
    arch = CMEArchive(tmp_path)
    assert arch.rounds(0) == [1]
    np.testing.assert_array_equal(arch.read(0, 1).stats["a.weight"], good.stats["a.weight"])
    # and the archive keeps working: round 2 can still be written after the crash
    CMEArchiveWriter(tmp_path).write(encode(fake_cme(rng), 0, 2, "m"))
    assert CMEArchive(tmp_path).rounds(0) == [1, 2]


def test_old_format_archives_are_refused_with_a_clear_error(tmp_path, rng):
    """fedsim-cme/1 counted masked weights as 0 and had no dead-unit statistics: not silently mixed."""
    CMEArchiveWriter(tmp_path).write(encode(fake_cme(rng), 0, 1, "m"))
    index = tmp_path / "cme/index.json"
    index.write_text(index.read_text().replace(FORMAT, "fedsim-cme/1"))
    with pytest.raises(CMEArchiveError, match=r"old CME format 'fedsim-cme/1'.*no dead-unit.*fedsim run \.\.\. --cme"):
        CMEArchive(tmp_path)
    payload = encode(fake_cme(rng), 0, 1, "m").replace(FORMAT.encode(), b"fedsim-cme/1")
    with pytest.raises(CMEArchiveError, match="old CME format"):
        decode(payload)
    with pytest.raises(CMEArchiveError, match="unsupported CME format 'x/9"):
        decode(encode(fake_cme(rng), 0, 1, "m").replace(FORMAT.encode(), b"x/9" + b" " * (len(FORMAT) - 3)))


def test_deferred_index_is_written_once_per_round(tmp_path, rng):
    """The server's writer rewrites index.json at the round's end, not after every record."""
    writer = CMEArchiveWriter(tmp_path, defer_index=True)
    for client in (2, 0, 1):
        writer.write(encode(fake_cme(rng), client, 1, "m"))
    assert not (tmp_path / "cme" / "index.json").exists()
    writer.on_round_end(1, None)
    assert CMEArchive(tmp_path).clients == [0, 1, 2]
    with pytest.raises(CMEArchiveError, match="client 0 round 1 are already archived"):
        writer.write(encode(fake_cme(rng), 0, 1, "m"))
