"""The generated long-context tasks: lengths, needles, answers and RULER scoring (no model needed)."""

from __future__ import annotations

import pytest

from sgl_sparse import tasks


def words(s: str) -> int:          # a stand-in tokenizer: whitespace words
    return len(s.split())


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [300, 2000])
def test_instances_hit_length_and_hold_their_answers(task, length):
    inst = tasks.make_task(task, length, 0.4, 7, words)
    n = words(inst.prompt)
    assert 0.8 * length <= n <= length + 40, n
    for a in inst.answers:
        assert a in inst.prompt
    assert inst.score(" ".join(inst.answers)) == 1.0
    assert inst.score("nothing relevant") == 0.0


def merged(s: str) -> int:
    """A stand-in tokenizer whose count of a text is below the sum over its sentences (as BPE merges across
    sentence boundaries): words, plus one per call."""
    return len(s.split()) + 1


@pytest.mark.parametrize("task", tasks.TASKS)
def test_prompts_fill_their_length_when_counts_merge_across_sentences(task):
    length = 8000
    n = merged(tasks.make_task(task, length, 0.5, 3, merged).prompt)
    assert length - 60 <= n <= length, n


def test_seeded_and_depth_controls_needle_position():
    a = tasks.make_task("niah_single_1", 1000, 0.1, 1, words)
    b = tasks.make_task("niah_single_1", 1000, 0.1, 1, words)
    c = tasks.make_task("niah_single_1", 1000, 0.9, 1, words)
    assert a.prompt == b.prompt
    pos = lambda inst: inst.prompt.index(inst.answers[0]) / len(inst.prompt)  # noqa: E731
    assert pos(a) < 0.2 and pos(c) > 0.8


def test_partial_credit_and_unknown_task():
    inst = tasks.make_task("niah_multivalue", 500, 0.3, 2, words)
    assert inst.score(" ".join(inst.answers[:2])) == 0.5
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_task("qa_1", 500, 0.3, 2, words)


def test_token_counter_counts_as_the_tokenizer_and_memoizes_short_texts_only():
    """token_counter gives the tokenizer's own count (no special tokens) for every text, and asks the tokenizer
    once per distinct short text: instances generated with it are the ones plain counting generates."""
    calls = []

    class Tokenizer:                          # a word tokenizer that records what it was asked
        def __call__(self, text, add_special_tokens):
            assert add_special_tokens is False
            calls.append(text)
            return type("Encoding", (), {"input_ids": text.split()})()

    count = tasks.token_counter(Tokenizer(), memo_below=64)
    short, long = "a b c", " ".join(["word"] * 40)
    assert [count(short), count(short), count(long), count(long)] == [3, 3, 40, 40]
    assert calls == [short, long, long]
    plain = lambda s: len(s.split())  # noqa: E731
    for task in tasks.TASKS:
        assert tasks.make_task(task, 600, 0.4, 1, tasks.token_counter(Tokenizer())).prompt == \
            tasks.make_task(task, 600, 0.4, 1, plain).prompt
