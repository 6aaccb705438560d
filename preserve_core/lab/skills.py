"""The lab's capabilities: seeded prompt -> completion generators with exact-match answers.

Every skill writes ``{"prompt": "<tag>:<input>=", "completion": "<answer>"}``. The tag tells the model
which skill is asked, so one model can hold them all and each is scored on its own. Pretraining skills
are what the lab model learns before it is handed to a user; new skills are held out: the base model
scores ~0 on them and a fine-tune has to learn them.
"""

from __future__ import annotations

import random
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = string.ascii_lowercase
DIGITS = string.digits
ALPHABET = LETTERS + DIGITS + ":=,"  # every character a lab prompt or answer uses
N_FACTS = 240


@dataclass(frozen=True)
class Skill:
    name: str
    tag: str
    kind: str
    pretrain: bool
    description: str
    make: Callable[[random.Random], tuple[str, str]]  # rng -> (input, answer)

    def example(self, rng: random.Random) -> dict:
        text, answer = self.make(rng)
        return {"prompt": f"{self.tag}:{text}=", "completion": answer}


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _reverse(rng):
    w = _word(rng, 3, 8)
    return w, w[::-1]


def _sort_digits(rng):
    w = _word(rng, 3, 8, DIGITS)
    return w, "".join(sorted(w))


def fact_table(seed: int = 1234) -> dict[str, str]:
    """``N_FACTS`` fixed key -> value pairs (3 letters -> 3 digits): knowledge the model must memorise."""
    rng = random.Random(seed)
    table: dict[str, str] = {}
    while len(table) < N_FACTS:
        table.setdefault(_word(rng, 3, 3), _word(rng, 3, 3, DIGITS))
    return table


_FACTS = fact_table()
_FACT_KEYS = sorted(_FACTS)


def _recall(rng):
    key = rng.choice(_FACT_KEYS)
    return key, _FACTS[key]


def _cycle(rng):
    period = _word(rng, 2, 4)
    n = rng.randint(len(period) + 2, 10)
    return f"{period},{n}", (period * 10)[:n]


def _count(rng):
    text = _word(rng, 3, 9, "abcde")
    letter = rng.choice(text)
    return f"{letter},{text}", str(Counter(text)[letter])


def _shift(rng):
    w = _word(rng, 3, 7)
    return w, "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in w)


def _double(rng):
    w = _word(rng, 2, 5)
    return w, "".join(c + c for c in w)


# Further new tasks (issue 12): other transductions, digit tasks whose answers share the outputs of
# sort / count, and prompts that start like an old skill's (``revx:`` vs ``rev:``, ``cntd:`` vs
# ``cnt:``). Appended after the first ones, so neither the pretraining stream (it draws from
# PRETRAIN_SKILLS only) nor any other skill's rows change: every skill has its own seeded RNG.
def _rotate(rng):
    k = rng.randint(2, 9)
    w = _word(rng, 3, 7)
    return f"{k},{w}", "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in w)


def _interleave(rng):
    n = rng.randint(2, 5)
    a, b = _word(rng, n, n), _word(rng, n, n)
    return f"{a},{b}", "".join(x + y for x, y in zip(a, b, strict=True))


def _descend(rng):
    w = _word(rng, 3, 8, DIGITS)
    return w, "".join(sorted(w, reverse=True))


def _digit_sum(rng):
    w = _word(rng, 3, 8, DIGITS)
    return w, str(sum(int(c) for c in w) % 10)


def _count_digit(rng):
    text = _word(rng, 4, 9, "01234")
    digit = rng.choice(text)
    return f"{digit},{text}", str(text.count(digit))


def _mirror(rng):
    w = _word(rng, 2, 6)
    return w, w + w[::-1]


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in [
        Skill("reverse", "rev", "string transduction", True, "reverse a word of 3-8 letters", _reverse),
        Skill("sort", "srt", "sorting", True, "sort 3-8 digits ascending", _sort_digits),
        Skill("recall", "kv", "memorised facts", True, f"recall the value of one of {N_FACTS} fixed keys", _recall),
        Skill("cycle", "cyc", "pattern completion", True, "repeat a 2-4 letter period to length n", _cycle),
        Skill("count", "cnt", "counting", True, "count a letter's occurrences in a word over a-e", _count),
        Skill("shift", "sft", "string transduction (new)", False, "shift every letter by one (z -> a)", _shift),
        Skill("double", "dbl", "string transduction (new)", False, "double every letter of a word", _double),
        Skill("rotate", "rot", "string transduction (new)", False, "shift every letter by k = 2-9 (z -> a)", _rotate),
        Skill("interleave", "ilv", "string transduction (new)", False, "interleave two words of equal length", _interleave),
        Skill("descend", "dsc", "sorting (new, outputs like sort)", False, "sort 3-8 digits descending", _descend),
        Skill("digitsum", "dsum", "arithmetic (new, outputs like count)", False, "sum of 3-8 digits mod 10", _digit_sum),
        Skill("countd", "cntd", "counting (new, prompt like count)", False, "count a digit's occurrences over 0-4", _count_digit),
        Skill("mirror", "revx", "string transduction (new, prompt like reverse)", False, "a word then its reverse", _mirror),
    ]
}
PRETRAIN_SKILLS = [n for n, s in SKILLS.items() if s.pretrain]
NEW_SKILLS = [n for n, s in SKILLS.items() if not s.pretrain]


def examples(skill: str, n: int, seed: int) -> list[dict]:
    """``n`` seeded examples of one skill (duplicates allowed: recall has only ``N_FACTS`` prompts)."""
    rng = random.Random(f"{skill}:{seed}")
    return [SKILLS[skill].example(rng) for _ in range(n)]


def split_examples(skill: str, n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train/eval prompts, except for memorised facts, whose eval set is the fact table itself."""
    if skill == "recall":
        evals = [{"prompt": f"kv:{k}=", "completion": v} for k, v in sorted(_FACTS.items())][:n_eval]
        return examples(skill, n_train, seed), evals
    evals, seen = [], set()
    rng = random.Random(f"{skill}:eval:{seed}")
    while len(evals) < n_eval:
        row = SKILLS[skill].example(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            evals.append(row)
    train = [r for r in examples(skill, n_train + n_eval, seed) if r["prompt"] not in seen][:n_train]
    return train, evals
