"""The console for people: one line per round, a progress bar only on a terminal, no escape codes
in files, a warning for test splits too small to mean much, per-client lines only with -v."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedsim._logging import _ConsoleHandler, logger
from fedsim.rundir import RunDir
from fedsim.server.recorder import MIN_TEST_EXAMPLES, RoundRecorder, round_line


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _handler(stream: io.StringIO) -> _ConsoleHandler:
    h = _ConsoleHandler()
    h.setStream(stream)
    h.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    return h


@pytest.fixture
def captured():
    """Records of the fedsim logger at every level (whatever handlers other tests attached)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, level = Keep(level=logging.DEBUG), logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(keep)
    logger.setLevel(level)


def _emit(handler: _ConsoleHandler, msg: str, progress: tuple[int, int] | None = None) -> None:
    record = logging.LogRecord("fedsim", logging.INFO, __file__, 1, msg, None, None)
    if progress is not None:
        record.progress = progress
    handler.emit(record)


def test_no_escape_codes_or_bar_when_not_a_terminal():
    out = io.StringIO()
    h = _handler(out)
    for r in (1, 2, 3):
        _emit(h, f"round {r}/3 done", (r, 3))
    assert out.getvalue() == "INFO: round 1/3 done\nINFO: round 2/3 done\nINFO: round 3/3 done\n"


def test_progress_bar_on_a_terminal_with_the_lines_above_it():
    out = _Tty()
    h = _handler(out)
    _emit(h, "start", (0, 3))
    _emit(h, "round 1/3 done", (1, 3))
    shown = out.getvalue()
    assert "INFO: round 1/3 done" in shown and "1/3" in shown and "round" in shown and "\r" in shown  # tqdm redraws with \r
    _emit(h, "round 3/3 done", (3, 3))
    assert h._bar is None  # closed after the last round


def test_round_line_mean_range_global_and_eta():
    clients = [{"test_accuracy": 0.0}, {"test_accuracy": 0.5}, {"test_accuracy": 1.0}]
    line = round_line(2, 5, 8.44, 25.3, clients, {"accuracy": 0.2222, "loss": 1.3}, "accuracy")
    assert line == "round 2/5 8.4s (ETA 25.3s): 3 clients, test accuracy mean 0.500 range 0.000-1.000; global accuracy 0.222"
    assert (
        round_line(5, 5, 125.0, 0.0, clients[:1], None, "accuracy")
        == "round 5/5 2m05s: 1 client, test accuracy mean 0.000 range 0.000-0.000"
    )


def _rd(pid: int, **metrics: float) -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"partition-id": pid, **metrics})})


def test_recorder_logs_one_line_per_round_and_warns_once_about_small_test_splits(tmp_path, captured):
    rd = RunDir(tmp_path / "r").create()
    rec = RoundRecorder(rd, ["small_cnn"] * 40, primary_metric="accuracy", num_rounds=2, record_sampled=True)
    for rnd in (1, 2):
        rec.note_sampled([3, 17])
        rec.train_metrics([_rd(3, **{"num-examples": 20, "train-accuracy": 0.5}), _rd(17, **{"num-examples": 20})], "num-examples")
        rec.evaluate_metrics(
            [_rd(3, **{"num-examples": 7, "test-accuracy": 0.25}), _rd(17, **{"num-examples": 40, "test-accuracy": 0.75})], "num-examples"
        )
        arrays = ArrayRecord({"x": Array(np.zeros(1))})
        rec.on_round_end(rnd, arrays)
        rec.log_round(rnd, arrays)
    info = [r.getMessage() for r in captured if r.levelno == logging.INFO]
    assert [m.split(":", 1)[1] for m in info] == [" 2 clients, test accuracy mean 0.500 range 0.250-0.750"] * 2
    assert info[0].startswith("round 1/2 ") and "(ETA " in info[0] and info[1].startswith("round 2/2 ")
    assert [getattr(r, "progress", None) for r in captured if r.levelno == logging.INFO] == [(1, 2), (2, 2)]
    debug = [r.getMessage() for r in captured if r.levelno == logging.DEBUG]
    assert len(debug) == 4 and debug[0].startswith("round 1 client 3 (small_cnn): train_accuracy 0.5")
    (warning,) = [r.getMessage() for r in captured if r.levelno == logging.WARNING]
    assert f"clients 3 test on fewer than {MIN_TEST_EXAMPLES} local examples (the fewest: 7)" in warning
    assert [line["sampled"] for line in rd.read_metrics()] == [[3, 17], [3, 17]]


def test_flower_chatter_and_its_deprecation_notice_only_with_verbose(monkeypatch):
    import flwr  # noqa: F401  (attaches Flower's console handler)

    from fedsim._logging import VERBOSE_ENV, quiet_third_party

    flwr_logger = logging.getLogger("flwr")
    (handler,) = [h for h in flwr_logger.handlers if hasattr(h, "colored")]
    saved = (handler.level, handler.colored, list(flwr_logger.filters))
    notice = logging.LogRecord("flwr", logging.WARNING, __file__, 1, "DEPRECATED FEATURE: %s", ("run_simulation",), None)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)  # quiet_third_party sets it; restored afterwards
    try:
        monkeypatch.setenv(VERBOSE_ENV, "0")
        quiet_third_party()
        assert handler.level == logging.WARNING and not handler.colored  # pytest's stderr is no terminal
        assert not flwr_logger.filter(notice)
        quiet_third_party(client=True)
        assert handler.level == logging.ERROR
        monkeypatch.setenv(VERBOSE_ENV, "1")
        quiet_third_party()
        assert handler.level == logging.INFO and flwr_logger.filter(notice)
    finally:
        handler.setLevel(saved[0])
        handler.colored = saved[1]
        flwr_logger.filters[:] = saved[2]


def test_closing_summary_lists_few_clients_and_summarises_many(tmp_path):
    from fedsim.cli import SUMMARY_CLIENT_LINES, closing_summary

    few = {"round": 2, "clients": [{"client": k, "model": "small_cnn", "train_accuracy": 0.5, "test_accuracy": 0.25} for k in range(3)]}
    lines = closing_summary(few | {"global": {"accuracy": 0.5}}, "accuracy", tmp_path / "metrics.jsonl")
    assert lines[0] == "  client 0 small_cnn     train accuracy 0.500  local test accuracy 0.250" and len(lines) == 4
    assert lines[-1] == '  global model: {"accuracy": 0.5}'
    many = {
        "round": 5,
        "clients": [{"client": k, "model": "small_cnn", "train_accuracy": k / 100, "test_accuracy": 0.5} for k in range(100)],
    }
    lines = closing_summary(many | {"global": None}, "accuracy", tmp_path / "metrics.jsonl")
    assert SUMMARY_CLIENT_LINES < 100 and len(lines) == 2
    assert lines[0].startswith("  100 clients of round 5: train accuracy mean 0.495 range 0.000-0.990")
    assert lines[1].startswith("  100 clients of round 5: local test accuracy mean 0.500 range 0.500-0.500")
