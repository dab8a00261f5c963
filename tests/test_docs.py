"""The docs tell the truth about the code: the plugin reference is generated from the plugins'
own metadata, every relative link resolves, and the README stays a front door."""

from __future__ import annotations

import re
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
