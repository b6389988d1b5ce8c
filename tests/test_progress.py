"""Progress lines: throttled, with the elapsed time and an estimate of what is left."""
import logging

from bayesq_onnx import progress


def test_progress_lines_carry_an_eta(monkeypatch, caplog):
    clock = iter([0.0, 6.0, 7.0, 13.0, 15.0, 20.0])   # start, one reading per step, one at exit
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    # the CLI (run by earlier tests) stops bayesq_onnx's records at its own handler
    monkeypatch.setattr(logging.getLogger("bayesq_onnx"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="bayesq_onnx.progress"):
        with progress.Progress("tables", 4) as p:
            p.step()        # t=6: 1/4 after 6 s -> 18 s left
            p.step()        # t=7: within 5 s of the last line: silent
            p.step()        # t=13: 3/4 after 13 s -> 4 s left
            p.step()        # done: no ETA line, the closing line instead
    assert [r.getMessage() for r in caplog.records] == [
        "tables: 0/4", "tables: 1/4 (6 s, about 18 s left)", "tables: 3/4 (13 s, about 4 s left)",
        "tables: 4/4 done in 20.0 s"]


def test_the_estimate_follows_the_work_when_steps_differ(monkeypatch, caplog):
    clock = iter([0.0, 6.0, 12.0, 15.0, 20.0])   # start, one reading per step, one at exit
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(logging.getLogger("bayesq_onnx"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="bayesq_onnx.progress"):
        with progress.Progress("rounding", 3, work=100) as p:
            p.step(work=60)     # t=6: 60 of 100 in 6 s -> 4 s left (by count it would say 12)
            p.step(work=30)     # t=12: 90 of 100 in 12 s -> 1 s left
            p.step(work=10)
    assert [r.getMessage() for r in caplog.records] == [
        "rounding: 0/3", "rounding: 1/3 (6 s, about 4 s left)", "rounding: 2/3 (12 s, about 1 s left)",
        "rounding: 3/3 done in 20.0 s"]
