"""What regex rules may cost, so that no list can make the resolver slow for others.

RE2 matches in time linear in the name, but the factor is the size of the program it runs: every forwarded
name that no suffix rule covers goes through one RE2 program made of all patterns in force (policy.decide),
and the larger that program, the more states RE2's DFA builds per name (past its memory bound RE2 falls back
to its slower NFA simulation).
Bounded repeats multiply the program: `/^([a-z]{1,30}\\.){1,5}evil[0-9]{1,4}\\.example$/` is 326 RE2
instructions, and 3,000 such patterns made one program of 982,892 that took 5 to 82 ms per name on this
machine (and 468 ms on the reviewer's), holding up every other client's queries on the same event loop.

So each pattern, and all stored patterns together, are held to a budget counted in RE2 instructions
(`programsize`, the measure RE2 itself uses for its memory bound). A rule over it is refused when it is
added or imported (nothing is written); a policy built from a database that holds more (written by other
means) leaves out the patterns past the budget, with a warning. Measured on 2 cores (bench/regex_budget.py):
with 50,000 instructions of the worst shapes found (the reviewer's, or unanchored nested bounded repeats) a
name not asked before costs 0.1 to 0.3 ms on average; a name asked again is remembered (Policy._match_regex).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

REGEX_PROGRAM_MAX = 1_000  # RE2 instructions of one pattern; `^([a-z]{1,30}\.){1,5}evil[0-9]{1,4}\.example$`: 326
REGEX_BUDGET = 50_000  # RE2 instructions of every regex rule stored, all lists together
REGEX_RULES_MAX = 2_000  # regex rules stored, all lists together (a name one matches is tried against each)


class RegexBudget:
    """The instructions and rules left for regex rules. `take` counts one more pattern, or raises ValueError with
    a reason a person can act on (and counts nothing)."""

    def __init__(self, sizes: Iterable[int] = (), budget: int = REGEX_BUDGET, rules_max: int = REGEX_RULES_MAX,
                 program_max: int = REGEX_PROGRAM_MAX) -> None:
        sizes = list(sizes)
        self.used = sum(sizes)
        self.rules = len(sizes)
        self.budget, self.rules_max, self.program_max = budget, rules_max, program_max

    def check_one(self, size: int) -> None:
        """ValueError when one pattern alone is too large."""
        if size > self.program_max:
            raise ValueError(f"its RE2 program has {size} instructions, over the {self.program_max} a pattern may "
                             "have (bounded repeats such as {1,30} multiply it)")

    def take(self, size: int) -> None:
        self.check_one(size)
        if self.rules + 1 > self.rules_max:
            raise ValueError(f"over {self.rules_max} regex rules in all (each forwarded name is matched against "
                             "every one)")
        if self.used + size > self.budget:
            raise ValueError(f"the regex rules would come to {self.used + size} RE2 instructions in all, over the "
                             f"budget of {self.budget} ({self.used} in use before this one)")
        self.used += size
        self.rules += 1


def within_budget(patterns: Iterable[T], size: Callable[[T], int]) -> tuple[list[T], list[T]]:
    """(kept, left out): `patterns` in order, as many as the budget holds; a policy built from a database that
    holds more than `block add` and `lists import` let in (written by other means) leaves the rest out."""
    budget = RegexBudget()
    kept, out = [], []
    for pattern in patterns:
        try:
            budget.take(size(pattern))
        except ValueError:
            out.append(pattern)
        else:
            kept.append(pattern)
    return kept, out
