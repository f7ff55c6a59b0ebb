"""Arrows run one way (issue 18): relay.shared is a leaf; relay/ never imports control/ or clients/;
control/ and clients/ use only relay.shared of the relay; outbox_relay/, the composition root (the
`outbox-relay` program), imports them all and is imported by none of them."""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSITION_ROOT = "outbox_relay"
SERVICE_PACKAGES = ("relay", "control", "clients")


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_generated" not in path.parts:
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path


def parse(source: str) -> ast.Module:
    # CPython 3.11 can raise "AST constructor recursion depth mismatch" when a garbage collection
    # runs Python finalizers (say, of a test's leftover coroutine) in the middle of ast.parse.
    gc.disable()
    try:
        return ast.parse(source)
    finally:
        gc.enable()


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_relay_shared_imports_nothing_else_of_the_service() -> None:
    for module, path in modules("relay/shared"):
        for name in imports(path):
            if any(within(name, top) for top in (*SERVICE_PACKAGES, COMPOSITION_ROOT)):
                assert within(name, "relay.shared"), f"{module} imports {name}"


def test_relay_imports_neither_control_nor_clients() -> None:
    for module, path in modules("relay"):
        for name in imports(path):
            assert not within(name, "control") and not within(name, "clients"), f"{module} imports {name}"


@pytest.mark.parametrize("package", ["control", "clients"])
def test_control_and_clients_use_only_the_shared_leaf_of_the_relay(package: str) -> None:
    for module, path in modules(package):
        for name in imports(path):
            if within(name, "relay"):
                assert within(name, "relay.shared"), f"{module} imports {name}"


@pytest.mark.parametrize("package", SERVICE_PACKAGES)
def test_nothing_imports_the_composition_root(package: str) -> None:
    for module, path in modules(package):
        for name in imports(path):
            assert not within(name, COMPOSITION_ROOT), f"{module} imports {name}"


def test_the_composition_root_wires_every_package() -> None:
    wired = {name.split(".")[0] for _, path in modules(COMPOSITION_ROOT) for name in imports(path)}
    assert set(SERVICE_PACKAGES) <= wired
