"""The architecture, checked: which part may use which, and how big a part
may grow (docs/design.md, "Layers").

libvgpu-hook.so is four layers, each a header (libhook/hook_base.h says
which files are in which): base < transport < services < interposition. A
file uses its own layer and those below, never one above; the symbol tables
of the compiled objects say what each file really uses, so a call hidden in
a macro counts too. Within the lower three layers no two files use each
other either (the services were one circle before: init -> account -> dev ->
launch -> init). The simulated driver is one layer with one private header.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Mapping
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
