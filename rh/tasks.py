"""Retrieval tasks: each draws a (needle sentence, question, gold answer) from a seeded RNG.

``passkey`` is the numeric task of the walking skeleton; ``sf_activity`` is a free-text needle in
the style of gkamradt's and Wu24's ("The best thing to do in San Francisco is ..."), scored with
ROUGE; the four company-filing tasks follow seed 003 (``employee_count``, ``hq_state``,
``inc_state``, ``inc_year``), with needles phrased as a 10-K would state them. All tasks share the
one haystack and differ only in what is retrieved. Add a task with :func:`register_task`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

US_STATES = (
    "Alabama", "Alaska", "Arizona", "Arkansas", "California", "Colorado", "Connecticut", "Delaware", "Florida",
    "Georgia", "Hawaii", "Idaho", "Illinois", "Indiana", "Iowa", "Kansas", "Kentucky", "Louisiana", "Maine",
    "Maryland", "Massachusetts", "Michigan", "Minnesota", "Mississippi", "Missouri", "Montana", "Nebraska",
    "Nevada", "New Hampshire", "New Jersey", "New Mexico", "New York", "North Carolina", "North Dakota", "Ohio",
    "Oklahoma", "Oregon", "Pennsylvania", "Rhode Island", "South Carolina", "South Dakota", "Tennessee", "Texas",
    "Utah", "Vermont", "Virginia", "Washington", "West Virginia", "Wisconsin", "Wyoming",
)

_SF_ACTIVITIES = (
    "eat a sandwich and sit", "fly a kite", "read a good book", "watch the sailboats", "drink a coffee",
    "have a picnic", "listen to the street musicians", "play chess", "sketch the skyline", "go for a long walk",
)
_SF_PLACES = (
    "in Dolores Park", "at Ocean Beach", "on Twin Peaks", "in Golden Gate Park", "at Crissy Field",
    "on the Embarcadero", "in the Presidio", "at Lands End",
)
_SF_TIMES = (
    "on a sunny day", "at sunset", "on a foggy morning", "after lunch on a Sunday", "in early spring",
    "on a windy afternoon",
)


@dataclass(frozen=True)
class Task:
    """A needle template with one ``{value}`` slot, the question that asks for it, and the answer
    prefix the model's reply starts with (so the answer can be teacher-forced)."""

    name: str
    needle: str
    question: str
    answer_prefix: str
    draw: Callable[[random.Random], str]
    kind: str  # "numeric" | "categorical" | "phrase": how answers are best scored
    description: str = ""

    def __post_init__(self) -> None:
        if self.needle.count("{value}") != 1:
            raise ValueError(f"task {self.name!r}: the needle must contain '{{value}}' exactly once")
        if self.kind not in ("numeric", "categorical", "phrase"):
            raise ValueError(f"task {self.name!r}: kind {self.kind!r} is not numeric, categorical or phrase")
        if self.answer_prefix and not self.answer_prefix.endswith(" "):
            raise ValueError(f"task {self.name!r}: end the answer prefix with a space so the answer starts a word")

    def make(self, rng: random.Random) -> tuple[str, str]:
        """Draw an answer and return ``(needle sentence, answer)``."""
        value = self.draw(rng)
        return self.needle.format(value=value), value


def _employees(rng: random.Random) -> str:
    n = int(10 ** rng.uniform(2.3, 5.4))  # 200 .. 250,000 people, log-uniform as companies are
    n = round(n, -max(0, len(str(n)) - 3))  # three significant figures, as filings round them
    return f"{n:,}"


TASKS: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Add a task to the registry so claims can be parametrized over it."""
    if task.name in TASKS and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered; pass replace=True to override it")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: use one of {', '.join(sorted(TASKS))}, or register_task() a new one")
    return TASKS[name]


FILING_TASKS = ("employee_count", "hq_state", "inc_state", "inc_year")

register_task(Task(
    "passkey", "The secret passcode for the vault is {value}.", "What is the secret passcode for the vault?",
    "The secret passcode for the vault is ", lambda rng: str(rng.randint(1000, 9999)), "numeric",
    "a random 4-digit passkey",
))
register_task(Task(
    "sf_activity", "The best thing to do in San Francisco is to {value}.",
    "What is the best thing to do in San Francisco?", "The best thing to do in San Francisco is to ",
    lambda rng: f"{rng.choice(_SF_ACTIVITIES)} {rng.choice(_SF_PLACES)} {rng.choice(_SF_TIMES)}", "phrase",
    "a free-text phrase (gkamradt / Wu24 style), scored with ROUGE",
))
register_task(Task(
    "employee_count", "As of December 31, the Company had approximately {value} full-time employees.",
    "How many full-time employees did the Company have?", "The Company had approximately ",
    _employees, "numeric", "head count as a 10-K's Human Capital section states it",
))
register_task(Task(
    "hq_state", "The Company's principal executive offices are located in the State of {value}.",
    "In which state are the Company's principal executive offices located?",
    "The Company's principal executive offices are located in the State of ",
    lambda rng: rng.choice(US_STATES), "categorical", "state of the principal executive offices (10-K cover page)",
))
register_task(Task(
    "inc_state", "The Company was incorporated under the laws of the State of {value}.",
    "Under the laws of which state was the Company incorporated?",
    "The Company was incorporated under the laws of the State of ",
    lambda rng: rng.choice(US_STATES), "categorical", "state of incorporation (10-K cover page)",
))
register_task(Task(
    "inc_year", "The Company was originally incorporated in {value}.",
    "In what year was the Company originally incorporated?", "The Company was originally incorporated in ",
    lambda rng: str(rng.randint(1880, 2015)), "numeric", "year of incorporation (10-K Item 1)",
))
