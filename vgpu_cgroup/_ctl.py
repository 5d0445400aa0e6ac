"""``vgpuctl``: inspect and change the slice tree, run programs under the hook.

Shaped like systemctl/systemd-cgls/systemd-cgtop/systemd-run: slices are
named by cgroup path or by systemd slice unit name, output reads like cgroup
files, ``--json`` gives machine output.  Exit status: 0 ok, 1 usage error,
2 daemon error (unreachable, refused, invalid), else the command's own for
``run``.
"""

from __future__ import annotations

import argparse
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


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vgpuctl", description="Control vgpud: GPU shares and memory caps "
                "per cgroup slice.")
    p.add_argument("--socket", metavar="PATH",
                   default=os.environ.get("VGPU_SOCKET", DEFAULT_SOCKET),
                   help=f"vgpud socket (default $VGPU_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    s = sub.add_parser("show", help="knobs, effective values, usage of a slice")
    s.add_argument("slice", nargs="?", default="", metavar="SLICE")
    sub.add_parser("tree", help="slices and their processes")
    sub.add_parser("top", help="GPU time and memory per slice")
    sub.add_parser("status", help="daemon status and devices")
    s = sub.add_parser("set", help="change knobs of a slice, live")
    s.add_argument("--runtime", action="store_true",
                   help="keep the change under the runtime directory until reboot")
    s.add_argument("slice", metavar="SLICE")
    s.add_argument("assignments", nargs="+", metavar="KNOB=VALUE")
    s = sub.add_parser("run", help="run a command under the hook in a transient slice")
    s.add_argument("--slice", metavar="SLICE", help="create the scope under this slice")
    s.add_argument("-p", "--property", action="append", default=[], metavar="KNOB=VALUE",
                   dest="props")
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
    ev = d["gpu.memory.events"]
    print("gpu.memory.events " + " ".join(f"{k} {v}" for k, v in ev.items()), file=out)
    st = d["gpu.cores.stat"]
    print("gpu.cores.stat " + " ".join(f"{k} {v}" for k, v in st.items()), file=out)
    for p in d["processes"]:
        print(f"process {p['pid']} {p['comm']}", file=out)


def print_tree(node: dict[str, Any], out: TextIO, prefix: str = "", last: bool = True,
               top: bool = True) -> None:
    label = _name(node["slice"]) if top else node["name"]
    knobs = " ".join(f"{k}={v}" for k, v in node.get("knobs", {}).items())
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
            print(f"{child_prefix}{'└─' if is_last else '├─'}{item['pid']} {item['comm']}",
                  file=out)
        else:
            print_tree(item, out, child_prefix, is_last, top=False)


def print_top(d: dict[str, Any], out: TextIO) -> None:
    print(f"{'SLICE':<48} {'PROCS':>5} {'GPU%':>7} {'MEMORY':>10}", file=out)
    for path, s in sorted(d["slices"].items()):
        gpu = sum(s["gpu_percent"].values())
        print(f"{_name(path):<48} {s['processes']:>5} {gpu:>7.1f} "
              f"{_bytes(s['memory_current']):>10}", file=out)


# ---- commands ---------------------------------------------------------------


def _emit(args: argparse.Namespace, data: dict[str, Any], human: Any, out: TextIO) -> None:
    if args.json:
        json.dump(data, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        human(data, out)


def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    with _connect(args.socket) as c:
        if args.json or not out.isatty():
            _emit(args, _ctl(c, "top"), print_top, out)
            return 0
        try:
            while True:
                data = _ctl(c, "top")
                out.write("\x1b[H\x1b[2J")
                print_top(data, out)
                out.flush()
                time.sleep(1)
        except KeyboardInterrupt:
            return 0


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
    with _connect(args.socket) as c:
        simulated = bool(_ctl(c, "status").get("simulated"))
        if knobs:
            _ctl(c, "set", slice=scope, runtime=True, knobs=knobs)
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (HOOK_LIB, env.get("LD_PRELOAD")) if x)
    env["VGPU_SOCKET"] = args.socket
    if simulated:
        env["LD_LIBRARY_PATH"] = ":".join(x for x in (SIM_DIR, env.get("LD_LIBRARY_PATH")) if x)
    if os.path.isdir("/run/systemd/system") and shutil.which("systemd-run"):
        unit = parent.rsplit("/", 1)[-1] if parent else "-.slice"
        argv = ["systemd-run", "--scope", "--quiet", f"--unit={scope_name}",
                f"--slice={unit}", "--", *cmd]
        return _wait(subprocess.Popen(argv, env=env))
    try:
        mount = find_cgroup2_mount()
    except (OSError, LookupError) as exc:
        raise DaemonError(f"cannot find the cgroup v2 hierarchy: {exc}") from None
    cg = os.path.join(mount, scope)
    try:
        os.makedirs(cg, exist_ok=False)
    except OSError as exc:
        raise DaemonError(f"cannot create cgroup {cg}: {exc.strerror or exc}") from None
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
    """Wait for CMD; the terminal's signals reach it directly, so ignore ours."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    return 128 - rc if rc < 0 else rc


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.cmd is None:
        raise UsageError("a command is required (show, tree, top, set, run, status)")
    if args.cmd == "run":
        return cmd_run(args, out)
    if args.cmd == "top":
        return cmd_top(args, out)
    if args.cmd == "set":
        knobs = _assignments(args.assignments)
        slc = _slice(args.slice)
        with _connect(args.socket) as c:
            data = _ctl(c, "set", slice=slc, runtime=args.runtime, knobs=knobs)
        _emit(args, data, lambda d, o: print_show(d["show"], o), out)
        return 0
    with _connect(args.socket) as c:
        if args.cmd == "show":
            _emit(args, _ctl(c, "show", slice=_slice(args.slice)), print_show, out)
        elif args.cmd == "tree":
            _emit(args, _ctl(c, "tree"), print_tree, out)
        else:
            _emit(args, _ctl(c, "status"),
                  lambda d, o: print(json.dumps(d, indent=2), file=o), out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
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
