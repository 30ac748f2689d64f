"""docs/processes.md stays true: its ```python blocks run, in order, in one namespace, and their
asserts (D held by the newton corrector, λ at its end value, the first law, the command line on a
registered process) must pass."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

DOC = Path(__file__).resolve().parents[1] / "docs" / "processes.md"
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block, in order."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in BLOCK.finditer(text)]


def test_the_extraction_sees_every_python_block():
    text = DOC.read_text(encoding="utf-8")
    blocks = python_blocks(text)
    assert len(blocks) == len(re.findall(r"^```python", text, re.MULTILINE)) >= 6
    assert sum(code.count("assert ") for _, code in blocks) >= 20  # the tutorial checks what it claims


def test_the_tutorial_runs(restored_registries):
    # The tutorial registers processes and a data set: the fixture keeps them out of the other tests' registries.
    namespace = {"__name__": "docs_processes"}
    for line, code in python_blocks(DOC.read_text(encoding="utf-8")):
        # Pad with blank lines so that a traceback names the line of docs/processes.md itself.
        exec(compile("\n" * (line - 1) + code, str(DOC), "exec"), namespace)
    assert {"iso-distortion", "iso-free-energy"} <= set(namespace["qs"].available_processes())
