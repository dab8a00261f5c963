"""What `pip wheel .` ships, and the layering `make lint` enforces (checked here too, so CI runs it)."""

from __future__ import annotations

import subprocess
import sys
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
