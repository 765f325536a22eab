"""Code tasks: write one Python function; hidden unit tests check it.

The task bank is a set of function templates, each with a reference implementation and an
input generator. A task is ``task_id = "<function>/<k>"``: `task(task_id)` rebuilds its prompt
and hidden test cases (inputs and the reference's outputs) from the id alone. The env server
keeps the tests to itself that way; the dataset row carries them only in `ground_truth`, which
only the trainer-side evaluator sees.

Train and test use different functions (the prompt of a function is the same for every k).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reference_envs.datasets import check_split

KINDS: tuple[str, ...] = ()
CASES_PER_TASK = 8
INSTRUCTION = ("You can try code with the run_python tool. When done, call submit_solution with the complete "
               "function (or reply with it in a ```python code block).")


def _words(rng: random.Random, k: int) -> list[str]:
    return ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(1, 6))) for _ in range(k)]


@dataclass(frozen=True)
class _Template:
    signature: str
    doc: str
    example: str
    reference: Callable[..., Any]
    inputs: Callable[[random.Random], list[Any]]


def _fizzbuzz(n: int) -> list[str]:
    return ["FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i)
            for i in range(1, n + 1)]


def _rle(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        out.append(f"{s[i]}{j - i}")
        i = j
    return "".join(out)


def _max_profit(prices: list[int]) -> int:
    best = 0
    for i, p in enumerate(prices):
        best = max(best, p - min(prices[: i + 1]))
    return best


def _palindrome_or_not(rng: random.Random) -> str:
    word = "".join(rng.choices("abc", k=rng.randint(1, 5)))
    return word + ", " + word[::-1].upper() if rng.random() < 0.5 else word + "!x"


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


TEMPLATES: dict[str, _Template] = {
    "digit_sum": _Template(
        "digit_sum(n: int) -> int", "returns the sum of the decimal digits of the non-negative integer n",
        "digit_sum(1234) == 10", lambda n: sum(map(int, str(n))),
        lambda r: [r.choice([0, r.randint(1, 9), r.randint(10, 10**9)])]),
    "reverse_words": _Template(
        "reverse_words(s: str) -> str", "returns the words of s in reverse order, joined by single spaces",
        "reverse_words('the quick  fox') == 'fox quick the'", lambda s: " ".join(reversed(s.split())),
        lambda r: ["  ".join(_words(r, r.randint(0, 6))) if r.random() < 0.3 else " ".join(_words(r, r.randint(1, 6)))]),
    "count_vowels": _Template(
        "count_vowels(s: str) -> int", "returns how many vowels (a, e, i, o, u; either case) s contains",
        "count_vowels('Hello World') == 3", lambda s: sum(c in "aeiouAEIOU" for c in s),
        lambda r: ["".join(r.choices(string.ascii_letters + " ", k=r.randint(0, 30)))]),
    "is_palindrome": _Template(
        "is_palindrome(s: str) -> bool",
        "returns True if s reads the same backwards, ignoring case and every character that is not a letter or digit",
        "is_palindrome('A man, a plan, a canal: Panama') is True",
        lambda s: (t := [c.lower() for c in s if c.isalnum()]) == t[::-1],
        lambda r: [_palindrome_or_not(r)]),
    "fizzbuzz": _Template(
        "fizzbuzz(n: int) -> list[str]",
        "returns the FizzBuzz strings for 1..n ('Fizz' for multiples of 3, 'Buzz' of 5, 'FizzBuzz' of both, else the number)",
        "fizzbuzz(5) == ['1', '2', 'Fizz', '4', 'Buzz']", _fizzbuzz, lambda r: [r.randint(0, 40)]),
    "second_largest": _Template(
        "second_largest(nums: list[int]) -> int",
        "returns the second largest distinct value in nums (nums holds at least two distinct values)",
        "second_largest([4, 9, 9, 2]) == 4", lambda nums: sorted(set(nums))[-2],
        lambda r: [r.sample(range(-50, 50), r.randint(2, 8)) * r.randint(1, 2)]),
    "running_sum": _Template(
        "running_sum(nums: list[int]) -> list[int]", "returns the running totals of nums",
        "running_sum([1, 2, 3]) == [1, 3, 6]", lambda nums: [sum(nums[: i + 1]) for i in range(len(nums))],
        lambda r: [[r.randint(-20, 20) for _ in range(r.randint(0, 8))]]),
    "gcd": _Template(
        "gcd(a: int, b: int) -> int", "returns the greatest common divisor of two positive integers",
        "gcd(12, 18) == 6", math.gcd, lambda r: [(k := r.randint(1, 30)) * r.randint(1, 40), k * r.randint(1, 40)]),
    "is_prime": _Template(
        "is_prime(n: int) -> bool", "returns True if n is a prime number", "is_prime(7) is True", _is_prime,
        lambda r: [r.randint(-3, 500)]),
    "flatten": _Template(
        "flatten(nested: list[list[int]]) -> list[int]", "concatenates the inner lists in order",
        "flatten([[1, 2], [], [3]]) == [1, 2, 3]", lambda nested: [x for inner in nested for x in inner],
        lambda r: [[[r.randint(0, 9) for _ in range(r.randint(0, 3))] for _ in range(r.randint(0, 4))]]),
    "rle_encode": _Template(
        "rle_encode(s: str) -> str", "run-length encodes s as each character followed by its run length",
        "rle_encode('aaabcc') == 'a3b1c2'", _rle, lambda r: ["".join(r.choices("xyz", k=r.randint(0, 12)))]),
    "max_profit": _Template(
        "max_profit(prices: list[int]) -> int",
        "returns the best profit from one buy followed by one later sell (0 if no profit is possible)",
        "max_profit([7, 1, 5, 3, 6, 4]) == 5", _max_profit,
        lambda r: [[r.randint(1, 30) for _ in range(r.randint(0, 9))]]),
}
#: Functions that only the test split uses.
TEST_FUNCTIONS = ("is_palindrome", "gcd", "rle_encode")


@dataclass(frozen=True)
class CodeTask:
    task_id: str
    function: str
    prompt: str
    cases: list[dict[str, Any]]
    """[{"args": [...], "expected": ...}], JSON-ready."""


def task(task_id: str) -> CodeTask:
    """Rebuild a task from its id (``"digit_sum/3"``); ValueError for an id this env never made."""
    name, _, k = task_id.partition("/")
    if name not in TEMPLATES or not k.isdigit():
        raise ValueError(f"not a code task id: {task_id!r} (expected '<function>/<k>', functions: "
                         f"{', '.join(TEMPLATES)})")
    t = TEMPLATES[name]
    rng = random.Random(f"code/{task_id}")
    cases = []
    for _ in range(CASES_PER_TASK):
        args = t.inputs(rng)
        cases.append({"args": args, "expected": t.reference(*args)})
    prompt = (f"Write a Python function `{t.signature}` that {t.doc}.\nExample: {t.example}\n{INSTRUCTION}")
    return CodeTask(task_id=task_id, function=name, prompt=prompt, cases=cases)


def generate(*, split: str, seed: int, n: int, kind: str | None = None) -> list[dict[str, Any]]:
    check_split(split)
    names = [f for f in TEMPLATES if (f in TEST_FUNCTIONS) == (split == "test")]
    rng = random.Random(f"code:{split}:{seed}")
    rows = []
    for _ in range(n):
        t = task(f"{rng.choice(names)}/{rng.randrange(10**6)}")
        rows.append({
            "messages": [{"role": "user", "content": t.prompt}],
            "ground_truth": {"function": t.function, "cases": t.cases},
            "metadata": {"env": "code", "task_id": t.task_id, "split": split},
        })
    return rows
