"""The recipes of docs/bring-your-model.md run as written and log what the page says.

Each recipe is a script in examples/recipes/ that the page includes whole, followed by a
"Logged:" line naming its tags. Every recipe runs here in a subprocess, in a fresh
directory, and the tags it logs must include every tag the page names. The torchvision
and timm recipes run against the real packages when they import, and otherwise against
the stand-ins in tests/stubs/, which follow their calling conventions (see the README
there); a recipe whose package is missing and has no stand-in is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import read_metrics

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "examples" / "recipes"
PAGE = ROOT / "docs" / "bring-your-model.md"
STUBS = Path(__file__).resolve().parent / "stubs"
NEEDS = {"hf_causal_lm": "transformers", "hf_sequence_classification": "transformers",
         "torchvision_detection": "torchvision", "timm_classifier": "timm",
         "torchmetrics_evaluation": "torchmetrics"}


def documented() -> dict[str, list[str]]:
    """Each recipe the page includes, and the tags its "Logged:" line names."""
    text = PAGE.read_text(encoding="utf-8")
    found = {}
    for match in re.finditer(r'--8<-- "examples/recipes/(\w+)\.py"(.*?)\*\*Logged:\*\*([^\n]*)',
                             text, re.S):
        found[match.group(1)] = re.findall(r"`([^`]+)`", match.group(3))
    return found


def imports(module: str) -> bool:
    """Whether `module` imports here (in a subprocess: a broken torchvision wheel must
    not leave half-registered operators in the test process)."""
    if importlib.util.find_spec(module) is None:
        return False
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                          timeout=120, check=False).returncode == 0


def test_the_page_includes_every_recipe_and_names_what_each_logs():
    assert set(documented()) == {path.stem for path in RECIPES.glob("*.py")} == set(NEEDS)
    assert all(documented().values())


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_a_recipe_runs_as_written_and_logs_what_the_page_says(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    module = NEEDS[name]
    if not imports(module):
        if not (STUBS / module).is_dir():
            pytest.skip(f"{module} is not installed")
        env["PYTHONPATH"] = os.pathsep.join([str(STUBS), env["PYTHONPATH"]])
    result = subprocess.run([sys.executable, str(RECIPES / f"{name}.py")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path / "runs" / name)
    logged = set().union(*rows)
    for tag in documented()[name]:
        pattern = re.escape(tag).replace(re.escape("<class>"), r"\d+")
        assert any(re.fullmatch(pattern, key) for key in logged), (tag, sorted(logged))
