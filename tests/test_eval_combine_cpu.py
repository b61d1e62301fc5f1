"""launch/eval_accuracy.py on CPU: --combine merges runs into one report (and a combined report merges again, old
files included); a run writes rows with intervals, the curve and the metadata."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest

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


def _meta_run(file: Path, commit: str, method: str, budgets, score, gpu="NVIDIA H200", dense=True) -> Path:
    """A run in the current format: seeds, config labels, metadata and timings."""
    results = []
    for m, b in ([("dense", 0)] if dense else []) + [(method, b) for b in budgets]:
        for t in ("passkey", "cwe"):
            for d in (0.2, 0.8):
                for seed in range(5):
                    results.append(Result(PATH, "qwen05b", m, b or 32000, t, 32000, d, score(m, b, t, seed),
                                          1.0 if m == "dense" else 2 * b / 32000, "x", 0.1, seed=seed, config=m))
    file.write_text(json.dumps(dict(args=dict(model="qwen05b"), path=PATH, complete=True, gpu=gpu,
                                    versions={"sglang": "0.5.17"}, commit=commit,
                                    timings=[dict(config=method, budget=b, requests=20, batch_s=1.0)
                                             for b in budgets],
                                    results=[dataclasses.asdict(r) for r in results])))
    return file


def test_combined_rows_curve_and_metadata(tmp_path, monkeypatch):
    """Two GPUs' runs merge: rows per scope with n and intervals, the curve at 32K with one line per method, the
    runs' commits (they differ: both kept), GPU, timings, and both PNGs."""
    monkeypatch.setenv("SGL_SPARSE_COMMIT", "feedbeef")
    score = lambda m, b, t, seed: 0.0 if (m != "dense" and b == 256 and seed < 2) else 1.0  # noqa: E731
    a = _meta_run(tmp_path / "a.json", "c1", "quest", [256, 1024], score)
    b = _meta_run(tmp_path / "b.json", "c2", "vattention", [256, 1024], score, dense=False)
    assert eval_accuracy.combine([str(a), str(b)], str(tmp_path / "ab.json")) == 0
    ab = json.loads((tmp_path / "ab.json").read_text())
    assert ab["commit"] == ["c1", "c2"] and ab["combined_at_commit"] == "feedbeef"
    assert ab["gpu"] == "NVIDIA H200" and ab["versions"] == {"sglang": "0.5.17"}
    assert [(t["config"], t["budget"]) for t in ab["timings"]] == [("quest", 256), ("quest", 1024),
                                                                    ("vattention", 256), ("vattention", 1024)]
    rows = {(r["config"], r["budget"], r["scope"], r["task"]): r for r in ab["rows"]}
    v = rows[("vattention", 256, "length", None)]
    assert v["n"] == 20 and v["n_paired"] == 20 and v["length"] == 32000
    assert v["score"] == 0.6 and v["dense_score"] == 1.0 and v["relative"] == 0.6
    assert v["relative_ci"][0] < 0.6 < v["relative_ci"][1] and v["score_ci"][0] < 0.6 < v["score_ci"][1]
    assert rows[("quest", 1024, "overall", None)]["relative_ci"] == [1.0, 1.0]
    assert rows[("quest", 256, "task", "cwe")]["n"] == 10
    curve = ab["curve"]
    assert curve["length"] == 32000 and sorted(curve["lines"]) == ["quest", "vattention"]
    assert [p["budget"] for p in curve["lines"]["vattention"]] == [256, 1024]
    assert (tmp_path / "ab.png").stat().st_size > 0 and (tmp_path / "ab_curve.png").stat().st_size > 0
    # the combined file combines again, its runs' metadata carried along
    assert eval_accuracy.combine([str(tmp_path / "ab.json")], str(tmp_path / "again.json")) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["commit"] == ["c1", "c2"] and len(again["timings"]) == 4
    assert again["rows"] == ab["rows"]                                  # seeded bootstrap: the same intervals


def test_run_writes_rows_and_metadata(tmp_path, monkeypatch):
    """main() on the cpu path with the model stood in: --seeds reaches the evaluation, --set field=budget gives
    each config its budget, and the JSON holds the commit (SGL_SPARSE_COMMIT), gpu, versions, rows and curve."""
    from sgl_sparse import accuracy

    monkeypatch.setenv("SGL_SPARSE_COMMIT", "abc123")
    seen = {}

    def fake_evaluate(model, task_names, lengths, depths, configs, seed, progress, measure_error=False, seeds=1):
        seen.update(configs=configs, seeds=seeds, seed=seed)
        for t, L, d, k in accuracy.instance_specs(task_names, lengths, depths, seeds, seed):
            for label, cfg in configs:
                progress(Result("cpu", model, cfg.method, cfg.token_budget if cfg.is_sparse else L, t, L, d,
                                float(k % 2 == 0 or not cfg.is_sparse), 0.1 if cfg.is_sparse else 1.0, "x", 0.0,
                                seed=k, config=label))

    monkeypatch.setattr(accuracy, "evaluate", fake_evaluate)
    out = tmp_path / "run.json"
    monkeypatch.setattr(sys, "argv", ["eval_accuracy.py", "--tasks", "passkey", "vt", "--lengths", "512", "1024",
                                      "--depths", "0.25", "0.75", "--seeds", "3", "--seed", "7", "--methods",
                                      "vattention", "--budgets", "128", "256", "--set", "sample_capacity=budget",
                                      "--resamples", "300", "--out", str(out)])
    assert eval_accuracy.main() == 0
    assert seen["seeds"] == 3 and seen["seed"] == 7
    assert [(label, c.token_budget, c.sample_capacity) for label, c in seen["configs"][1:]] == \
        [("vattention[sample_capacity=budget]", 128, 128), ("vattention[sample_capacity=budget]", 256, 256)]
    run = json.loads(out.read_text())
    assert run["commit"] == "abc123" and run["gpu"] and "versions" in run and run["complete"] is True
    assert run["instances_per_task_length"] == 6 and run["resamples"] == 300
    assert len(run["results"]) == 3 * 2 * 2 * 2 * 3
    overall = [r for r in run["rows"] if r["scope"] == "overall"]
    assert [(r["config"], r["budget"], r["n"]) for r in overall] == \
        [("dense", 0, 24), ("vattention[sample_capacity=budget]", 128, 24),
         ("vattention[sample_capacity=budget]", 256, 24)]
    assert overall[1]["score"] == pytest.approx(8 / 24)               # seed 8 of 7, 8, 9 scores
    assert run["curve"]["length"] == 1024 and (tmp_path / "run_curve.png").exists()


def test_dense_only_run_and_nothing_to_run(tmp_path, monkeypatch):
    """``--methods`` with no preset runs dense alone (a GPU of its own); with ``--no-dense`` as well, nothing to
    run is an error, not an empty file."""
    from sgl_sparse import accuracy

    seen = []

    def fake_evaluate(model, task_names, lengths, depths, configs, seed, progress, **kw):
        seen.append(configs)
        progress(Result("cpu", model, "dense", 512, "passkey", 512, 0.5, 1.0, 1.0, "x", 0.0, seed=0, config="dense"))

    monkeypatch.setattr(accuracy, "evaluate", fake_evaluate)
    argv = ["eval_accuracy.py", "--tasks", "passkey", "--lengths", "512", "--out", str(tmp_path / "d.json"),
            "--methods"]
    monkeypatch.setattr(sys, "argv", argv)
    assert eval_accuracy.main() == 0
    assert [(label, c.method) for label, c in seen[0]] == [("dense", "dense")]
    rows = json.loads((tmp_path / "d.json").read_text())["rows"]
    assert [(r["config"], r["scope"], r["n"]) for r in rows] == [("dense", "length", 1), ("dense", "overall", 1),
                                                                  ("dense", "task", 1), ("dense", "task_length", 1)]
    monkeypatch.setattr(sys, "argv", argv + ["--no-dense"])
    with pytest.raises(SystemExit, match="nothing to run"):
        eval_accuracy.main()


@pytest.mark.parametrize("argv,message", [
    (["--path", "sglang", "--methods", "quest", "--set", "page_size=8", "--server-page-size", "12"],
     "--server-page-size 12 is not a multiple of quest[page_size=8]'s page (8 tokens): give a multiple of it"),
    (["--methods", "quest", "--server-page-size", "16"],
     "--server-page-size applies to the sglang path only"),
])
def test_server_page_size_refused_before_any_server(tmp_path, monkeypatch, capsys, argv, message):
    """A --server-page-size that does not serve every config (or the cpu path) is one line naming the fix,
    before anything starts."""
    from sgl_sparse import accuracy

    monkeypatch.setattr(accuracy, "evaluate_server", lambda *a, **k: pytest.fail("a server was started"))
    monkeypatch.setattr(accuracy, "evaluate", lambda *a, **k: pytest.fail("the cpu path ran"))
    monkeypatch.setattr(sys, "argv", ["eval_accuracy.py", "--tasks", "passkey", "--lengths", "512",
                                      "--out", str(tmp_path / "x.json"), *argv])
    with pytest.raises(SystemExit) as e:
        eval_accuracy.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_server_page_size_reaches_every_server(tmp_path, monkeypatch):
    """--server-page-size 16 with quest:page_size=8 passes SGLang's page to evaluate_server (which gives it to
    every server it starts)."""
    from sgl_sparse import accuracy

    seen = {}

    def fake_evaluate_server(model_dir, model, task_names, lengths, depths, configs, seed, progress, **kw):
        seen.update(kw, configs=configs)
        for label, cfg in configs:
            progress(Result("sglang", model, cfg.method, cfg.token_budget if cfg.is_sparse else 512, "passkey", 512,
                            0.5, 1.0, 0.1 if cfg.is_sparse else 1.0, "x", 0.0, seed=0, config=label))

    monkeypatch.setattr(accuracy, "evaluate_server", fake_evaluate_server)
    monkeypatch.setattr(accuracy, "model_dir_for", lambda model, d: tmp_path)
    monkeypatch.setattr(sys, "argv", ["eval_accuracy.py", "--path", "sglang", "--tasks", "passkey", "--lengths", "512",
                                      "--methods", "quest", "--budgets", "640", "--set", "page_size=8",
                                      "--server-page-size", "16", "--out", str(tmp_path / "p.json")])
    assert eval_accuracy.main() == 0
    assert seen["page_size"] == 16 and [c.page_size for _, c in seen["configs"][1:]] == [8]
    assert json.loads((tmp_path / "p.json").read_text())["args"]["server_page_size"] == 16


def test_combine_keeps_only_the_seeds_asked_for(tmp_path):
    """--only-seeds scores a subset of the instances: a config that loses only on seeds 0-1 is at dense on seeds 2-4
    and below it on 0-1; the report names the seeds it kept."""
    score = lambda m, b, t, seed: 0.0 if (m != "dense" and seed < 2) else 1.0  # noqa: E731
    a = _meta_run(tmp_path / "a.json", "c1", "quest", [1024], score)
    assert eval_accuracy.combine([str(a)], str(tmp_path / "late.json"), only_seeds=[2, 3, 4]) == 0
    assert eval_accuracy.combine([str(a)], str(tmp_path / "early.json"), only_seeds=[0, 1]) == 0
    late, early = (json.loads((tmp_path / f).read_text()) for f in ("late.json", "early.json"))
    row = lambda rep: next(r for r in rep["rows"] if r["method"] == "quest" and r.get("scope") == "overall")  # noqa
    assert row(late)["relative"] == 1.0 and row(late)["n"] == 12 and late["only_seeds"] == [2, 3, 4]
    assert row(early)["relative"] == 0.0 and row(early)["n"] == 8
    assert {r["seed"] for r in early["results"]} == {0, 1}
