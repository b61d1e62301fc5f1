"""launch/eval_accuracy.py --combine on CPU: runs merge into one report, and a combined report merges again."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))

import eval_accuracy  # noqa: E402
from sgl_sparse.accuracy import Result  # noqa: E402

PATH = "sglang path: test"


def _run(file: Path, task: str, methods: dict[str, float]) -> Path:
    results = [Result(PATH, "qwen05b", m, 0 if m == "dense" else 2048, task, 4096, d, s, 1.0 if m == "dense" else 0.1,
                      "x", 0.1) for m, s in methods.items() for d in (0.2, 0.8)]
    file.write_text(json.dumps(dict(args=dict(model="qwen05b"), path=PATH, complete=True,
                                    results=[dataclasses.asdict(r) for r in results])))
    return file


def test_combined_report_combines_again(tmp_path):
    a = _run(tmp_path / "a.json", "passkey", {"dense": 1.0, "quest": 0.5})
    b = _run(tmp_path / "b.json", "cwe", {"dense": 0.5, "quest": 0.5})
    c = _run(tmp_path / "c.json", "niah_single_3", {"dense": 1.0, "quest": 1.0})
    assert eval_accuracy.combine([str(a), str(b)], str(tmp_path / "ab.json"), ["passkey"]) == 0
    assert eval_accuracy.combine([str(tmp_path / "ab.json"), str(c)], str(tmp_path / "abc.json")) == 0
    abc = json.loads((tmp_path / "abc.json").read_text())
    assert sorted({r["task"] for r in abc["results"]}) == ["niah_single_3", "passkey"]   # b's cwe was left out
    quest = next(r for r in abc["rows"] if r["method"] == "quest")
    assert quest["score"] == 0.75 and quest["relative"] == 0.75


def test_combine_refuses_two_models(tmp_path):
    a = _run(tmp_path / "a.json", "passkey", {"dense": 1.0})
    other = json.loads(a.read_text())
    other["args"]["model"] = "smollm2"
    (tmp_path / "b.json").write_text(json.dumps(other))
    try:
        eval_accuracy.combine([str(a), str(tmp_path / "b.json")], str(tmp_path / "ab.json"))
    except SystemExit as e:
        assert "one model" in str(e)
    else:
        raise AssertionError("combining two models must fail")
