"""The demo's command line: every bad input ends with one argparse error line and exit code 2, before the model is
loaded or a server started."""

from __future__ import annotations

import pytest

from sgl_sparse import demo


@pytest.fixture
def nothing_slow(monkeypatch):
    def slow(*args, **kwargs):
        raise AssertionError("reached the slow part (model load / server) with bad input")

    monkeypatch.setattr(demo, "run_cpu", slow)
    monkeypatch.setattr(demo, "run_sglang", slow)
    monkeypatch.setattr(demo, "sglang_runtime_missing", lambda: "no CUDA GPU")


@pytest.mark.parametrize("argv,needle", [
    (["--methods", "nosuch"], "invalid choice: 'nosuch' (choose from 'quest', 'quest-fast', 'twilight'"),
    (["--length", "-5"], "--length -5: must be 256..8184 tokens"),
    (["--length", "100000"], "--length 100000: must be 256..8184 tokens"),
    (["--depth", "1.5"], "--depth 1.5: must be in 0..1"),
    (["--depth", "-0.1"], "--depth -0.1: must be in 0..1"),
    (["--length", "abc"], "invalid int value: 'abc'"),
    (["--path", "gpu"], "invalid choice: 'gpu'"),
])
def test_bad_input_is_one_line_and_exit_2(nothing_slow, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err


def test_good_input_reaches_the_run(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "sglang_runtime_missing", lambda: "no CUDA GPU")
    monkeypatch.setattr(demo, "run_cpu", lambda args: seen.update(vars(args)))
    assert demo.main(["--length", "3000", "--depth", "1", "--methods", "quest-fast"]) == 0
    assert seen["length"] == 3000 and seen["depth"] == 1.0 and seen["methods"] == ["quest-fast"]
