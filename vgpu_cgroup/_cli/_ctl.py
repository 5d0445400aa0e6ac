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
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn, TextIO

from ._common import (
    DEFAULT_SOCKET,
    EXIT_DAEMON,
    EXIT_USAGE,
    DaemonError,
    UsageError,
    assignments,
    connect,
    ctl,
    slice_arg,
    slice_name,
)
from ._output import print_events, print_show, print_status, print_top, print_tree
from ._run import cmd_run


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
            "or max; not on -.slice). gpu.cores.* but idle and gpu.memory.* may differ\n"
            "per GPU: DEV=VALUE entries (DEV an index or UUID) and one value for the\n"
            "other GPUs, e.g. gpu.memory.max=\"8G 1=2G\"\n\n"
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
    with connect(args.socket) as c:
        i = 0
        try:
            while True:
                data = ctl(c, "top")
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


def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.cmd is None:
        raise UsageError("a command is required (show, tree, top, events, set, reset, run, "
                         "status)")
    if args.cmd == "run":
        return cmd_run(args, out)
    if args.cmd == "top":
        return cmd_top(args, out)
    if args.cmd == "set":
        knobs = assignments(args.assignments)
        slc = slice_arg(args.slice)
        with connect(args.socket) as c:
            data = ctl(c, "set", slice=slc, runtime=args.runtime, knobs=knobs)
        _warn_config(data)
        _emit(args, data, lambda d, o: print_show(d["show"], o), out)
        return 0
    if args.cmd == "reset":
        slc = slice_arg(args.slice)
        with connect(args.socket) as c:
            data = ctl(c, "reset", slice=slc, runtime=args.runtime)
        _warn_config(data)
        _emit(args, data, lambda d, o: print(
            f"{slice_name(d['slice'])}: removed {', '.join(d['removed']) or 'nothing'}", file=o),
            out)
        return 0
    with connect(args.socket) as c:
        if args.cmd == "show":
            _emit(args, ctl(c, "show", slice=slice_arg(args.slice)), print_show, out)
        elif args.cmd == "tree":
            _emit(args, ctl(c, "tree"), print_tree, out)
        elif args.cmd == "events":
            data = ctl(c, "events")
            if args.slice is not None:
                want = slice_arg(args.slice)
                if want not in data["slices"]:
                    raise DaemonError(f"no such slice: {args.slice} (see vgpuctl tree)")
                data = {"slices": {want: data["slices"][want]}}
            _emit(args, data, lambda d, o: print_events(d, o, local=args.local), out)
        else:
            _emit(args, ctl(c, "status"), print_status, out)
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
