"""The stand-in LM's language: short reviews on two topics, and a topic task its label words cannot do zero-shot.

A review names things of one topic (fruit or tools) with that topic's verbs, nouns and adjectives, then
``. it was``. In pretraining text the next word is, half the time, an adjective of the review's topic
(``ripe``, ``rusty``), otherwise a verdict, ``great`` or ``terrible``, drawn with fixed odds whatever the
topic. A language model trained on this text must carry the topic to the end of the prompt (it predicts the
topic's adjectives there) and learns the verdicts' odds, but nothing ties a verdict to a topic: on the task
"fruit -> great, tools -> terrible" it prefers the likelier verdict for every review, which is chance on
balanced labels. Since the topic is in its last hidden state, a small change at the top of the network can
map it onto the verdicts.

>>> rng = random.Random(0)
>>> " ".join(review(rng, 0))
'i washed a big melon and this old lemon . it was'
>>> train, test = task_splits(rng, 4, 2)
>>> sorted(train[0])
['choices', 'completion', 'prompt']
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    """The words only one topic's reviews use."""

    verbs: tuple[str, ...]
    """What the reviewer did with the things (``i <verb> ...``)."""
    nouns: tuple[str, ...]
    """The things reviewed."""
    adjectives: tuple[str, ...]
    """Qualities, before a noun or after ``it was``."""


TOPICS = (
    Topic(
        verbs=("ate", "picked", "peeled", "washed"),
        nouns=("apple", "pear", "plum", "peach", "lemon", "mango", "grape", "cherry", "melon", "berry"),
        adjectives=("fresh", "ripe", "sweet", "juicy"),
    ),
    Topic(
        verbs=("used", "fixed", "borrowed", "sharpened"),
        nouns=("hammer", "drill", "wrench", "chisel", "spanner", "axe", "ladder", "shovel", "rake", "clamp"),
        adjectives=("sharp", "heavy", "rusty", "sturdy"),
    ),
)
"""Fruit, then tools: a review's topic is its index here."""
SHARED_ADJECTIVES = ("red", "blue", "green", "yellow", "big", "small", "old", "new")
"""Adjectives both topics use before a noun."""
DETERMINERS = ("a", "the", "my", "this")
PROMPT_END = (".", "it", "was")
"""How every review ends, in pretraining and in the task: the verdict or an adjective comes next."""
VERDICTS = ("great", "terrible")
"""The task's label words, in topic order: fruit reviews are ``great``, tool reviews ``terrible``."""
VERDICT_SHARE = 0.5
"""Share of pretraining reviews followed by a verdict (the others by an adjective of their topic)."""
GREAT_ODDS = 0.7
"""Probability that a pretraining verdict is ``great``, whatever the topic: unequal, so the pretrained model
prefers ``great`` for every review by a clear margin, rather than by noise that could align with the topic."""
MAX_CLAUSES = 3
"""A review names one to this many things."""


def vocabulary() -> tuple[str, ...]:
    """Every word of the language, sorted (no special tokens)."""
    words = {"i", "and", *PROMPT_END, *VERDICTS, *SHARED_ADJECTIVES, *DETERMINERS}
    for topic in TOPICS:
        words |= {*topic.verbs, *topic.nouns, *topic.adjectives}
    return tuple(sorted(words))


def review(rng: random.Random, topic: int) -> list[str]:
    """One review of ``topic`` as words, ending with :data:`PROMPT_END`: ``i <verb> <det> <adj> <noun>``, then
    up to ``MAX_CLAUSES - 1`` more ``and <det> <adj> <noun>``; adjectives are shared or the topic's own."""
    words = TOPICS[topic]
    adjectives = SHARED_ADJECTIVES + words.adjectives
    out = ["i", rng.choice(words.verbs)]
    for k in range(rng.randint(1, MAX_CLAUSES)):
        out += ["and"] * (k > 0) + [rng.choice(DETERMINERS), rng.choice(adjectives), rng.choice(words.nouns)]
    return [*out, *PROMPT_END]


def pretraining_sentence(rng: random.Random) -> str:
    """A review of a random topic, then a verdict (independent of the topic) or one of its adjectives, and ``.``."""
    topic = rng.randrange(len(TOPICS))
    words = review(rng, topic)
    if rng.random() < VERDICT_SHARE:
        last = VERDICTS[0] if rng.random() < GREAT_ODDS else VERDICTS[1]
    else:
        last = rng.choice(TOPICS[topic].adjectives)
    return " ".join([*words, last, "."])


def task_splits(rng: random.Random, train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    """The topic task's train and test rows (``prompt``, ``completion``, ``choices``), each split half of each
    label in random order, every prompt distinct (so no test prompt was trained on)."""
    seen: set[str] = set()
    splits = []
    for size in (train_size, test_size):
        topics = [k % len(TOPICS) for k in range(size)]
        rng.shuffle(topics)
        rows = []
        for topic in topics:
            prompt = " ".join(review(rng, topic))
            while prompt in seen:
                prompt = " ".join(review(rng, topic))
            seen.add(prompt)
            # A leading space, as in MeZO's prompts: the completion is the word after the prompt.
            rows.append({"prompt": prompt, "completion": f" {VERDICTS[topic]}", "choices": [f" {v}" for v in VERDICTS]})
        splits.append(rows)
    return splits[0], splits[1]
