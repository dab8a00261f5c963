"""The docs tell the truth about the code: the plugin reference is generated from the plugins'
own metadata, the plugin guide's examples run, every relative link resolves, and the README
stays a front door."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from epp.framework import PluginRegistry
from epp.plugindocs import render
from epp_scorers import register
from epp_scorers.catalog import ALL_PLUGINS

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    REPO / "README.md",
    REPO / "deploy" / "README.md",
    REPO / "bench" / "README.md",
    *(REPO / "docs").glob("*.md"),
]
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_plugin_reference_is_generated_from_the_plugins() -> None:
    registry = PluginRegistry()
    register(registry)
    expected = render(registry)
    assert (REPO / "docs" / "plugins.md").read_text() == expected, (
        "run `make docs` and commit docs/plugins.md"
    )


@pytest.mark.parametrize("cls", ALL_PLUGINS, ids=lambda c: c.type_name)
def test_every_plugin_documents_itself(cls: type) -> None:
    assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no docstring"
    module = __import__(cls.__module__, fromlist=["_"])
    assert module.__doc__ and cls.type_name in module.__doc__, (
        f"{cls.__module__} does not document {cls.type_name}"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    for target in _LINK.findall(doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to missing {target}"


def test_the_readme_is_a_front_door() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 220
    text = "\n".join(lines)
    for needed in ("make demo", "make test", "docs/"):
        assert needed in text


def test_the_plugin_guide_examples_run(tmp_path: Path) -> None:
    # Each Python block of docs/writing-plugins.md goes where its first line says (`# name.py`),
    # the rest as test modules; the guide's own tests then run against epp as installed.
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "writing-plugins.md").read_text(), re.S)
    tests = 0
    for i, block in enumerate(blocks):
        named = re.match(r"# ([\w/]+\.py)\n", block)
        path = tmp_path / (named.group(1) if named else f"test_guide_{i}.py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block)
        tests += len(re.findall(r"^def test_", block, re.M)) if not named else 0
    assert len(blocks) >= 5 and tests >= 3
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert f"{tests} passed" in run.stdout, run.stdout[-2000:]
