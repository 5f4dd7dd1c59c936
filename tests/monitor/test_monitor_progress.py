"""megatron_shaping.progress: plain lines off a terminal, a tqdm bar on one, nothing when disabled."""
import io
import re

import pytest

from megatron_shaping import progress as P


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_every_log_every_and_at_the_end(monkeypatch):
    t = [100.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: t[0])
    out = io.StringIO()
    p = P.Progress(10, enabled=True, log_every=4, stream=out)
    for step in range(1, 11):
        t[0] += 2.0                                        # 2 s per iteration, 1000 tokens each
        p.update(step, loss=3.0 / step, lr=3e-4, tokens=1000, loss_scale=65536.0, shaped_fraction=0.25)
    p.close()
    lines = out.getvalue().splitlines()
    assert [re.search(r"iter (\d+)/10", l).group(1) for l in lines] == ["4", "8", "10"]
    first = lines[0]
    assert "(40.0%)" in first and "loss 0.7500" in first and "lr 3.00e-04" in first
    assert "500 tok/s" in first and "loss scale 65536" in first and "shaped 0.25" in first
    assert "0:00:08 elapsed, 0:00:12 left" in first


def test_default_interval_is_about_one_percent():
    assert P.Progress(1000, stream=io.StringIO()).log_every == 10
    assert P.Progress(7, stream=io.StringIO()).log_every == 1


def test_disabled_writes_nothing():
    out = TTY()
    p = P.Progress(5, enabled=False, stream=out)
    for s in range(1, 6):
        p.update(s, loss=1.0)
    p.write("hello")
    p.close()
    assert out.getvalue() == "" and p.bar is None


def test_tqdm_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    out = TTY()
    with P.Progress(4, stream=out, initial=1) as p:
        assert p.bar is not None
        for s in range(2, 5):
            p.update(s, loss=2.5, lr=1e-3, loss_scale=1.0, shaped_fraction=0.5)
        p.write("a message")
        text = out.getvalue()
    assert "4/4" in out.getvalue() and "loss 2.5000" in text and "shaped 0.50" in text and "a message" in text


def test_missing_values_are_left_out():
    assert P.format_metrics(loss=1.0) == "loss 1.0000"
    assert P.format_metrics(shaped_fraction=float("nan")) == ""
    assert P.format_metrics(tokens_per_s=2.5e6) == "2.5M tok/s"
