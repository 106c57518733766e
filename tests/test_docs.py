"""Meta-tests: every hook is documented (with its exact signature) and exercised by a test."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshagent.hooks import specs as hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = sorted(n for n, f in inspect.getmembers(hookspecs, inspect.isfunction)
               if n.startswith("meshagent_"))


def test_hook_docs_are_generated_from_the_specs():
    generated = subprocess.run([sys.executable, str(ROOT / "scripts" / "hookdocs.py")],
                               capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "plugin-hooks.md").read_text() == generated, (
        "docs/plugin-hooks.md is stale: run .venv/bin/python scripts/hookdocs.py"
        " > docs/plugin-hooks.md")


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    func = getattr(hookspecs, hook)
    signature = f"{hook}({', '.join(inspect.signature(func).parameters)})"
    assert f"### `{signature}`" in (ROOT / "docs" / "plugin-hooks.md").read_text()
    doc = inspect.getdoc(func)
    assert doc and ":returns:" in doc or "Same timing and contract" in doc
    assert ":raises:" in doc or "Same timing and contract" in doc


def _test_sources() -> str:
    files = [p for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py"]
    files += list((ROOT / "contrib").glob("*/tests/test_*.py"))
    return "\n".join(p.read_text() for p in files)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    """A test names the hook (implementing it or asserting on it), as datasette checks."""
    assert re.search(rf"\b{hook}\b", _test_sources()), f"no test names {hook}"


def test_every_slot_has_a_register_hook():
    from meshagent.hooks.slots import SLOTS
    assert {slot.hook for slot in SLOTS} <= set(HOOKS)
