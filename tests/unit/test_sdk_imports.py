"""The SDK's module graph: no import cycles inside `client/perito`, and nothing server-side.

The graph is read from the source with `ast`, every import counted: at module level, inside
functions and under `if TYPE_CHECKING:` alike (a cycle hidden from the interpreter is still a
cycle for whoever reads or changes the code)."""

from __future__ import annotations

import ast
import sys
from collections.abc import Collection
from pathlib import Path

SDK = Path(__file__).resolve().parents[2] / "client" / "perito"

# Third-party packages the SDK may import. The base install brings grpcio, protobuf,
# googleapis-common-protos (`google.rpc`), grpcio-health-checking (`grpc_health`, for
# `perito health`) and click; Pillow and numpy are only imported when the caller hands over
# PIL images or arrays, boto3 only for `upload_to=` (the `s3` extra).
ALLOWED_THIRD_PARTY = {"grpc", "grpc_health", "google", "click", "PIL", "numpy", "boto3"}


def _module_name(path: Path) -> str:
    return "perito" if path.name == "__init__.py" else f"perito.{path.stem}"


def _imports(path: Path, modules: Collection[str] = ()) -> set[str]:
    """Every module `path` imports, absolute (`perito._jobs`, `grpc.aio`). `from perito
    import name` counts as `perito.name` when that is one of `modules`, else as `perito`
    (the package's `__init__`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(["perito", *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules or base != "perito" else base)
            if base != "perito":
                found.add(base)
    return found


def sdk_graph() -> dict[str, set[str]]:
    """Module -> the SDK modules it imports (`perito` is the package's `__init__`; the
    generated `perito.v1` is left out: it imports nothing of the SDK)."""
    modules = {_module_name(path): path for path in SDK.glob("*.py")}
    return {
        name: {t for t in _imports(path, set(modules)) if t in modules and t != name}
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_type_checking_and_function_level_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from perito._client import Client\n"
        "def f():\n    from . import _jobs\n"
    )
    assert {"perito._client", "perito._jobs"} <= _imports(module, {"perito._jobs"})


def test_the_sdk_has_no_import_cycles() -> None:
    graph = sdk_graph()
    assert {"perito._client", "perito._async", "perito._jobs"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_sdk_imports_nothing_server_side() -> None:
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in sorted(SDK.glob("*.py")):
        for target in _imports(path):
            top = target.partition(".")[0]
            assert top in stdlib | ALLOWED_THIRD_PARTY | {"perito"}, f"{path.name}: {target}"


def test_the_sdks_own_commands_load_no_extra() -> None:
    """`perito health` (a container's health check) and the other SDK commands loaded every
    installed extra first: torch and the server, 2.5 s and 950 MB for each health probe.
    The extras' commands load only when one of them is asked for, or the commands listed."""
    import subprocess

    program = (
        "import sys\n"
        "from perito._cli import cli\n"
        "for args in (['health', '--server', '127.0.0.1:1', '--timeout', '0.2'],\n"
        "             ['classify', '--help'], ['models', 'list', '--help'], ['job', '--help']):\n"
        "    try:\n"
        "        cli.main(args, standalone_mode=False)\n"
        "    except BaseException:\n"
        "        pass\n"
        "assert 'torch' not in sys.modules and 'perito_server' not in sys.modules, 'extras'\n"
        "cli.main(['models', 'alias', '--help'], standalone_mode=False)\n"
        "assert 'perito_server' in sys.modules, 'the extra was not loaded when asked for'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
