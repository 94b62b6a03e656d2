"""What `pip install luffy-trl` declares: dependencies that resolve without warnings, a parser that loads, and a
model card that cites LUFFY."""

import pathlib
import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared_requirements():
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python 3.11+)")
    return [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]


def test_every_requested_extra_is_provided_verbatim():
    """pip (23.x) warns "X does not provide the extra 'y'" when the spelling differs from the metadata's; the old
    `math-verify[antlr4_13_2]` did, against math-verify's `antlr4-13-2`."""
    for req in declared_requirements():
        provided = set(metadata.metadata(req.name).get_all("Provides-Extra") or [])
        assert req.extras <= provided, (req, provided)


def test_installed_versions_satisfy_the_declared_ranges():
    for req in declared_requirements():
        version = metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), (req, version)
    # the ANTLR pin is one latex2sympy2_extended accepts
    antlr = [Requirement(r) for r in metadata.requires("latex2sympy2_extended") or []
             if r.startswith("antlr4-python3-runtime") and "extra" not in r]
    assert antlr and all(r.specifier.contains("4.13.2") for r in antlr)


def test_latex_parser_loads_and_verifies():
    """math-verify's LaTeX parser needs the ANTLR runtime: parse a fraction and verify it against 0.5."""
    from math_verify import parse, verify

    gold = parse("$\\frac{1}{2}$")
    assert gold and str(gold[0]) == "1/2"
    assert verify(gold, parse("The answer is $\\boxed{0.5}$."))
    assert not verify(gold, parse("$\\boxed{\\frac{1}{3}}$"))


def test_model_card_cites_luffy_and_grpo(tokenizer, tmp_path):
    from conftest import build_model, contains_answer_reward, math_dataset, tiny_args

    from luffy_trl import MixedPolicyGRPOTrainer

    trainer = MixedPolicyGRPOTrainer(model=build_model(tokenizer), reward_funcs=contains_answer_reward,
                                     args=tiny_args(tmp_path), train_dataset=math_dataset(), processing_class=tokenizer)
    trainer.create_model_card(model_name="luffy-toy", dataset_name="toy-math")
    card = (tmp_path / "README.md").read_text()
    assert ("a method introduced in [Learning to Reason under Off-Policy Guidance]"
            "(https://huggingface.co/papers/2504.14945)") in card
    assert re.search(r"@article\{yan2025learning,.*arXiv:2504\.14945", card, re.S)
    assert "@article{shao2024deepseekmath" in card  # GRPO's entry, as TRL's GRPOTrainer cites it
    assert "luffy" in card and "DeepSeekMath" not in card.split("## Citations")[0]
