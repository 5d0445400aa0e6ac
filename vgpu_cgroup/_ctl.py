"""``vgpuctl``: inspect and change the slice tree, run programs under the hook.

Shaped like systemctl/systemd-cgls/systemd-cgtop/systemd-run: slices are
named by cgroup path or by systemd slice unit name, output reads like cgroup
files, ``--json`` gives machine output.  Exit status: 0 ok, 1 usage error,
2 daemon error (unreachable, refused, invalid), else the command's own for
``run``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from vgpu_cgroup._client import Client, ClientError
from vgpu_cgroup._config import ConfigError, expand_slice_name
from vgpu_cgroup._identity import find_cgroup2_mount
from vgpu_cgroup._nvml import SIM_DIR

DEFAULT_SOCKET = "/run/vgpu/vgpud.sock"
HOOK_LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib", "libvgpu-hook.so")

EXIT_USAGE = 1
EXIT_DAEMON = 2


class UsageError(Exception):
    pass


class DaemonError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


_RAW = argparse.RawDescriptionHelpFormatter

EPILOG = """\
commands:
  show [SLICE]            knobs, effective values, usage, and which file set each
  tree                    slices and their processes (like systemd-cgls)
  top                     GPU time and memory per slice (like systemd-cgtop)
  events [--local] [SLICE]  gpu.memory.events (--local: .local), gpu.cores.stat, gpu.clients.events
  set [--runtime] SLICE KNOB=VALUE...   change knobs live (root)
  reset [--runtime] SLICE              drop what vgpuctl set put on SLICE (root)
  run [--slice S] [-p KNOB=VALUE]... -- CMD...   run CMD under the hook
  status                  daemon version, devices, clients, config layers

SLICE is a cgroup path (tenants.slice/tenants-alice.slice) or a systemd slice
unit name (tenants-alice.slice); -.slice is the root.

examples:
  vgpuctl set tenants-alice.slice gpu.cores.max=30 gpu.memory.max=8G
  vgpuctl show tenants-alice.slice
  vgpuctl --json tree | jq '.children[].processes'
  vgpuctl run -p gpu.cores.max=50 -- python train.py

exit status: 0 ok, 1 usage error, 2 daemon error (unreachable, refused,
invalid); run exits with the command's status.
"""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vgpuctl", description="Control vgpud: GPU shares and memory caps "
                "per cgroup slice.", epilog=EPILOG, formatter_class=_RAW)
    p.add_argument("--socket", metavar="PATH",
                   default=os.environ.get("VGPU_SOCKET", DEFAULT_SOCKET),
                   help=f"vgpud socket (default $VGPU_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(
            name, help=help, description=help, epilog=epilog, formatter_class=_RAW)
        sp.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
        return sp

    s = add("show", "knobs, effective values, usage of a slice, and which file set each",
            "examples:\n  vgpuctl show                      the root slice\n"
            "  vgpuctl show tenants-alice.slice\n"
            "  vgpuctl show --json kubepods/pod1234\n\n"
            "Each knob reads 'KNOB VALUE (SOURCE[, effective E])': SOURCE is the file\n"
            "that set it (/etc, the persistent vgpuctl layer, /run) or 'default'.")
    s.add_argument("slice", nargs="?", default="", metavar="SLICE")
    add("tree", "slices and their processes, like systemd-cgls",
        "Each process line: PID COMM, kernel launches, allocations, frees and the\n"
        "GPU memory it holds.\n\nexamples:\n  vgpuctl tree\n  vgpuctl tree --json")
    s = add("top", "live GPU time and memory per slice, like systemd-cgtop",
            "On a terminal it refreshes every -d seconds until Ctrl-C (or -n\n"
            "iterations); otherwise it prints one plain iteration.\n\n"
            "examples:\n  vgpuctl top\n  vgpuctl top -d 5 -n 3 > log.txt")
    s.add_argument("-d", "--delay", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    s.add_argument("-n", "--iterations", type=int, default=None, metavar="N",
                   help="stop after N iterations (default: 1 off a terminal, else forever)")
    s = add("events", "memory events and throttling counters per slice",
            "high: allocations that left a slice above its gpu.memory.high; max:\n"
            "allocations a slice's gpu.memory.max refused; oom: refused allocations\n"
            "of processes in the slice; nr_throttled/throttled_usec: launches that\n"
            "waited for the GPU. As in cgroup v2 a slice's counts include those of\n"
            "the slices below it; --local shows only its own (gpu.memory.events.local).\n"
            "refused: connections refused for capacity (gpu.clients.events, counted on\n"
            "the slice whose bound it was; -.slice for the node-wide limits.clients).\n"
            "\nexamples:\n  vgpuctl events\n  vgpuctl events --local tenants-alice.slice")
    s.add_argument("--local", action="store_true",
                   help="memory events of each slice itself, without its descendants")
    s.add_argument("slice", nargs="?", default=None, metavar="SLICE")
    add("status", "daemon version, devices, clients, configuration layers",
        "examples:\n  vgpuctl status\n  vgpuctl status --json")
    s = add("set", "change knobs of a slice, live (like systemctl set-property)",
            "Without --runtime the change persists in /etc/vgpu/slices.control (it\n"
            "wins over /etc/vgpu/slices); with --runtime it lives in /run/vgpu/slices\n"
            "until reboot and wins over both. Running processes get it within a tick.\n\n"
            "knobs: gpu.cores.max, gpu.cores.min (percent of one GPU, or max),\n"
            "gpu.cores.weight (1-10000), gpu.memory.max, gpu.memory.high (bytes with\n"
            "K/M/G, or max), gpu.devices (indices or UUIDs, comma-separated),\n"
            "gpu.clients.max (connections to vgpud from the slice and its descendants,\n"
            "or max; not on -.slice)\n\n"
            "examples:\n  vgpuctl set tenants-alice.slice gpu.cores.max=30 gpu.memory.max=8G\n"
            "  vgpuctl set --runtime tenants-bob.slice gpu.cores.weight=200\n"
            "  vgpuctl set tenants-alice.slice gpu.cores.min=50 gpu.cores.max=50  "
            "# vcuda-core=50")
    s.add_argument("--runtime", action="store_true",
                   help="keep the change under the runtime directory until reboot")
    s.add_argument("slice", metavar="SLICE")
    s.add_argument("assignments", nargs="+", metavar="KNOB=VALUE")
    s = add("reset", "drop the knobs vgpuctl set put on a slice (like systemctl revert)",
            "Removes the slice's runtime file and, without --runtime, its persistent\n"
            "vgpuctl file; values fall back to /etc/vgpu/slices or the defaults.\n\n"
            "examples:\n  vgpuctl reset tenants-alice.slice\n"
            "  vgpuctl reset --runtime vgpu.slice/run-0123456789ab.scope")
    s.add_argument("--runtime", action="store_true",
                   help="only the runtime layer (keep persistent vgpuctl settings)")
    s.add_argument("slice", metavar="SLICE")
    s = add("run", "run a command under the hook in a transient scope (like systemd-run "
            "--scope)",
            "CMD runs with libvgpu-hook preloaded in a new scope run-<id>.scope under\n"
            "--slice (default vgpu.slice): through systemd-run --scope where systemd is\n"
            "PID 1, else in a cgroup vgpuctl creates. -p knobs are set on the scope\n"
            "(runtime layer) before CMD starts and removed when it exits.\n\n"
            "examples:\n  vgpuctl run -p gpu.cores.max=30 -p gpu.memory.max=4G -- ./train\n"
            "  vgpuctl run --slice tenants-alice.slice -- python infer.py")
    s.add_argument("--slice", metavar="SLICE", help="create the scope under this slice")
    s.add_argument("-p", "--property", action="append", default=[], metavar="KNOB=VALUE",
                   dest="props", help="knob for the scope (repeatable)")
    s.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD...")
    return p


def _slice(name: str) -> str:
    try:
        return expand_slice_name(name)
    except ConfigError as exc:
        raise UsageError(exc.msg) from None


def _assignments(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        knob, sep, value = item.partition("=")
        if not sep or not knob or not value:
            raise UsageError(f"expected KNOB=VALUE, got {item!r}")
        out[knob.strip()] = value.strip()
    return out


def _connect(path: str) -> Client:
    try:
        c = Client(path)
    except OSError as exc:
        raise DaemonError(f"cannot connect to vgpud at {path}: "
                          f"{exc.strerror or exc} (is vgpud running?)") from None
    try:
        c.hello("ctl")
    except (ClientError, OSError) as exc:
        c.close()
        raise DaemonError(f"vgpud at {path} refused the handshake: {exc}") from None
    return c


def _ctl(c: Client, op: str, **fields: Any) -> dict[str, Any]:
    try:
        return c.ctl(op, **fields)
    except ClientError as exc:
        raise DaemonError(exc.msg) from None
    except OSError as exc:
        raise DaemonError(f"lost connection to vgpud: {exc}") from None


def _bytes(n: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def _knob_text(knob: str, value: str) -> str:
    """Memory knobs in K/M/G when exact, for people; --json keeps bytes."""
    return _bytes(int(value)) if knob.startswith("gpu.memory.") and value.isdigit() else value


def _name(path: str) -> str:
    return path or "-.slice"


# ---- human output -----------------------------------------------------------


def print_show(d: dict[str, Any], out: TextIO) -> None:
    print(f"# {_name(d['slice'])}", file=out)
    for knob, ent in d["knobs"].items():
        eff = d["effective"].get(knob)
        extra = f", effective {eff}" if eff is not None and eff != ent["value"] else ""
        print(f"{knob} {ent['value']} ({ent['source']}{extra})", file=out)
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
                  f"mem {_bytes(p['mem_bytes'])})")
    return f"{p['pid']} {p['comm']}{counts}"


def print_tree(node: dict[str, Any], out: TextIO, prefix: str = "", last: bool = True,
               top: bool = True) -> None:
    label = _name(node["slice"]) if top else node["name"]
    knobs = " ".join(f"{k}={_knob_text(k, v)}" for k, v in node.get("knobs", {}).items())
    mem = node.get("memory", {}).get("total", 0)
    info = " ".join(x for x in (knobs, f"mem={_bytes(mem)}" if mem else "") if x)
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
    one GPU over the last second (summed over devices)."""
    w = max([len("SLICE"), *(len(_name(p)) for p in d["slices"])])
    print(f"{'SLICE':<{w}} {'PROCS':>5} {'GPU%':>7} {'MEMORY':>10}", file=out)
    for path, s in sorted(d["slices"].items()):
        gpu = sum(s["gpu_percent"].values())
        print(f"{_name(path):<{w}} {s['processes']:>5} {gpu:>7.1f} "
              f"{_bytes(s['memory_current']):>10}", file=out)


def print_events(d: dict[str, Any], out: TextIO, local: bool = False) -> None:
    """REFUSED: connections refused for capacity, counted on the slice whose
    bound it was (gpu.clients.events, all keys; --json has each)."""
    key = "gpu.memory.events.local" if local else "gpu.memory.events"
    print(f"{'SLICE':<48} {'HIGH':>6} {'MAX':>6} {'OOM':>6} {'NR_THROTTLED':>12} "
          f"{'THROTTLED_S':>11} {'REFUSED':>8}", file=out)
    for path, e in sorted(d["slices"].items()):
        m, c = e[key], e["gpu.cores.stat"]
        refused = sum(e.get("gpu.clients.events", {}).values())
        print(f"{_name(path):<48} {m['high']:>6} {m['max']:>6} {m['oom']:>6} "
              f"{c['nr_throttled']:>12} {c['throttled_usec'] / 1e6:>11.3f} {refused:>8}",
              file=out)


def print_status(d: dict[str, Any], out: TextIO) -> None:
    mode = "simulated GPU" if d.get("simulated") else "NVIDIA driver"
    act = ", socket-activated" if d.get("socket_activated") else ""
    print(f"vgpud {d['version']} (protocol {d['protocol']}, {mode}, identity "
          f"{d['identity']}{act})", file=out)
    print(f"socket: {d['socket']}", file=out)
    for dev in d["devices"]:
        print(f"gpu {dev['index']}: {dev['name']} {dev['uuid']} {_bytes(dev['total_mem'])}",
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


# ---- commands ---------------------------------------------------------------


def _emit(args: argparse.Namespace, data: dict[str, Any], human: Any, out: TextIO) -> None:
    if args.json:
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        human(data, out)


def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    """systemd-cgtop: a terminal refreshes until Ctrl-C (or -n); a pipe gets
    one plain iteration unless -n asks for more."""
    tty = out.isatty() and not args.json
    n = args.iterations if args.iterations is not None else (None if tty else 1)
    if n is not None and n < 1:
        raise UsageError("top -n needs a positive number of iterations")
    if args.delay <= 0:
        raise UsageError("top -d needs a positive number of seconds")
    with _connect(args.socket) as c:
        i = 0
        try:
            while True:
                data = _ctl(c, "top")
                if args.json:
                    if n == 1:
                        _emit(args, data, print_top, out)
                    else:  # JSON lines, one object per iteration
                        out.write(json.dumps(data, sort_keys=True) + "\n")
                else:
                    if tty:
                        out.write("\x1b[H\x1b[2J")
                    elif i:
                        out.write("\n")
                    print_top(data, out)
                out.flush()
                i += 1
                if n is not None and i >= n:
                    return 0
                time.sleep(args.delay)
        except KeyboardInterrupt:
            return 0


def _has_systemd() -> bool:
    """systemd runs this machine (PID 1) and systemd-run is installed."""
    return os.path.isdir("/run/systemd/system") and shutil.which("systemd-run") is not None


def systemd_run_argv(parent: str, scope_name: str, cmd: Sequence[str]) -> list[str]:
    """The systemd-run command that puts CMD in ``<parent>/<scope_name>``.

    systemd has no gpu.* properties, so it only places the process; the
    knobs go to vgpud on that scope's path. ``parent`` must be a slice
    path whose last component is a slice unit (systemd nests them).
    """
    unit = parent.rsplit("/", 1)[-1] if parent else "-.slice"
    if not unit.endswith(".slice"):
        raise UsageError(f"--slice {parent!r}: with systemd the parent must be a slice unit "
                         "(like tenants-alice.slice)")
    return ["systemd-run", "--scope", "--quiet", "--collect", f"--unit={scope_name}",
            f"--slice={unit}", "--", *cmd]


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("run needs a command after --")
    knobs = _assignments(args.props)
    parent = _slice(args.slice) if args.slice else "vgpu.slice"
    scope_name = f"run-{secrets.token_hex(6)}.scope"
    scope = f"{parent}/{scope_name}".strip("/")
    use_systemd = _has_systemd()
    argv = systemd_run_argv(parent, scope_name, cmd) if use_systemd else None
    with _connect(args.socket) as c:
        simulated = bool(_ctl(c, "status").get("simulated"))
        if knobs:
            _ctl(c, "set", slice=scope, runtime=True, knobs=knobs)
    try:
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(x for x in (HOOK_LIB, env.get("LD_PRELOAD")) if x)
        env["VGPU_SOCKET"] = args.socket
        if simulated:
            env["LD_LIBRARY_PATH"] = ":".join(
                x for x in (SIM_DIR, env.get("LD_LIBRARY_PATH")) if x)
        if argv is not None:
            try:
                return _wait(subprocess.Popen(argv, env=env))
            except OSError as exc:
                print(f"vgpuctl: cannot run systemd-run: {exc.strerror or exc}",
                      file=sys.stderr)
                return 127
        return _run_own_cgroup(scope, cmd, env)
    finally:
        if knobs:
            _reset_scope(args.socket, scope)


def _reset_scope(socket_path: str, scope: str) -> None:
    """The scope's knobs must not outlive it (also after Ctrl-C or a failure)."""
    try:
        with _connect(socket_path) as c:
            _ctl(c, "reset", slice=scope, runtime=True)
    except DaemonError as exc:
        print(f"vgpuctl: warning: could not remove the knobs of {scope}: {exc}; "
              f"run: vgpuctl reset --runtime {scope}", file=sys.stderr)


def _run_own_cgroup(scope: str, cmd: list[str], env: dict[str, str]) -> int:
    try:
        mount = find_cgroup2_mount()
    except (OSError, LookupError) as exc:
        raise DaemonError(f"cannot find the cgroup v2 hierarchy: {exc}") from None
    cg = os.path.join(mount, scope)
    try:
        os.makedirs(cg, exist_ok=False)
    except OSError as exc:
        raise DaemonError(f"cannot create cgroup {cg}: {exc.strerror or exc} "
                          "(vgpuctl run needs root, or systemd)") from None
    procs = os.path.join(cg, "cgroup.procs")

    def enter() -> None:  # in the child, before exec: only CMD lives in the scope
        with open(procs, "w", encoding="ascii") as f:
            f.write("0")

    try:
        try:
            proc = subprocess.Popen(cmd, env=env, preexec_fn=enter)
        except OSError as exc:
            print(f"vgpuctl: cannot run {cmd[0]}: {exc.strerror or exc}", file=sys.stderr)
            return 127
        return _wait(proc)
    finally:
        for _ in range(50):  # descendants may take a moment to be reaped
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        else:
            print(f"vgpuctl: warning: {cg} still has processes; not removed", file=sys.stderr)


def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for CMD. The terminal's Ctrl-C reaches it directly, so we ignore
    SIGINT; a SIGTERM/SIGHUP sent to vgpuctl is passed on to it. Either way
    we outlive it and clean up after it."""

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(sig)

    old = {sig: signal.signal(sig, h) for sig, h in
           ((signal.SIGINT, signal.SIG_IGN), (signal.SIGTERM, forward),
            (signal.SIGHUP, forward))}
    try:
        rc = proc.wait()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return 128 - rc if rc < 0 else rc


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.cmd is None:
        raise UsageError("a command is required (show, tree, top, events, set, reset, run, "
                         "status)")
    if args.cmd == "run":
        return cmd_run(args, out)
    if args.cmd == "top":
        return cmd_top(args, out)
    if args.cmd == "set":
        knobs = _assignments(args.assignments)
        slc = _slice(args.slice)
        with _connect(args.socket) as c:
            data = _ctl(c, "set", slice=slc, runtime=args.runtime, knobs=knobs)
        _warn_config(data)
        _emit(args, data, lambda d, o: print_show(d["show"], o), out)
        return 0
    if args.cmd == "reset":
        slc = _slice(args.slice)
        with _connect(args.socket) as c:
            data = _ctl(c, "reset", slice=slc, runtime=args.runtime)
        _warn_config(data)
        _emit(args, data, lambda d, o: print(
            f"{_name(d['slice'])}: removed {', '.join(d['removed']) or 'nothing'}", file=o),
            out)
        return 0
    with _connect(args.socket) as c:
        if args.cmd == "show":
            _emit(args, _ctl(c, "show", slice=_slice(args.slice)), print_show, out)
        elif args.cmd == "tree":
            _emit(args, _ctl(c, "tree"), print_tree, out)
        elif args.cmd == "events":
            data = _ctl(c, "events")
            if args.slice is not None:
                want = _slice(args.slice)
                if want not in data["slices"]:
                    raise DaemonError(f"no such slice: {args.slice} (see vgpuctl tree)")
                data = {"slices": {want: data["slices"][want]}}
            _emit(args, data, lambda d, o: print_events(d, o, local=args.local), out)
        else:
            _emit(args, _ctl(c, "status"), print_status, out)
    return 0


def _warn_config(data: dict[str, Any]) -> None:
    if data.get("config_error"):
        print(f"vgpuctl: warning: a slice file is broken, vgpud runs on its last good "
              f"configuration: {data['config_error']}", file=sys.stderr)


def _root_names(argv: Sequence[str]) -> list[str]:
    """``-.slice`` (the root's unit name) as ``/``: argparse would take it
    for an option. Only before ``--``: what follows is run's command."""
    out = list(argv)
    end = out.index("--") if "--" in out else len(out)
    return [("/" if a == "-.slice" and i < end else a) for i, a in enumerate(out)]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(_root_names(sys.argv[1:] if argv is None else argv))
        return run(args, sys.stdout)
    except UsageError as exc:
        print(f"vgpuctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonError as exc:
        print(f"vgpuctl: {exc}", file=sys.stderr)
        return EXIT_DAEMON
    except BrokenPipeError:
        return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
