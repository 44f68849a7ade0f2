"""End to end: the README's client examples work as printed (only the port is changed)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parent.parent / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "./scripts/serve" in text and "./scripts/test" in text


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_python_example_runs(service, hub_online, index):
    code = python_examples()[index].replace("http://localhost:8080", service.url)
    # Unbounded, greedy SmolLM2 rambles up to the service's limit (2,000 tokens, a minute or more of CI).
    assert "max_tokens" in code or "max_new_tokens" in code, "give the README example a token limit"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"README example {index}", "exec"), {})
    printed = out.getvalue()
    assert printed.strip(), "the example printed nothing"
