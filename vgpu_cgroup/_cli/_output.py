"""vgpuctl's human output: ``show``, ``tree`` (like systemd-cgls), ``top``
(like systemd-cgtop), ``events`` and ``status``, printed from what vgpud
answers (``--json`` prints that as it is).
"""

from __future__ import annotations

from typing import Any, TextIO

from ._common import human_bytes, knob_text, slice_name


def print_show(d: dict[str, Any], out: TextIO) -> None:
    print(f"# {slice_name(d['slice'])}", file=out)
    for knob, ent in d["knobs"].items():
        eff = d["effective"].get(knob)
        extra = f", effective {eff}" if eff is not None and eff != ent["value"] else ""
        print(f"{knob} {ent['value']} ({ent['source']}{extra})", file=out)
    for dev, eff in d.get("effective.devices", {}).items():
        print(f"effective on {dev}: " + " ".join(f"{k} {v}" for k, v in eff.items()), file=out)
    for key in ("gpu.memory.current", "gpu.memory.peak"):
        m = d[key]
        devs = " ".join(f"{k}={v}" for k, v in m["devices"].items())
        print(f"{key} {m['total']}" + (f" ({devs})" if devs else ""), file=out)
    for key in ("gpu.memory.events", "gpu.memory.events.local"):
        ev = d.get(key)
        if ev is not None:  # .local: not from a daemon older than it
            print(f"{key} " + " ".join(f"{k} {v}" for k, v in ev.items()), file=out)
    st = d["gpu.cores.stat"]
    print("gpu.cores.stat " + " ".join(f"{k} {v}" for k, v in st.items()), file=out)
    for dev, per in d.get("gpu.cores.stat.devices", {}).items():
        print(f"gpu.cores.stat {dev} " + " ".join(f"{k} {v}" for k, v in per.items()),
              file=out)
    if "gpu.clients.current" in d:
        print(f"gpu.clients.current {d['gpu.clients.current']}", file=out)
        cs = d.get("gpu.clients.stat", {})
        print("gpu.clients.stat " + " ".join(f"{k} {v}" for k, v in cs.items()), file=out)
        ce = d["gpu.clients.events"]
        print("gpu.clients.events " + " ".join(f"{k} {v}" for k, v in ce.items()), file=out)
    for p in d["processes"]:
        print(f"process {p['pid']} {p['comm']}", file=out)


def _proc_line(p: dict[str, Any]) -> str:
    counts = ""
    if "launches" in p:
        counts = (f" (launches {p['launches']}, allocs {p['allocs']}, frees {p['frees']}, "
                  f"mem {human_bytes(p['mem_bytes'])})")
    return f"{p['pid']} {p['comm']}{counts}"


def print_tree(node: dict[str, Any], out: TextIO, prefix: str = "", last: bool = True,
               top: bool = True) -> None:
    label = slice_name(node["slice"]) if top else node["name"]
    knobs = " ".join(f"{k}={knob_text(k, v)}" for k, v in node.get("knobs", {}).items())
    mem = node.get("memory", {}).get("total", 0)
    info = " ".join(x for x in (knobs, f"mem={human_bytes(mem)}" if mem else "") if x)
    branch = "" if top else ("└─" if last else "├─")
    print(f"{prefix}{branch}{label}" + (f" [{info}]" if info else ""), file=out)
    child_prefix = prefix if top else prefix + ("  " if last else "│ ")
    entries: list[tuple[str, Any]] = [("proc", p) for p in node.get("processes", [])]
    entries += [("node", c) for c in node.get("children", [])]
    for i, (kind, item) in enumerate(entries):
        is_last = i == len(entries) - 1
        if kind == "proc":
            print(f"{child_prefix}{'└─' if is_last else '├─'}{_proc_line(item)}", file=out)
        else:
            print_tree(item, out, child_prefix, is_last, top=False)


def print_top(d: dict[str, Any], out: TextIO) -> None:
    """systemd-cgtop's columns: PROCS counts descendants, GPU% is percent of
    one GPU over the last second (summed over devices). On a node with more
    than one GPU, a row per device the slice used follows its own (``gpu N``,
    NVML's numbering)."""
    index: dict[str, int] = d.get("devices", {})
    w = max([len("SLICE"), *(len(slice_name(p)) for p in d["slices"])])
    print(f"{'SLICE':<{w}} {'PROCS':>5} {'GPU%':>7} {'MEMORY':>10}", file=out)
    for path, s in sorted(d["slices"].items()):
        gpu = sum(s["gpu_percent"].values())
        print(f"{slice_name(path):<{w}} {s['processes']:>5} {gpu:>7.1f} "
              f"{human_bytes(s['memory_current']):>10}", file=out)
        if len(index) < 2:
            continue
        mem: dict[str, int] = s.get("memory_devices", {})
        for uuid in sorted({*s["gpu_percent"], *(u for u, n in mem.items() if n)},
                           key=lambda u: (index.get(u, len(index)), u)):
            label = f"  gpu {index[uuid]}" if uuid in index else f"  {uuid}"
            print(f"{label:<{w}} {'':>5} {s['gpu_percent'].get(uuid, 0.0):>7.1f} "
                  f"{human_bytes(mem.get(uuid, 0)):>10}", file=out)


def print_events(d: dict[str, Any], out: TextIO, local: bool = False) -> None:
    """REFUSED: connections refused for capacity, counted on the slice whose
    bound it was (gpu.clients.events, all keys; --json has each)."""
    key = "gpu.memory.events.local" if local else "gpu.memory.events"
    print(f"{'SLICE':<48} {'HIGH':>6} {'MAX':>6} {'OOM':>6} {'NR_THROTTLED':>12} "
          f"{'THROTTLED_S':>11} {'REFUSED':>8}", file=out)
    for path, e in sorted(d["slices"].items()):
        m, c = e[key], e["gpu.cores.stat"]
        refused = sum(e.get("gpu.clients.events", {}).values())
        print(f"{slice_name(path):<48} {m['high']:>6} {m['max']:>6} {m['oom']:>6} "
              f"{c['nr_throttled']:>12} {c['throttled_usec'] / 1e6:>11.3f} {refused:>8}",
              file=out)


def print_status(d: dict[str, Any], out: TextIO) -> None:
    mode = "simulated GPU" if d.get("simulated") else "NVIDIA driver"
    act = ", socket-activated" if d.get("socket_activated") else ""
    print(f"vgpud {d['version']} (protocol {d['protocol']}, {mode}, identity "
          f"{d['identity']}{act})", file=out)
    print(f"socket: {d['socket']}", file=out)
    for dev in d["devices"]:
        print(f"gpu {dev['index']}: {dev['name']} {dev['uuid']} {human_bytes(dev['total_mem'])}",
              file=out)
    hooks = [c for c in d["clients"] if c["role"] == "hook"]
    print(f"clients: {len(hooks)} hooked process(es), "
          f"{len(d['clients']) - len(hooks)} control connection(s)", file=out)
    conns = d.get("connections")
    if conns:
        lim = conns["limits"]
        print(f"connections: {conns['open']} open, {conns['counted']} of limits.clients="
              f"{lim['clients']} (per slice: {lim['slice_clients']} connections, "
              f"{lim['slice_hooks']} hooked, {lim['slice_handshakes']} handshakes)", file=out)
    for name, path in d.get("layers", {}).items():
        print(f"slice files ({name}): {path}", file=out)
    if d.get("config_error"):
        print(f"configuration error (running on the last good one): {d['config_error']}",
              file=out)
