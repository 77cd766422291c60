"""Imports point one way: wiring (app.py, __main__.py) → routers → data plane, lifecycle, engine →
errors, settings, contract. A router never imports another router, and only the wiring imports
the routers."""
import ast
from pathlib import Path

SERVICE = Path(__file__).parent.parent / "service"
WIRING = {"service.app", "service.__main__"}
# A router package's own modules may import each other (protocols.grpc, protocols.open_inference).
ROUTERS = {"service.status", "service.page", "service.protocols.predict", "service.protocols.compare",
           "service.protocols.open_inference.routes", "service.protocols.open_inference.repository",
           "service.protocols.open_inference.extensions", "service.protocols.grpc.servicer",
           "service.protocols.grpc.server"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    found = {}
    for path in SERVICE.rglob("*.py"):
        if "proto" in path.parts:
            continue  # generated stubs
        tree = ast.parse(path.read_text())
        found[module_name(path)] = {node.module for node in ast.walk(tree)
                                    if isinstance(node, ast.ImportFrom) and node.module} | \
                                   {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                                    for alias in node.names}
    return found


def package(module: str) -> str:
    return module.rsplit(".", 1)[0]


def test_every_router_module_exists():
    assert set(imports()) >= ROUTERS


def test_a_router_never_imports_another_router():
    for module, imported in imports().items():
        if module not in ROUTERS:
            continue
        others = {m for m in imported & ROUTERS if m != module and package(m) != package(module)}
        assert not others, f"{module} imports the routers {others}"


def test_only_the_wiring_imports_the_routers():
    for module, imported in imports().items():
        if module in WIRING or module in ROUTERS or module.startswith("service.protocols"):
            continue
        assert not imported & ROUTERS, f"{module} imports the routers {imported & ROUTERS}"


def test_the_layers_below_the_routers_know_nothing_of_them():
    below = {"service.dataplane", "service.lifecycle", "service.engine", "service.batching",
             "service.preprocess", "service.image_checks", "service.budget", "service.admission",
             "service.errors", "service.settings", "service.record", "service.metrics"}
    for module in below:
        protocols = {m for m in imports()[module] if m.startswith("service.protocols")}
        assert not protocols, f"{module} imports {protocols}"
