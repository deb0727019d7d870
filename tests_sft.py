"""Tests for sft.py and the post-training datasets of data.py (to be folded into test_all.py).
Fast unless marked slow."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

import data
from chat import run_code

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


# -- word problems and the answer line (shared with rl.py) ----------------------------------------

def test_word_problem_is_deterministic_and_self_consistent():
    a = [data.word_problem(random.Random(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    rng = random.Random(1)
    for _ in range(200):
        p = data.word_problem(rng, difficulty=rng.randint(1, 4))
        assert isinstance(p["answer"], int)
        for text in (p["solution"], p["tool_solution"]):
            assert text.splitlines()[-1] == f"{data.ANSWER_PREFIX} {p['answer']}."
            assert data.extract_answer(text) == p["answer"]
        assert "<|code_start|>" in p["tool_solution"] and "<|code_start|>" not in p["solution"]


def test_tool_solution_outputs_are_what_the_code_tool_returns():
    rng = random.Random(3)
    for _ in range(100):
        text = data.word_problem(rng, 3)["tool_solution"]
        for call in text.split("<|code_start|>")[1:]:
            expression, rest = call.split("<|code_end|>")
            output = rest.split("<|output_start|>")[1].split("<|output_end|>")[0]
            assert run_code(expression) == output


def test_difficulty_scales_the_numbers():
    def biggest(difficulty):
        rng = random.Random(0)
        return max(data.word_problem(rng, difficulty)["answer"] for _ in range(300))
    assert biggest(1) < biggest(3) < biggest(6)
    with pytest.raises(data.DataError):
        data.word_problem(random.Random(0), 0)


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", 42), ("the answer is $1,234.", 1234), ("The answer is -7", -7),
    ("The answer is $-7.", -7), ("Step 1\nThe answer is 3.\nThe answer is 5 dollars.", 5),
    ("The answer is 2.5.", 2.5), ("The answer is: about 12 apples", 12), ("no answer here", None),
    ("The answer is unknown.", None), ("", None), ("The answer is 7.0", 7.0)])
def test_extract_answer(text, expected):
    got = data.extract_answer(text)
    assert got == expected and type(got) is type(expected)


def test_practice_problems_deterministic_and_splits_disjoint():
    train = data.practice_problems(300, seed=0)
    assert train == data.practice_problems(300, seed=0)
    assert train != data.practice_problems(300, seed=1)
    held = [p for s in range(5) for p in data.practice_problems(60, seed=s, split="heldout")]
    train += [p for s in range(1, 4) for p in data.practice_problems(300, seed=s)]
    assert not {p["question"] for p in train} & {p["question"] for p in held}
    assert all(data.split_of(p["question"]) == "heldout" for p in held)
    assert len({p["question"] for p in data.practice_problems(100, 0)}) == 100
    with pytest.raises(data.DataError):
        data.practice_problems(3, 0, split="test")
