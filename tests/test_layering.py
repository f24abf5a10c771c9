"""The house rules of DESIGN.md, checked on the source: dependencies point one way
(errors ← auth ← events/store ← fan-out ← HTTP ← app/CLI), nothing below the HTTP layer
imports Flask, Werkzeug, `app` or `web`, and config/settings.py imports no feature code.

Every import counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGES = ("common", "config", "auth", "ingest", "streaming", "mercure", "runtime", "web", "embedded")
# Each layer may import only itself and the layers before it (embedded: the dev servers, used by
# the development environment only).
LAYERS = [
    ("common",),
    ("config",),
    ("auth",),
    ("ingest",),
    ("streaming",),
    ("mercure",),  # the Mercure door: a second front over the same hub and store
    ("embedded", "runtime"),
    ("http",),  # every */http.py and all of web/
    ("app",),
]
FRAMEWORK = ("flask", "werkzeug")


def sluice_modules() -> dict[str, Path]:
    found = {"app": ROOT / "app.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    if module.endswith(".http") or top == "web" or module == "config.gunicorn":
        return next(i for i, names in enumerate(LAYERS) if "http" in names)
    return next(i for i, names in enumerate(LAYERS) if top in names)


def imports_of(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sluice_modules()


def sluice_target(name: str) -> str | None:
    """The Sluice module an imported name refers to, or None for a library."""
    top = name.split(".")[0]
    return name if top in PACKAGES or top == "app" else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_one_way(module):
    mine = layer_of(module)
    upward = [
        name
        for name in imports_of(MODULES[module])
        if (target := sluice_target(name)) is not None and layer_of(target) > mine
    ]
    assert not upward, f"{module} (layer {LAYERS[mine]}) imports from above it: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) < layer_of("web")))
def test_below_http_no_framework_app_or_web(module):
    bad = [name for name in imports_of(MODULES[module]) if name.split(".")[0] in FRAMEWORK + ("app", "web")]
    assert not bad, f"{module} is below the HTTP layer but imports {bad}"


def test_common_imports_nothing_of_sluice():
    for module, path in MODULES.items():
        if module.split(".")[0] == "common":
            assert not [n for n in imports_of(path) if sluice_target(n)], module


def test_the_sdk_imports_nothing_of_sluice():
    """clients/python installs on its own: only the standard library, PyJWT and itself."""
    paths = sorted((ROOT / "clients" / "python" / "sluice_client").rglob("*.py"))
    assert paths
    for path in paths:
        names = imports_of(path)
        assert not [n for n in names if sluice_target(n)], path
        assert {n.split(".")[0] for n in names} <= set(sys.stdlib_module_names) | {"jwt", "sluice_client"}, (
            path
        )


def test_settings_import_no_feature_code():
    names = imports_of(ROOT / "config" / "settings.py")
    assert not [n for n in names if sluice_target(n) and not n.startswith("config")], names


def test_the_rules_see_what_they_check():
    """The checks above would catch a violation: a planted upward import is found."""
    assert layer_of("ingest.store") < layer_of("streaming.hub") < layer_of("web.wsgi")
    assert layer_of("ingest.http") == layer_of("web.app") < layer_of("app")
    assert "flask" in imports_of(ROOT / "web" / "app.py")
    assert len(MODULES) > 40
