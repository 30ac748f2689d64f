"""docs/own_model.md stays true: its ```python blocks run, in order, in one namespace, and their
asserts (the user's own modules inside the model and the Objective, iso-classification run on them
by the runner holding C, the first law, config.json round-tripping) must pass."""

import re
from pathlib import Path

import pytest

from test_docs_processes import python_blocks

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DOC = Path(__file__).resolve().parents[1] / "docs" / "own_model.md"


def test_the_example_checks_what_it_claims():
    text = DOC.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) == len(re.findall(r"^```python", text, re.MULTILINE)) == 3
    assert sum(code.count("assert ") for _, code in blocks) >= 10


def test_the_example_runs(restored_registries):
    # The example registers an architecture and a data set: the fixture keeps them out of the other tests' registries.
    namespace = {"__name__": "docs_own_model"}
    for line, code in python_blocks(DOC.read_text(encoding="utf-8")):
        # Pad with blank lines so that a traceback names the line of docs/own_model.md itself.
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    run = namespace["run"]
    assert run.config.model.architecture == "my-vae" and run.error is None
