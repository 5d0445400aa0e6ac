"""The architecture, checked: which part may use which, and how big a part
may grow (docs/design.md, "Layers").

The Python package is layered by subpackage: the pure core (``_core``) <
the wire (``_wire``) < the daemon's shell (``_node``), the CLI (``_cli``)
and the Kubernetes plugins (``k8s``), which do not use each other; beside
them the shared helpers ``_log`` and ``_paths``, the command-line shims and
the demo. The imports, read with ``ast`` (every import, in functions and
under TYPE_CHECKING too), say who uses whom.

libvgpu-hook.so is four layers, each a header (libhook/hook_base.h says
which files are in which): base < transport < services < interposition. A
file uses its own layer and those below, never one above; the symbol tables
of the compiled objects say what each file really uses, so a call hidden in
a macro counts too. Within the lower three layers no two files use each
other either (the services were one circle before: init -> account -> dev ->
launch -> init). The simulated driver is one layer with one private header.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBHOOK = ROOT / "libhook"

#: The layer headers of libvgpu-hook.so, bottom up.
HOOK_LAYERS = ("hook_base.h", "hook_client.h", "hook_services.h", "hook_interpose.h")
#: Largest C file, in lines: the hook, the simulated driver.
HOOK_MAX_LINES = 800
SIM_MAX_LINES = 1000
#: The launch fast path: inline in every launch entry point, never a function.
HOT_INLINE = ("vgpu_gate_enter", "vgpu_gate_leave", "vgpu_batch_enter", "vgpu_batch_leave",
              "vgpu_gated", "vgpu_enter", "vgpu_ensure_fast", "vgpu_launch_ctx_changed")


def _includes(path: Path) -> list[str]:
    return re.findall(r'^\s*#\s*include\s+"([^"]+)"', path.read_text(), re.M)


def _cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)) is not None:
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)) is not None:
            return found
    return None


PKG = ROOT / "vgpu_cgroup"
#: Largest Python module, in lines, and class.
PY_MAX_LINES = 500
PY_MAX_CLASS = 300
#: The daemon's units (docs/design.md): each well under 400 lines.
NODE_UNITS = ("_daemon", "_accept", "_sessions", "_memory", "_compute", "_control",
              "_recovery", "_tick")
NODE_UNIT_MAX_LINES = 400

#: Which layer may import which (its own included).
MAY_USE: dict[str, set[str]] = {
    "core": {"core"},
    "wire": {"core", "wire"},
    "helpers": {"core", "helpers"},
    "node": {"core", "wire", "helpers", "node"},
    "cli": {"core", "wire", "helpers", "cli"},
    "k8s": {"core", "wire", "helpers", "k8s"},
    "shim:vgpu_cgroup._daemon_main": {"node"},
    "shim:vgpu_cgroup._ctl": {"cli"},
    "demo": set(),
}
#: What the pure core may import from the standard library: no I/O, no
#: clock, no threads, no trio (nor any other third-party package).
CORE_STDLIB = {"__future__", "collections", "dataclasses", "typing", "itertools", "math", "re",
               "json", "tomllib", "os", "decimal", "enum", "functools", "bisect", "heapq"}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) >= 2 and parts[1] in ("_core", "_wire", "_node", "_cli", "k8s"):
        return {"_core": "core", "_wire": "wire", "_node": "node", "_cli": "cli",
                "k8s": "k8s"}[parts[1]]
    if mod in ("vgpu_cgroup", "vgpu_cgroup._log", "vgpu_cgroup._paths"):
        return "helpers"
    if mod in ("vgpu_cgroup._daemon_main", "vgpu_cgroup._ctl"):
        return f"shim:{mod}"
    if mod == "vgpu_cgroup._demo":
        return "demo"
    raise AssertionError(f"{mod} belongs to no layer: put it in one (docs/design.md)")


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()
#: Modules that are not Python source: the cffi ABI module (``_wire/_abi_build.py``).
COMPILED = {"vgpu_cgroup._wire._abi"}


def _resolve(importer: str, node: ast.ImportFrom | ast.Import) -> Iterator[tuple[str, str]]:
    """(module imported, how it was named) for each vgpu_cgroup module an
    import statement reaches: ``from pkg import name`` is ``pkg.name`` when
    that is a module, else ``pkg``."""
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name.split(".")[0] == "vgpu_cgroup":
                yield a.name, a.name
        return
    if node.level:
        base = importer.split(".")
        if MODULES[importer].name != "__init__.py":
            base = base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "vgpu_cgroup":
        return
    for a in node.names:
        sub = f"{target}.{a.name}"
        yield (sub, sub) if sub in MODULES or sub in COMPILED else (target, target)


def _imports() -> dict[str, list[tuple[str, str, int]]]:
    """Per module, the vgpu_cgroup modules it imports: (module, as named, line)."""
    out: dict[str, list[tuple[str, str, int]]] = {}
    for mod, path in MODULES.items():
        found: list[tuple[str, str, int]] = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found += [(m, named, node.lineno) for m, named in _resolve(mod, node)]
        out[mod] = found
    return out


def _package(mod: str) -> str:
    """The layer package a module is in (``vgpu_cgroup._core``), or itself."""
    parts = mod.split(".")
    if len(parts) > 2 or (mod in MODULES and MODULES[mod].name == "__init__.py"):
        return ".".join(parts[:2])
    return mod


def test_every_module_is_in_a_layer() -> None:
    for mod in MODULES:
        if "_gen" not in mod:
            _layer(mod)


def test_layers_use_only_what_they_may() -> None:
    bad = []
    for mod, found in _imports().items():
        for target, _named, line in found:
            if target not in MODULES and target not in COMPILED:
                bad.append(f"{mod}:{line} imports {target}, which does not exist")
                continue
            if _layer(target) not in MAY_USE[_layer(mod)]:
                bad.append(f"{mod}:{line} ({_layer(mod)}) imports {target} ({_layer(target)})")
    assert not bad, "\n".join(bad)


def test_other_layers_import_a_layer_through_its_package() -> None:
    # vgpu_cgroup._core, not vgpu_cgroup._core._tree: what a layer offers the
    # others is what its __init__ re-exports (trio's style); inside a layer
    # modules import each other directly.
    bad = []
    for mod, found in _imports().items():
        for target, named, line in found:
            if _layer(target) != _layer(mod) and _package(named) != named:
                bad.append(f"{mod}:{line} imports {named}; import {_package(named)}")
    assert not bad, "\n".join(bad)


def test_the_core_is_pure() -> None:
    bad = []
    for mod, path in MODULES.items():
        if _layer(mod) != "core":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                top = n.split(".")[0]
                if top != "vgpu_cgroup" and top not in CORE_STDLIB:
                    bad.append(f"{mod}: imports {n}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                    node.func.id == "open":
                bad.append(f"{mod}:{node.lineno} opens a file")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                    node.value.id == "os" and node.attr != "path":
                bad.append(f"{mod}:{node.lineno} uses os.{node.attr} (only os.path)")
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    graph = {mod: {t for t, _, _ in found} for mod, found in _imports().items()}
    assert _cycle(graph) is None, _cycle(graph)


def test_python_modules_and_classes_are_small_enough() -> None:
    big = []
    for mod, path in MODULES.items():
        if "_gen" in mod:
            continue  # grpcio-tools' output (scripts/gen-protos)
        text = path.read_text()
        n = len(text.splitlines())
        limit = NODE_UNIT_MAX_LINES if mod.rsplit(".", 1)[-1] in NODE_UNITS and \
            _layer(mod) == "node" else PY_MAX_LINES
        if n > limit:
            big.append(f"{mod}: {n} lines (at most {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > PY_MAX_CLASS:
                    big.append(f"{mod}.{node.name}: {size} lines (at most {PY_MAX_CLASS})")
    assert not big, big


def test_entry_points_are_where_they_are_named() -> None:
    # The console scripts and the commands the README, bench/ and tests name.
    text = (ROOT / "pyproject.toml").read_text()
    for target in re.findall(r'^\S+ = "(vgpu_cgroup[\w.]*):(\w+)"', text, re.M):
        assert target[0] in MODULES, target
        assert f"def {target[1]}(" in MODULES[target[0]].read_text(), target
    for m in ("vgpu_cgroup._daemon_main", "vgpu_cgroup._ctl"):
        r = subprocess.run([sys.executable, "-m", m, "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 0, (m, r.stderr)
        assert "usage" in r.stdout.lower(), (m, r.stdout)
    # The demo is a program of its own: nothing of the package, so its
    # tenants are CUDA programs that know nothing of vgpu.
    assert not _imports()["vgpu_cgroup._demo"]


def test_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": ["b"], "b": ["c"], "c": []}) is None
    assert _cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert _cycle({"a": ["a"]}) == ["a", "a"]


# ---- libvgpu-hook.so --------------------------------------------------------


class Syms(NamedTuple):
    defined: set[str]  # global symbols the object defines
    local: set[str]  # its static ones (functions not inlined, say)
    used: set[str]  # global symbols it uses and does not define


def _hook_sources() -> list[Path]:
    return sorted(LIBHOOK.glob("hook_*.c"))


def _layer_of(src: Path) -> int:
    """A hook file's layer: the one layer header it includes."""
    mine = [h for h in _includes(src) if h in HOOK_LAYERS]
    assert len(mine) == 1, f"{src.name} must include exactly one layer header, not {mine}"
    return HOOK_LAYERS.index(mine[0])


def test_hook_headers_stack_one_on_another() -> None:
    # Each layer header includes the one below it and nothing else of ours
    # (vgpu_abi.h, the structs shared with the daemon, through the base).
    assert not (LIBHOOK / "hook_internal.h").exists()
    for i, h in enumerate(HOOK_LAYERS):
        ours = [x for x in _includes(LIBHOOK / h) if x.startswith("hook_")]
        assert ours == ([HOOK_LAYERS[i - 1]] if i else []), (h, ours)
    assert "vgpu_abi.h" in _includes(LIBHOOK / "hook_base.h")
    # Every hook source is named in the make file and lists itself in its
    # layer's header comment, where a reader looks for it.
    mk = (LIBHOOK / "hook.mk").read_text()
    for src in _hook_sources():
        assert src.name in mk, src.name
        assert src.name in (LIBHOOK / HOOK_LAYERS[_layer_of(src)]).read_text(), src.name


@pytest.fixture(scope="module")
def hook_objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Syms]:
    """Per hook source, the symbols its object defines (global, local) and
    the global ones it uses."""
    out_dir = tmp_path_factory.mktemp("hook-layers")
    subprocess.run(["make", "-s", "-C", str(LIBHOOK), "hook", f"LIBOUT={out_dir}"], check=True)
    syms: dict[str, Syms] = {}
    for src in _hook_sources():
        obj = out_dir / ".hook-obj" / (src.stem + ".o")
        nm = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True).stdout
        s = Syms(set(), set(), set())
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == "U":
                s.used.add(parts[1])
            elif len(parts) == 3 and parts[1] in "TDBRVC":
                s.defined.add(parts[2])
            elif len(parts) == 3:
                s.local.add(parts[2])
        syms[src.name] = s
    return syms


def test_hook_layers_use_only_what_is_below(hook_objects: dict[str, Syms]) -> None:
    owner = {s: f for f, syms in hook_objects.items() for s in syms.defined}
    layer = {src.name: _layer_of(src) for src in _hook_sources()}
    uses: dict[str, set[str]] = {f: set() for f in hook_objects}
    upward: list[str] = []
    for f, syms in hook_objects.items():
        for s in syms.used:
            g = owner.get(s)
            if g is None or g == f:
                continue  # the C library's, or its own
            uses[f].add(g)
            if layer[g] > layer[f]:
                upward.append(f"{f} (layer {layer[f]}) uses {s} of {g} (layer {layer[g]})")
    assert not upward, "\n".join(sorted(upward))
    # Below interposition, files of one layer do not use each other in a
    # circle. (The interposition files do: every entry point enters through
    # hook_init.c's vgpu_ensure, and hook_dlsym.c's table names every entry
    # point; hook_interpose.h says so.)
    same_layer = {f: {g for g in gs if layer[g] == layer[f] < 3} for f, gs in uses.items()}
    assert _cycle(same_layer) is None, _cycle(same_layer)
    # The services really are below the entry points: none of them registers
    # or resolves anything (that is interposition's, on the first call).
    assert not any("hook_init.c" in uses[f] for f in uses if layer[f] < 3)


def test_hook_fast_path_is_inline(hook_objects: dict[str, Syms]) -> None:
    # No object has the fast path's functions as symbols, not even local
    # ones: they are inlined in every launch entry point (bench/callgrind.sh
    # measures what that costs).
    for f, syms in hook_objects.items():
        found = set(HOT_INLINE) & (syms.defined | syms.local | syms.used)
        assert not found, (f, found)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_c_files_are_small_enough() -> None:
    big = [f"{p.relative_to(ROOT)}: {_lines(p)}" for p in LIBHOOK.glob("*.[ch]")
           if _lines(p) > HOOK_MAX_LINES]
    big += [f"{p.relative_to(ROOT)}: {_lines(p)}" for p in (LIBHOOK / "sim").glob("*.[ch]")
            if _lines(p) > SIM_MAX_LINES]
    assert not big, big


def test_simulated_driver_units_share_one_private_header() -> None:
    sim = LIBHOOK / "sim"
    mk = (sim / "Makefile").read_text()
    units = sorted(p for p in sim.glob("sim_*.c") if p.name not in ("sim_shm.c", "sim_nvml.c"))
    assert len(units) >= 6
    for p in units:
        assert p.name in mk, p.name
        assert _includes(p) == ["sim_internal.h"], (p.name, _includes(p))
        assert p.name in (sim / "sim_internal.h").read_text(), p.name
