"""Small arithmetic word problems with worked teacher solutions, for real small models (e.g. SmolLM2-135M).

Each row has a chat `prompt`, a worked `target` solution that ends with `\\boxed{answer}` (scored by
`luffy_trl.rewards.number_reward`: `math_reward` would also pay the unevaluated `60 - 32` for 28) and a
`ground_truth`. Problems are two-digit additions and subtractions phrased as
short stories; the teacher solution works column by column, so a weak model sees how to carry.
`harder_dataset` holds problems no trace shows: three-digit operands and two operations in one story, for a held-out
set that copying the traces' template cannot solve.
"""

from __future__ import annotations

import random
import re

STORIES = [
    ("Anna has {a} apples and buys {b} more. How many apples does she have now?", "+"),
    ("A shelf holds {a} books. {b} more books are added. How many books are on the shelf?", "+"),
    ("Tom had {a} marbles and gave away {b}. How many marbles does he have left?", "-"),
    ("A bus carries {a} people. At the stop {b} people get off. How many people are still on the bus?", "-"),
]

# Other wordings of the same two operations, for an out-of-distribution held-out set (no training row uses them).
OOD_STORIES = [
    (("A baker made {a} cookies in the morning and {b} in the afternoon. How many cookies did the baker make in "
      "total?"), "+"),
    (("A farmer picked {a} pumpkins on Monday and {b} pumpkins on Tuesday. How many pumpkins did he pick "
      "altogether?"), "+"),
    ("A library owned {a} DVDs and lent out {b} of them. How many DVDs are still in the library?", "-"),
    ("Maria saved {a} dollars and spent {b} dollars on a gift. How many dollars does she have left?", "-"),
]


def worked_solution(a: int, b: int, op: str) -> tuple[str, int]:
    """A column-by-column solution of `a op b` and its result."""
    if op == "+":
        units = a % 10 + b % 10
        carry = units // 10
        tens = a // 10 + b // 10 + carry
        result = a + b
        steps = (f"Units: {a % 10} + {b % 10} = {units}" + (f", write {units % 10} and carry 1." if carry else ".")
                 + f" Tens: {a // 10} + {b // 10}" + (" + 1" if carry else "") + f" = {tens}.")
    else:
        borrow = a % 10 < b % 10
        units = a % 10 + (10 if borrow else 0) - b % 10
        tens = a // 10 - (1 if borrow else 0) - b // 10
        result = a - b
        steps = (f"Units: {a % 10 + (10 if borrow else 0)} - {b % 10} = {units}"
                 + (" after borrowing 1 ten." if borrow else ".")
                 + f" Tens: {a // 10}" + (" - 1" if borrow else "") + f" - {b // 10} = {tens}.")
    return f"We compute {a} {op} {b}. {steps} So the answer is \\boxed{{{result}}}.", result


def arithmetic_dataset(num_rows: int = 256, seed: int = 0, stories=None, exclude=(), second_operand=(10, 99)):
    """`num_rows` word problems with columns `prompt`, `target`, `ground_truth`, phrased with `stories` (default
    `STORIES`; `OOD_STORIES` for other wordings), none of whose questions is in `exclude` (held-out sets). The first
    operand is drawn from 20-99, the second from `second_operand` (inclusive; `(1, 9)` for an easier task)."""
    from datasets import Dataset

    rng = random.Random(seed)
    stories, exclude = stories or STORIES, set(exclude)
    rows = []
    while len(rows) < num_rows:
        story, op = rng.choice(stories)
        a, b = rng.randint(20, 99), rng.randint(*second_operand)
        if op == "-" and b > a:
            a, b = b, a
        solution, result = worked_solution(a, b, op)
        question = story.format(a=a, b=b) + " Put the final answer in \\boxed{}."
        if question in exclude:
            continue
        rows.append({"prompt": [{"role": "user", "content": question}], "target": solution,
                     "ground_truth": str(result)})
    return Dataset.from_list(rows)


# Two operations on three-digit numbers: a held-out set beyond the traces (no training row has either feature).
HARDER_STORIES = [
    ("A warehouse had {a} boxes. It received {b} more boxes and then shipped {c}. How many boxes are in the warehouse "
     "now?", "+-"),
    ("A school has {a} students. {b} new students join and {c} more join later. How many students does the school have "
     "now?", "++"),
    ("A tank held {a} liters of water. {b} liters were pumped out and then {c} liters were pumped out again. How many "
     "liters are left?", "--"),
    ("A stadium had {a} seats. {b} seats were removed and {c} new seats were installed. How many seats does it have "
     "now?", "-+"),
]


def harder_dataset(num_rows: int = 256, seed: int = 0, exclude=()):
    """`num_rows` two-operation word problems on three-digit numbers (`HARDER_STORIES`), columns `prompt`, `target`
    (a short worked solution) and `ground_truth`; every intermediate result stays positive."""
    from datasets import Dataset

    rng = random.Random(seed)
    exclude, rows = set(exclude), []
    while len(rows) < num_rows:
        story, ops = rng.choice(HARDER_STORIES)
        a, b, c = rng.randint(300, 999), rng.randint(100, 299), rng.randint(100, 299)
        first = a + b if ops[0] == "+" else a - b
        result = first + c if ops[1] == "+" else first - c
        question = story.format(a=a, b=b, c=c) + " Put the final answer in \\boxed{}."
        if question in exclude or result <= 0:
            continue
        solution = (f"First {a} {ops[0]} {b} = {first}. Then {first} {ops[1]} {c} = {result}. "
                    f"So the answer is \\boxed{{{result}}}.")
        rows.append({"prompt": [{"role": "user", "content": question}], "target": solution,
                     "ground_truth": str(result)})
    return Dataset.from_list(rows)


# An arithmetic expression as a model writes it: whole numbers joined by + or - (at least one operator).
_EXPRESSION = re.compile(r"\d+(?:\s*[-+]\s*\d+)+")
_EQUATION = re.compile(r"(\d+(?:\s*[-+]\s*\d+)+)\s*=\s*(-?\d+)")


def _value(expression: str) -> int:
    """The value of whole numbers joined by + and - (no eval)."""
    terms = re.findall(r"([-+]?)\s*(\d+)", expression)
    return sum(-int(n) if sign == "-" else int(n) for sign, n in terms)


def answer_form(text: str, gold: str) -> dict:
    """How an answer to an arithmetic problem is built, to tell "the right operation" from "the right result".

    * `setup`: the first expression in `text` (whole numbers joined by + or -) has the gold value: the model
      picked the right operands and operations, whatever it wrote next;
    * `column_steps`: `text` works column by column as the teacher traces do (`Units: ...`);
    * `equations`, `equations_true`: the equations `expression = number` it states, and how many of them hold.
    """
    first = _EXPRESSION.search(text)
    equations = _EQUATION.findall(text)
    return {"setup": bool(first) and _value(first.group(0)) == int(gold), "column_steps": "Units:" in text,
            "equations": len(equations), "equations_true": sum(_value(e) == int(n) for e, n in equations)}
