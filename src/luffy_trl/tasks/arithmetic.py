"""Small arithmetic word problems with worked teacher solutions, for real small models (e.g. SmolLM2-135M).

Each row has a chat `prompt`, a worked `target` solution that ends with `\\boxed{answer}` (scored by
`luffy_trl.rewards.math_reward`) and a `ground_truth`. Problems are two-digit additions and subtractions phrased as
short stories; the teacher solution works column by column, so a weak model sees how to carry.
"""

from __future__ import annotations

import random

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


def arithmetic_dataset(num_rows: int = 256, seed: int = 0, stories=None, exclude=()):
    """`num_rows` word problems with columns `prompt`, `target`, `ground_truth`, phrased with `stories` (default
    `STORIES`; `OOD_STORIES` for other wordings), none of whose questions is in `exclude` (held-out sets)."""
    from datasets import Dataset

    rng = random.Random(seed)
    stories, exclude = stories or STORIES, set(exclude)
    rows = []
    while len(rows) < num_rows:
        story, op = rng.choice(stories)
        a, b = rng.randint(20, 99), rng.randint(10, 99)
        if op == "-" and b > a:
            a, b = b, a
        solution, result = worked_solution(a, b, op)
        question = story.format(a=a, b=b) + " Put the final answer in \\boxed{}."
        if question in exclude:
            continue
        rows.append({"prompt": [{"role": "user", "content": question}], "target": solution,
                     "ground_truth": str(result)})
    return Dataset.from_list(rows)
