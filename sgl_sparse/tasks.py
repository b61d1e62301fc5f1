"""Long-context tasks generated offline and seeded, after RULER's definitions (no downloads).

Each task instance is a prompt (a haystack of filler text with the needles inserted at chosen depths, then the
question), the expected answers and RULER's score for these tasks, ``string_match_all``: the fraction of the
expected answers that appear in the output. Lengths are reached in tokens of the model's own tokenizer.

Tasks: ``passkey``; ``niah_single_{1,2,3}`` (haystack: repeated noise sentence / essay-like text / essay-like
text with a UUID value); ``niah_multikey`` (several keys, one asked); ``niah_multivalue`` (one key, several
values); ``niah_multiquery`` (several keys asked); ``vt`` (variable tracking); ``cwe`` (common words extraction).
"""

from __future__ import annotations

import functools
import random
import string
import uuid
from dataclasses import dataclass

TASKS = ("passkey", "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey", "niah_multivalue",
         "niah_multiquery", "vt", "cwe")

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

# A generated "essay" haystack: sentences assembled from a fixed vocabulary, deterministic per seed.
_SUBJECTS = ["The committee", "A young engineer", "The old library", "Every morning the baker", "The river",
             "Our neighbour", "The small company", "A travelling musician", "The city council", "The gardener",
             "The research team", "A curious student", "The lighthouse keeper", "The orchestra", "The farmer"]
_VERBS = ["considered", "remembered", "described", "questioned", "celebrated", "ignored", "studied", "rebuilt",
          "painted", "measured", "explained", "discovered", "borrowed", "planned", "repaired"]
_OBJECTS = ["the long winter", "a forgotten map", "the price of bread", "an unusual letter", "the evening train",
            "the quiet harbour", "a new bridge", "the story of the valley", "an old recipe", "the morning market",
            "a broken clock", "the northern road", "the annual festival", "a set of drawings", "the school garden"]
_TAILS = ["with great care.", "before anyone noticed.", "for the third time that year.", "without saying a word.",
          "while the rain kept falling.", "as the light faded.", "in front of the whole town.",
          "after a long discussion.", "to everyone's surprise.", "with a few close friends."]

_WORDS = ["apple", "river", "stone", "cloud", "window", "garden", "silver", "paper", "forest", "candle", "bridge",
          "harbor", "pepper", "violin", "marble", "copper", "meadow", "lantern", "basket", "thunder", "saddle",
          "pencil", "island", "mirror", "orchard", "feather", "kettle", "blanket", "compass", "ladder"]


@dataclass
class TaskInstance:
    task: str
    length: int              # target length in tokens
    depth: float             # relative position of the (first) needle
    prompt: str
    answers: list[str]
    metric: str              # "all" (string_match_all) or "part" (string_match_part)

    def score(self, output: str) -> float:
        """RULER's metrics, in [0, 1]."""
        out = output.lower()
        hits = [a.lower() in out for a in self.answers]
        if self.metric == "part":
            return float(any(hits))
        return sum(hits) / len(hits)


def _essay_sentences(rng: random.Random):
    while True:
        yield f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)} "


def _number(rng, digits=7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _key(rng) -> str:
    return "-".join(rng.choice(_WORDS) for _ in range(2))


def _fill(count_tokens, pieces: list[tuple[float, str]], filler, target: int, question: str) -> str:
    """Filler sentences until the prompt reaches ``target`` tokens, with ``pieces`` at relative depths."""
    sentences: list[str] = []
    budget = target - count_tokens(question) - sum(count_tokens(p) for _, p in pieces) - 16
    # Add sentences by their own counts (essay sentences differ in length), then correct with a real count of the
    # whole (tokens merge across sentence boundaries, so the sum overestimates) until within a sentence of budget.
    real = 0
    for _ in range(20):
        deficit, added = budget - real, 0
        while added < deficit:
            s = next(filler)
            sentences.append(s)
            added += max(1, count_tokens(s))
        real = count_tokens("".join(sentences))
        if budget - real <= max(1, count_tokens(sentences[-1])):
            break
    while sentences and count_tokens("".join(sentences)) > budget:
        sentences.pop()
    for depth, piece in sorted(pieces, key=lambda x: -x[0]):
        sentences.insert(int(round(depth * len(sentences))), piece + " ")
    return "".join(sentences) + "\n" + question


def token_counter(tokenizer, memo_below: int = 512):
    """``count_tokens(text)`` for :func:`make_task`: the tokens of ``text`` by a Hugging Face ``tokenizer``, no special
    tokens. Texts shorter than ``memo_below`` characters (the filler sentences, counted thousands of times per
    prompt from a few hundred distinct ones) are memoized; prompt-length texts are counted every time."""
    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    short = functools.lru_cache(maxsize=1 << 16)(tokens)
    return lambda text: short(text) if len(text) < memo_below else tokens(text)


def make_task(task: str, length: int, depth: float, seed: int, count_tokens) -> TaskInstance:
    """One instance of ``task`` with about ``length`` tokens (per ``count_tokens``), needle at ``depth``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}/{length}/{depth}/{seed}")
    noise = iter(lambda: NOISE, None)
    essay = _essay_sentences(rng)
    depths = lambda n: [min(0.95, max(0.0, depth + 0.07 * i)) for i in range(n)]  # noqa: E731
    if task == "passkey":
        key = _number(rng, 5)
        pieces = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        q = "What is the pass key? The pass key is"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, noise, length, q), [key], "all")
    if task.startswith("niah_single"):
        k = _key(rng)
        if task == "niah_single_3":
            v = str(uuid.UUID(int=rng.getrandbits(128)))
        else:
            v = _number(rng)
        filler = noise if task == "niah_single_1" else essay
        pieces = [(depth, f"One of the special magic numbers for {k} is: {v}.")]
        q = f"What is the special magic number for {k} mentioned in the provided text? The special magic number for {k} mentioned in the provided text is"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, filler, length, q), [v], "all")
    if task == "niah_multikey":
        keys = list(dict.fromkeys(_key(rng) for _ in range(8)))[:4]
        vals = [_number(rng) for _ in keys]
        pieces = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths(4), keys, vals)]
        i = rng.randrange(len(keys))
        q = f"What is the special magic number for {keys[i]} mentioned in the provided text? The special magic number for {keys[i]} mentioned in the provided text is"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, essay, length, q), [vals[i]], "all")
    if task == "niah_multivalue":
        k = _key(rng)
        vals = [_number(rng) for _ in range(4)]
        pieces = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, v in zip(depths(4), vals)]
        q = f"What are all the special magic numbers for {k} mentioned in the provided text? The special magic numbers for {k} mentioned in the provided text are"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, essay, length, q), vals, "all")
    if task == "niah_multiquery":
        keys = list(dict.fromkeys(_key(rng) for _ in range(8)))[:4]
        vals = [_number(rng) for _ in keys]
        pieces = [(d, f"One of the special magic numbers for {k} is: {v}.") for d, k, v in zip(depths(4), keys, vals)]
        ks = ", ".join(keys)
        q = f"What are all the special magic numbers for {ks} mentioned in the provided text? The special magic numbers for {ks} mentioned in the provided text are"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, essay, length, q), vals, "all")
    if task == "vt":
        value = _number(rng, 5)
        names = ["".join(rng.choice(string.ascii_uppercase) for _ in range(5)) for _ in range(5)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, 5)]
        pieces = list(zip(depths(5), chain))
        q = f"Find all variables that are assigned the value {value} in the text above. Answer: According to the chain(s) of variable assignment in the text above, 5 variables are assigned the value {value}, they are:"
        return TaskInstance(task, length, depth, _fill(count_tokens, pieces, noise, length, q), names, "all")
    # cwe: common words extraction — 10 frequent words (3 times per chunk) among rare ones (once).
    common = rng.sample(_WORDS, 10)
    rare_pool = [w + suffix for w in _WORDS for suffix in ("er", "ing", "ed", "ly")]
    q = "What are the 10 most common words in the above list? Answer: The top 10 words that appear most often in the list are:"
    words: list[str] = []
    render = lambda ws: ("Below is a numbered list of words. " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ws))  # noqa: E731
                         + "\n" + q)
    base = count_tokens(render([]))
    per_word = max(1.0, (count_tokens(render(common * 10)) - base) / 100)
    for _ in range(20):             # past the target by a real count (numbering grows longer down the list)
        while base + len(words) * per_word < 1.1 * length:
            chunk = common * 3 + rng.sample(rare_pool, 20)
            rng.shuffle(chunk)
            words.extend(chunk)
        if count_tokens(render(words)) > length:
            break
        per_word *= 0.8
    lo, hi = 0, len(words)                         # the most words whose prompt fits the target length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(render(words[:mid])) <= length:
            lo = mid
        else:
            hi = mid - 1
    return TaskInstance(task, length, depth, render(words[:lo]), common, "all")
