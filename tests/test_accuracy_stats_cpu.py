"""Accuracy statistics and the instance set (sgl_sparse.accuracy), no model and no server needed.

The bootstrap intervals (coverage, narrowing with n, seeding, the paired ratio), the rows per scope with their
instance counts, the accuracy/attended curve data, the goals judged on the rows, the seeded instances, and the
sglang path's loop over configs with a stand-in server (every instance in one run_batch per config, labels, seeds
and timings in the results).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sgl_sparse import accuracy, tasks
from sgl_sparse.accuracy import Result, bootstrap_mean_ci, paired_relative_ci
from sgl_sparse.config import SparseConfigError


def words(s: str) -> int:
    return len(s.split())


# ----------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    """200 Bernoulli(0.7) samples of 60: the 95 % interval holds 0.7 in roughly 95 % of them (percentile
    bootstrap undercovers a little at small n; a broken interval — too narrow or off-centre — falls far out)."""
    rng = np.random.default_rng(1)
    hits = 0
    for k in range(200):
        x = (rng.random(60) < 0.7).astype(float)
        mean, (lo, hi) = bootstrap_mean_ci(x, resamples=1000, seed=k)
        assert lo <= mean <= hi
        hits += lo <= 0.7 <= hi
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_bootstrap_ci_narrows_with_n_like_the_binomial_standard_error():
    rng = np.random.default_rng(2)
    widths = {}
    for n in (50, 800):
        x = (rng.random(n) < 0.5).astype(float)
        mean, (lo, hi) = bootstrap_mean_ci(x, seed=0)
        assert lo <= 0.5 <= hi
        widths[n] = hi - lo
        expected = 2 * 1.96 * (0.25 / n) ** 0.5            # normal approximation of the 95 % interval
        assert 0.75 * expected <= widths[n] <= 1.25 * expected, (n, widths[n], expected)
    assert widths[800] < widths[50] / 3                     # sqrt(16) = 4 narrower in theory


def test_bootstrap_is_deterministic_per_seed_and_handles_edge_cases():
    x = np.random.default_rng(0).random(30)
    assert bootstrap_mean_ci(x, seed=3) == bootstrap_mean_ci(x, seed=3)
    assert bootstrap_mean_ci(x, seed=3)[1] != bootstrap_mean_ci(x, seed=4)[1]   # the seed is really used
    assert bootstrap_mean_ci([]) == (None, None)
    assert bootstrap_mean_ci([0.25]) == (0.25, [0.25, 0.25])
    assert bootstrap_mean_ci([1.0] * 30) == (1.0, [1.0, 1.0])


def test_paired_relative_is_exactly_one_when_sparse_equals_dense_per_instance():
    rng = np.random.default_rng(3)
    dense = rng.random(90).round(2)
    rel, ci = paired_relative_ci(dense.copy(), dense)
    assert rel == 1.0 and ci == [1.0, 1.0]
    # unpaired resampling of the same numbers would give a wide interval around 1: pairing is what makes it exact
    _, (lo, hi) = bootstrap_mean_ci(dense)
    assert hi - lo > 0.05
    # a constant per-instance ratio survives every replicate
    assert paired_relative_ci(dense * 0.5, dense) == (0.5, [0.5, 0.5])


def test_paired_relative_ratio_of_means_and_undefined_cases():
    dense = [1.0] * 8 + [0.0] * 2
    sparse = [1.0] * 6 + [0.0] * 2 + [1.0, 0.0]       # loses two instances, gains one dense missed
    rel, (lo, hi) = paired_relative_ci(sparse, dense, seed=5)
    assert rel == pytest.approx(0.7 / 0.8)
    assert lo < rel < 1.0 < hi                            # it may gain as well as lose
    assert paired_relative_ci([1.0, 0.0], [0.0, 0.0]) == (None, None)   # dense mean 0: relative undefined
    assert paired_relative_ci([], []) == (None, None)
    with pytest.raises(ValueError, match="paired"):
        paired_relative_ci([1.0], [1.0, 0.0])


# ----------------------------------------------------------------------------- rows

def _results(score, tasks_=("passkey", "cwe"), lengths=(4096, 32000), depths=(0.2, 0.8), seeds=(0, 1, 2),
             configs=(("dense", "dense", 0), ("quest", "quest", 512), ("quest", "quest", 2048))):
    """Synthetic results: ``score(config, budget, task, length, depth, seed)`` per instance."""
    out = []
    for method, label, budget in configs:
        for t in tasks_:
            for L in lengths:
                for d in depths:
                    for s in seeds:
                        frac = 1.0 if method == "dense" else budget / L
                        out.append(Result("sglang", "qwen05b", method, budget if budget else L, t, L, d,
                                          score(label, budget, t, L, d, s), frac, "x", 0.1, seed=s, config=label))
    return out


def _score(label, budget, task, length, depth, seed):
    if label == "dense":
        return 0.0 if task == "cwe" and length == 32000 else 1.0
    if budget == 512 and length == 32000 and task == "passkey":
        return 1.0 if seed == 0 else 0.0                   # loses 2 of every 3 instances
    return 0.0 if task == "cwe" and length == 32000 else 1.0


def test_rows_per_scope_with_instance_counts():
    rows = accuracy.summarize(_results(_score))
    by = {(r["config"], r["budget"], r["scope"], r["length"], r["task"]): r for r in rows}
    assert {r["scope"] for r in rows} == set(accuracy.SCOPES)
    assert len(rows) == 3 * (2 + 1 + 2 + 4)                # per config: 2 lengths, overall, 2 tasks, 2 x 2
    for r in rows:
        expected_n = {"length": 12, "overall": 24, "task": 12, "task_length": 6}[r["scope"]]
        assert r["n"] == expected_n and r["n_paired"] == expected_n, r
        for field in ("method", "config", "budget", "length", "task", "score", "score_ci", "dense_score",
                      "relative", "relative_ci", "attended_fraction", "n"):
            assert field in r
    q = by[("quest", 512, "length", 32000, None)]
    assert q["score"] == pytest.approx(2 / 12)              # passkey 2 of 6, cwe 0 of 6
    assert q["dense_score"] == pytest.approx(0.5)
    assert q["relative"] == pytest.approx(1 / 3)
    assert q["relative_ci"][0] < 1 / 3 < q["relative_ci"][1] < 1
    assert q["attended_fraction"] == pytest.approx(512 / 32000)
    overall = by[("quest", 512, "overall", None, None)]
    assert overall["score"] == pytest.approx((12 + 2) / 24) and overall["dense_score"] == pytest.approx(18 / 24)
    # a task dense scores 0 on: relative undefined
    cwe = by[("quest", 2048, "task_length", 32000, "cwe")]
    assert cwe["score"] == 0 and cwe["relative"] is None and cwe["relative_ci"] is None
    # where sparse answers exactly as dense, the paired interval is [1, 1]
    same = by[("quest", 2048, "length", 32000, None)]
    assert same["relative"] == 1.0 and same["relative_ci"] == [1.0, 1.0]
    dense = by[("dense", 0, "task", None, "passkey")]
    assert dense["relative"] == 1.0 and dense["score_ci"] == [1.0, 1.0]
    assert rows[0]["config"] == "dense"                      # dense first, then configs by label and budget


def test_rows_pair_only_the_instances_both_answered_and_read_old_results():
    res = _results(_score, configs=(("dense", "dense", 0),))
    # a sparse run that answered only seed 0 (and, like files written before seeds and labels, has neither)
    old = [Result("sglang", "qwen05b", "quest", 1024, r.task, r.length, r.depth, 0.0, 0.1, "x", 0.1)
           for r in res if r.seed == 0]
    rows = accuracy.summarize(res + old)
    q = next(r for r in rows if r["config"] == "quest" and r["scope"] == "overall")
    assert q["n"] == 8 and q["n_paired"] == 0 and q["relative"] is None    # seed None pairs with no seed 0..2
    for r in old:
        r.seed = 0
    q = next(r for r in accuracy.summarize(res + old) if r["config"] == "quest" and r["scope"] == "overall")
    assert q["n"] == 8 and q["n_paired"] == 8 and q["relative"] == 0.0 and q["dense_score"] == 0.75


def test_rows_keep_configs_apart_by_label():
    res = _results(_score, configs=(("dense", "dense", 0), ("quest", "quest", 512),
                                    ("quest", "quest[page_size=8]", 512)))
    labels = {(r["config"], r["method"]) for r in accuracy.summarize(res) if r["scope"] == "overall"}
    assert labels == {("dense", "dense"), ("quest", "quest"), ("quest[page_size=8]", "quest")}


def test_vattention_measured_violation_rate_is_kept_in_rows():
    res = _results(lambda *a: 1.0, tasks_=("passkey",), lengths=(4096,), depths=(0.5,), seeds=(0, 1),
                   configs=(("dense", "dense", 0), ("vattention", "vattention", 256)))
    for r, v in zip([r for r in res if r.method == "vattention"], (0.02, 0.04)):
        r.violation_rate, r.mean_error = v, v / 2
    rows = accuracy.summarize(res)
    v = next(r for r in rows if r["method"] == "vattention" and r["scope"] == "length")
    assert v["violation_rate"] == pytest.approx(0.03) and v["mean_error"] == pytest.approx(0.015)
    assert next(r for r in rows if r["method"] == "dense")["violation_rate"] is None


# ----------------------------------------------------------------------------- curve

def test_curve_points_at_the_longest_length_by_default():
    rows = accuracy.summarize(_results(_score))
    curve = accuracy.curve_points(rows)
    assert curve["length"] == 32000
    assert curve["dense"]["method"] == "dense" and curve["dense"]["length"] == 32000
    assert list(curve["lines"]) == ["quest"]
    pts = curve["lines"]["quest"]
    assert [p["budget"] for p in pts] == [512, 2048]        # sorted by attended fraction
    assert [p["attended_fraction"] for p in pts] == pytest.approx([512 / 32000, 2048 / 32000])
    assert pts[0]["relative"] == pytest.approx(1 / 3) and pts[1]["relative"] == 1.0
    assert pts[0]["relative_ci"] and pts[0]["score_ci"] and pts[0]["n"] == 12
    short = accuracy.curve_points(rows, 4096)
    assert short["length"] == 4096 and [p["relative"] for p in short["lines"]["quest"]] == [1.0, 1.0]
    assert accuracy.curve_points(rows, 999)["lines"] == {}


def test_curve_points_from_rows_written_before_scopes():
    old_rows = [dict(method="dense", budget=0, length=8192, score=0.9, dense_score=0.9, relative=1.0,
                     attended_fraction=1.0, n=3),
                dict(method="quest", budget=1024, length=8192, score=0.6, dense_score=0.9, relative=0.6 / 0.9,
                     attended_fraction=0.2, n=3),
                dict(method="quest", budget=256, length=8192, score=0.3, dense_score=0.9, relative=0.3 / 0.9,
                     attended_fraction=0.05, n=3)]
    curve = accuracy.curve_points(old_rows)
    assert curve["length"] == 8192 and [p["budget"] for p in curve["lines"]["quest"]] == [256, 1024]


def _row(method, config, budget, attended, relative, n=90, length=32000):
    return dict(method=method, config=config, budget=budget, length=length, task=None, scope="length",
                attended_fraction=attended, relative=relative, relative_ci=[relative - 0.05, relative + 0.05], n=n)


def test_goal_report_met_best_and_reached_at():
    """A goal is met by a row within its attended limit that reaches its relative score; the best row within the
    limit and the cheapest row that reaches the score anywhere are reported; rows of too few instances, of another
    length or of another method do not count."""
    goals = (accuracy.AccuracyGoal("quest", 0.99, 1 / 16), accuracy.AccuracyGoal("vattention", 0.97, 0.02),
             accuracy.AccuracyGoal("twilight", 0.99, 0.02))
    rows = [_row("quest", "quest", 1024, 0.032, 0.90), _row("quest", "quest", 2048, 0.0638, 0.995),
            _row("quest", "quest", 16384, 0.51, 0.999), _row("quest", "quest", 512, 0.016, 1.0, n=30),
            _row("quest", "quest", 256, 0.008, 1.0, length=8192),
            _row("vattention", "va", 128, 0.016, 0.95), _row("vattention", "va:s=512", 128, 0.02, 0.975),
            _row("vattention", "va", 512, 0.032, 0.99), _row("twilight", "tw", 4096, 0.03, 1.0, length=8192),
            dict(_row("dense", "dense", 0, 1.0, 1.0), n=180)]
    quest, va, tw = accuracy.goal_report(rows, goals)
    assert quest["length"] == 32000 and quest["met"] is False           # 2048 attends 6.38 % > 1/16
    assert quest["best"]["budget"] == 1024 and quest["best"]["relative"] == 0.90
    assert quest["reached_at"]["budget"] == 2048 and quest["measured_up_to"] == 0.51
    assert va["met"] is True and va["best"]["config"] == "va:s=512"     # 2.0 % is within "<= 2 %"
    assert va["reached_at"]["config"] == "va:s=512"
    assert tw["met"] is None and tw["best"] is None and tw["reached_at"] is None   # only an 8K row
    lines = [accuracy.describe_goal(g) for g in (quest, va, tw)]
    assert "not met" in lines[0] and "reached at 6.38 %" in lines[0]
    assert ": met;" in lines[1] and "not measured" in lines[2]
    short = accuracy.goal_report(rows, goals, length=8192)
    assert short[0]["met"] is True and short[2]["met"] is False and short[2]["reached_at"]["budget"] == 4096


def test_goal_report_not_reached_within_what_was_measured():
    (g,) = accuracy.goal_report([_row("twilight", "tw", 4096, 0.0101, 0.931),
                                 _row("twilight", "tw", 2048, 0.0048, 0.886)],
                                (accuracy.AccuracyGoal("twilight", 0.99, 0.02),))
    assert g["met"] is False and g["best"]["budget"] == 4096 and g["reached_at"] is None
    assert g["measured_up_to"] == 0.0101
    assert "not reached up to 1.01 % attended" in accuracy.describe_goal(g)


# ----------------------------------------------------------------------------- instances and configs

def test_instance_specs_count_distinct_and_deterministic():
    specs = accuracy.instance_specs(["passkey", "cwe"], [300, 600], [0.1, 0.3, 0.5, 0.7, 0.9], seeds=2, seed=10)
    assert len(specs) == 2 * 2 * 5 * 2 == len(set(specs))
    assert {s[3] for s in specs} == {10, 11}
    assert specs == accuracy.instance_specs(["passkey", "cwe"], [300, 600], [0.1, 0.3, 0.5, 0.7, 0.9], 2, 10)
    per = {}
    for t, L, d, k in specs:
        per.setdefault((t, L), []).append((d, k))
    assert all(len(v) == 10 for v in per.values())
    assert accuracy.instance_specs(["vt"], [300], [0.5]) == [("vt", 300, 0.5, 0)]   # the old default: one seed
    with pytest.raises(ValueError):
        accuracy.instance_specs(["vt"], [300], [0.5], seeds=0)
    with pytest.raises(ValueError):
        accuracy.instance_specs(["vt"], [300], [0.5, 0.5])


@pytest.mark.parametrize("task", tasks.TASKS)
def test_instances_of_a_task_and_length_all_differ_and_regenerate_identically(task):
    specs = accuracy.instance_specs([task], [400], [0.1, 0.3, 0.5, 0.7, 0.9], seeds=2)
    insts = [tasks.make_task(t, L, d, k, words) for t, L, d, k in specs]
    assert len({i.prompt for i in insts}) == 10
    assert len({tuple(i.answers) for i in insts}) >= 9       # the needles differ, not only their position
    again = [tasks.make_task(t, L, d, k, words) for t, L, d, k in specs]
    assert [i.prompt for i in again] == [i.prompt for i in insts]


def test_named_configs_labels_and_budget_valued_overrides():
    named = accuracy.named_configs(["vattention", "quest"], [256, 1024], sample_capacity="budget")
    assert [label for label, _ in named] == ["dense"] + ["vattention[sample_capacity=budget]"] * 2 + \
        ["quest[sample_capacity=budget]"] * 2
    for label, cfg in named[1:]:
        assert cfg.sample_capacity == cfg.token_budget and cfg.min_context == 0
    plain = accuracy.named_configs(["quest"], [512], page_size=8)
    assert plain[1][0] == "quest[page_size=8]" and plain[1][1].page_size == 8
    assert accuracy.named_configs(["twilight"], [512])[1][0] == "twilight"
    assert accuracy.configs_for(["quest"], [512]) == [c for _, c in accuracy.named_configs(["quest"], [512])]


def test_a_method_with_its_own_budget_runs_at_that_budget_alone():
    """Configs of different budgets beside one dense server: an inline token_budget wins over --budgets."""
    named = accuracy.named_configs(["vattention:page_size=8,token_budget=320", "quest"], [1024, 2048],
                                   sample_capacity="budget")
    got = [(label, cfg.token_budget, cfg.sample_capacity, cfg.page_size) for label, cfg in named[1:]]
    assert got == [("vattention:page_size=8,token_budget=320[sample_capacity=budget]", 320, 320, 8),
                   ("quest[sample_capacity=budget]", 1024, 1024, 16), ("quest[sample_capacity=budget]", 2048, 2048, 16)]
    assert accuracy.spec_budget("twilight:top_p=0.99") is None and accuracy.spec_budget("quest") is None
    assert accuracy.spec_budget("quest:token_budget=24576,reselect_every=4") == 24576
    with pytest.raises(SparseConfigError, match="token_budget='budget' is not a whole number"):
        accuracy.spec_budget("quest:token_budget=budget")


# ----------------------------------------------------------------------------- sglang path with a stand-in server

@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A model directory with a config.json, a whitespace tokenizer and RuntimeEndpoint(url) = url."""
    pytest.importorskip("sglang")
    import sglang
    import transformers

    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 32768}))

    class Tok:
        def __call__(self, s, add_special_tokens=False):
            return type("Enc", (), {"input_ids": s.split()})()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", staticmethod(lambda *a, **k: Tok()))
    monkeypatch.setattr(sglang, "RuntimeEndpoint", lambda url: url)

def test_evaluate_server_sends_every_instance_once_per_config(tmp_path, monkeypatch, stand_ins):
    """evaluate_server with the server, tokenizer and frontend stood in: one run_batch per config carrying every
    instance (tasks x lengths x depths x seeds), results labelled with the config and the instance's seed, the
    attended fraction from the meta info, and one timing per config."""
    started, servers = [], {}

    class FakeServer:
        def __init__(self, model_dir, cfg, *, name, **kw):
            self.url, self.log_path, self.up = name, tmp_path / f"{name}.log", False
            started.append((name, cfg))
            servers[name] = self

        def start(self):
            self.up = True
            return self

        def wait_ready(self, timeout):
            assert self.up
            return self

        def stop(self):
            self.up = False

    monkeypatch.setattr(accuracy, "server_for", FakeServer)
    batches = []

    def fake_frontend(url, insts, concurrency):
        assert servers[url].up and sum(s.up for s in servers.values()) == 1    # one server at a time, running
        batches.append((url, [(i.task, i.length, i.depth, i.prompt) for i in insts]))
        dense = url.endswith("dense")
        rnd = random.Random(url)
        return [(" ".join(i.answers) if dense or rnd.random() < 0.5 else "no idea",
                 {} if dense else {accuracy.META_KEY: [None, 0.5, 0.125]}) for i in insts]

    monkeypatch.setattr(accuracy, "run_frontend", fake_frontend)
    timings = []
    configs = accuracy.named_configs(["quest"], [256, 512], page_size=8)
    res = accuracy.evaluate_server(tmp_path, "qwen05b", ["passkey", "niah_single_1"], [300, 600], [0.2, 0.8],
                                   configs, seed=4, seeds=3, timings=timings)
    assert [name for name, _ in started] == ["00_dense", "01_quest_page_size_8__256", "02_quest_page_size_8__512"]
    assert len(batches) == 3 and all(len(b) == 2 * 2 * 2 * 3 for _, b in batches)
    assert batches[0][1] == batches[1][1] == batches[2][1]          # the same instances for every config
    assert len({p for *_, p in batches[0][1]}) == 24
    assert len(res) == 72 and len({(r.label, r.budget) + r.instance for r in res}) == 72
    assert {r.seed for r in res} == {4, 5, 6}
    assert {r.label for r in res} == {"dense", "quest[page_size=8]"}
    assert all(r.score == 1.0 and r.attended_fraction == 1.0 for r in res if r.method == "dense")
    assert all(r.attended_fraction == 0.125 for r in res if r.method == "quest")
    assert [(t["config"], t["budget"], t["requests"]) for t in timings] == \
        [("dense", None, 24), ("quest[page_size=8]", 256, 24), ("quest[page_size=8]", 512, 24)]
    rows = accuracy.summarize(res)
    assert all(r["n"] == 12 for r in rows if r["scope"] == "length")      # 2 tasks x 2 depths x 3 seeds
    assert all(r["n"] == 24 for r in rows if r["scope"] == "overall")
    assert all(r["n_paired"] == r["n"] for r in rows)


def test_evaluate_server_runs_configs_side_by_side(tmp_path, monkeypatch, stand_ins):
    """parallel=2: one kernel warm-up of the sparse configs, then servers start in groups of two, both of a
    group are up while their batches run, each pool is capped at what the requests in flight need, and the results
    are those of the same configs run one at a time."""
    servers, events = {}, []

    class FakeServer:
        def __init__(self, model_dir, cfg, *, name, extra_args, **kw):
            self.url, self.log_path, self.up, self.extra = name, tmp_path / f"{name}.log", False, extra_args
            servers[name] = self

        def start(self):
            events.append(("start", self.url))
            self.up = True
            return self

        def wait_ready(self, timeout):
            return self

        def stop(self):
            events.append(("stop", self.url))
            self.up = False

    monkeypatch.setattr(accuracy, "server_for", FakeServer)
    monkeypatch.setattr(accuracy, "warm_up", lambda model_dir, cfgs, log_dir, env: events.append(
        ("warm_up", tuple(c.token_budget for c in cfgs if c.is_sparse))))
    up_together = []

    def fake_frontend(url, insts, concurrency):
        up_together.append(sorted(n for n, s in servers.items() if s.up))
        return [(" ".join(i.answers), {accuracy.META_KEY: [0.25]} if "quest" in url else {}) for i in insts]

    monkeypatch.setattr(accuracy, "run_frontend", fake_frontend)
    configs = accuracy.named_configs(["quest"], [256, 512])
    timings = []
    res = accuracy.evaluate_server(tmp_path, "qwen05b", ["passkey"], [300], [0.2, 0.8], configs, seeds=2,
                                   timings=timings, parallel=2, concurrency=4)
    assert events[0] == ("warm_up", (256, 512))                    # every sparse config, once, before any server
    assert [e[1] for e in events if e[0] == "start"] == ["00_dense", "01_quest_256", "02_quest_512"]
    assert events.index(("stop", "00_dense")) > events.index(("start", "01_quest_256"))
    assert events.index(("start", "02_quest_512")) > events.index(("stop", "01_quest_256"))
    assert up_together[:2] == [["00_dense", "01_quest_256"]] * 2 and up_together[2] == ["02_quest_512"]
    extra = servers["00_dense"].extra
    context = int(extra[extra.index("--context-length") + 1])
    assert extra[extra.index("--max-total-tokens") + 1] == str(4 * context + 8 * 1024)
    assert extra[extra.index("--mem-fraction-static") + 1] == "0.9"
    assert [t["servers_side_by_side"] for t in timings] == [2, 2, 1]
    assert len(res) == 12 and all(r.score == 1.0 for r in res)
    assert {r.attended_fraction for r in res if r.method == "quest"} == {0.25}
    with pytest.raises(ValueError, match="parallel"):
        accuracy.evaluate_server(tmp_path, "qwen05b", ["passkey"], [300], [0.2], configs, parallel=0)


def test_a_server_that_dies_mid_batch_is_reported_with_its_log(tmp_path, monkeypatch, stand_ins):
    """A request that fails because its server died raises ServerError naming the request, the server's exit code
    and the tail of its log (the log of servers run side by side lives in a directory that may be gone), and every
    server of the group is stopped."""
    from sgl_sparse.serving import ServerError

    servers = {}

    class FakeServer:
        def __init__(self, model_dir, cfg, *, name, **kw):
            self.url, self.log_path, self.up = name, tmp_path / f"{name}.log", False
            self.proc = type("Proc", (), {"returncode": None})()
            servers[name] = self

        def start(self):
            self.up = True
            return self

        def wait_ready(self, timeout):
            return self

        def alive(self):
            return self.proc.returncode is None

        def log_tail(self):
            return "Traceback ...\nRuntimeError: CUDA error: an illegal memory access was encountered" \
                if "quest" in self.url else "all fine"

        def stop(self):
            self.up = False

    def fake_frontend(url, insts, concurrency):
        if "quest" in url:
            servers[url].proc.returncode = -6
            raise RuntimeError(f"{insts[0].task} length {insts[0].length}: RemoteDisconnected('Remote end closed')")
        return [(" ".join(i.answers), {}) for i in insts]

    monkeypatch.setattr(accuracy, "server_for", FakeServer)
    monkeypatch.setattr(accuracy, "warm_up", lambda *a: None)
    monkeypatch.setattr(accuracy, "run_frontend", fake_frontend)
    configs = accuracy.named_configs(["quest"], [256])
    with pytest.raises(ServerError) as err:
        accuracy.evaluate_server(tmp_path, "qwen05b", ["passkey"], [300], [0.5], configs, parallel=2)
    message = str(err.value)
    assert "passkey length 300" in message and "RemoteDisconnected" in message
    assert "exited with code -6" in message and "01_quest_256.log" in message
    assert message.endswith("CUDA error: an illegal memory access was encountered")
    assert not any(s.up for s in servers.values())
