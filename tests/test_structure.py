"""The shape of the source tree: no import circle inside a package, no function over 50 lines.

Import circles hide behind function-level imports and make the order of module loading matter; long functions are
where the next bug hides. Both are checked on the source with `ast`, so they are cheap and need no import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The repository's packages and the names they are imported by (oneha/workers etc. are symlinks to these folders).
PACKAGES = {"oneha": "oneha", "oneha/agent": "oneha.agent", "oneha/detect": "oneha.detect",
            "workers": "oneha.workers", "subscriber": "oneha.subscriber", "lab": "oneha.lab"}
MAX_FUNCTION_LINES = 50


def _modules(folder: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / folder).glob("*.py")):
        if not path.is_symlink():
            yield path.stem, path


def _runtime_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import, at any depth, except those under `if TYPE_CHECKING:` (annotations only, never executed)."""
    def walk(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (n for orelse in child.orelse for n in walk_one(orelse))
                continue
            yield from walk_one(child)

    def walk_one(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from walk(node)

    yield from walk(tree)


def import_graph(folder: str) -> dict[str, set[str]]:
    """Module -> modules of the same package it imports (directly, or via `from package import module`)."""
    package = PACKAGES[folder]
    names = {name for name, _ in _modules(folder)}
    graph: dict[str, set[str]] = {}
    for name, path in _modules(folder):
        deps: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""])
            for target in targets:
                if target.startswith(package + "."):
                    head = target[len(package) + 1:].split(".")[0]
                    if head in names and head != name:
                        deps.add(head)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_inside_a_package():
    circles = {folder: find_cycle(import_graph(folder)) for folder in PACKAGES}
    assert {f: c for f, c in circles.items() if c} == {}


def test_no_function_over_50_lines():
    """bench/ and tests/ are exempt (a benchmark's main scenario reads best whole)."""
    long = []
    for folder in PACKAGES:
        for _, path in _modules(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


# Incident state has one owner, oneha/incidents.py: no other module names an incident key (reads or writes it by
# hand, or hands it to a Lua script), and every key shape comes from oneha/keys.py. The other Lua scripts (VM claims
# in vm_steps, leases, oned slots, stream pruning) touch none.
INCIDENT_KEY_NAMES = {"incident", "incident_seq", "incident_vms", "incident_pending_vms", "incident_started_vms",
                      "incident_log", "incident_index", "open_incident", "handled", "due"}
INCIDENT_OWNERS = {ROOT / "oneha" / "incidents.py", ROOT / "oneha" / "keys.py"}


def _has_lua(tree: ast.Module) -> bool:
    return any((isinstance(n, ast.Constant) and isinstance(n.value, str) and "redis.call" in n.value)
               or (isinstance(n, ast.Attribute) and n.attr in ("register_script", "eval", "evalsha"))
               for n in ast.walk(tree))


def _keys_used(tree: ast.Module) -> set[str]:
    """Names taken from a `Keys` (`keys.x`, `rt.keys.x(...)`)."""
    def is_keys(node: ast.expr) -> bool:
        return ((isinstance(node, ast.Name) and node.id in ("keys", "k"))
                or (isinstance(node, ast.Attribute) and node.attr == "keys"))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_keys(n.value)}


def incident_state_offenders() -> list[str]:
    offenders = []
    for folder in PACKAGES:
        for _, path in _modules(folder):
            if path in INCIDENT_OWNERS:
                continue
            text = path.read_text()
            if ":incident:" in text:
                offenders.append(f"{path.relative_to(ROOT)}: builds an incident key by hand")
            tree = ast.parse(text)
            used = sorted(_keys_used(tree) & INCIDENT_KEY_NAMES)
            if used:
                what = "Lua beside incident keys" if _has_lua(tree) else "incident keys by hand"
                offenders.append(f"{path.relative_to(ROOT)}: {what} {used}")
    return offenders


def test_only_the_incident_store_touches_incident_state():
    assert incident_state_offenders() == []


def test_the_incident_key_check_sees_a_script_over_incident_keys():
    from oneha.keys import Keys

    assert {name for name in dir(Keys) if name.startswith("incident")} <= INCIDENT_KEY_NAMES
    tree = ast.parse('S = "redis.call(\'HSET\', KEYS[1])"\nr.eval(S, 1, keys.incident_pending_vms(3))')
    assert _has_lua(tree)
    assert _keys_used(tree) & INCIDENT_KEY_NAMES == {"incident_pending_vms"}
    assert not _keys_used(ast.parse("flow.incident.id"))  # an Incident, not a key


# Audit entries of the workers have one writer, workers/hooks.py: flows report events (`flow.emit`, outcomes).
AUDIT_WRITERS = {ROOT / "workers" / "hooks.py"}


def audit_writers(folder: str = "workers") -> list[str]:
    """`file:line` of every `.audit(...)` / `.audit_on(...)` call outside the one writer."""
    found = []
    for _, path in _modules(folder):
        if path in AUDIT_WRITERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("audit", "audit_on")):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_only_the_hooks_write_audit_entries():
    assert audit_writers() == []


def test_every_package_under_oneha_is_in_the_wheel() -> None:
    """pyproject.toml lists packages explicitly: a new one left out works in the editable install and is missing
    from the wheel an operator installs (`oneha detect` was, once)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "oneha").rglob("__init__.py")
             if "deploy" not in init.parent.relative_to(ROOT).parts[1:2]}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
