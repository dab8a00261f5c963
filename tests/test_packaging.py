"""What `pip wheel .` ships, and the layering `make lint` enforces (checked here too, so CI runs it)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_wheel_holds_only_packages_named_for_the_project_and_all_their_modules(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("epp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"epp", "epp_scorers"}  # no bare scorers/bench
    shipped = {n for n in names if n.endswith(".py")}
    expected = {str(p.relative_to(REPO)) for p in (REPO / "epp").rglob("*.py")} | {
        "epp_scorers/" + str(p.relative_to(REPO / "scorers" / "epp_scorers"))
        for p in (REPO / "scorers" / "epp_scorers").rglob("*.py")
    }
    assert shipped == expected
    assert {"epp/py.typed", "epp_scorers/py.typed"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[epp.plugins]" in text and "epp-scorers = epp_scorers:register" in text


def test_import_contracts_hold() -> None:
    """extproc -> requestcontrol -> scheduling -> framework; the core imports no plugin; the in-tree
    plugins import only epp.framework (pyproject.toml [tool.importlinter])."""
    result = subprocess.run(
        [str(BIN / "lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _declared(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_imports(root: Path) -> set[str]:
    """Top-level modules the package imports (at any depth, lazily too), minus the stdlib's and ours."""
    found: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"epp", "epp_scorers", "__future__"}


def test_every_module_the_wheel_imports_comes_from_a_declared_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"])
    distributions = importlib.metadata.packages_distributions()
    imported = _third_party_imports(REPO / "epp") | _third_party_imports(REPO / "scorers" / "epp_scorers")
    for module in sorted(imported):
        providers = {_normalise(d) for d in distributions.get(module, [])}
        assert providers, f"{module} is imported but not installed"
        assert providers & declared, f"{module} comes from {sorted(providers)}, not a declared dependency"


def test_the_readme_says_why_each_dependency_is_there() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bench = tomllib.loads((REPO / "bench" / "pyproject.toml").read_text())["project"]
    declared = _declared(project["dependencies"]) | _declared(project["optional-dependencies"]["dev"])
    declared |= _declared(bench["dependencies"]) | _declared(bench["optional-dependencies"]["plots"])
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Dependencies", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in re.findall(r"^\| ([^|]+) \| [^|]+ \|$", section, re.M):
        cell = re.sub(r"\(.*?\)", "", row)
        named |= {_normalise(n.strip()) for n in cell.split(",") if n.strip() not in ("package", "---")}
    assert declared - named == set(), "declared but not explained in the README's Dependencies"
    assert named - declared == set(), "explained in the README but not declared"
