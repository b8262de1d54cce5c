"""The README's "Add a pass" example, run as it stands there: the pass and its tests."""
import re
from pathlib import Path

import pytest

from ember.ir import GraphBuilder
from ember.testing import check_pass, check_unchanged

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> dict:
    """The names the README's "Add a pass" code block defines, after running it."""
    section = README.read_text().split("### Add a pass", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    names: dict = {}
    exec(compile(code, f"{README}:Add a pass", "exec"), names)
    return names


EXAMPLE = readme_example()


@pytest.mark.parametrize("name", sorted(n for n in EXAMPLE if n.startswith("test_")))
def test_the_readme_example_passes(name):
    EXAMPLE[name]()


def test_check_pass_fails_on_a_wrong_expectation():
    # the helper the example relies on can fail: a pass that does nothing is caught
    wrong = EXAMPLE["EXPECTED"].replace("exp(%x)", "tanh(%x)")
    with pytest.raises(AssertionError):
        check_pass(EXAMPLE["CancelNegation"](), EXAMPLE["BEFORE"], wrong)


def test_check_unchanged_fails_when_the_pass_rewrites():
    b = GraphBuilder("g")
    x = b.input("x", "f32", (4,))
    with pytest.raises(AssertionError, match="changed a graph it must leave alone"):
        check_unchanged(EXAMPLE["CancelNegation"](), b.build(b.neg(b.neg(x))))
