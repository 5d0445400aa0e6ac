"""``vgpuctl run``: CMD under the hook, in a transient scope of its own.

The scope ``run-<id>.scope`` is made under ``--slice`` through
``systemd-run --scope`` where systemd is PID 1 (it only places the process;
systemd has no gpu.* properties), else by creating the cgroup itself. ``-p``
knobs go on the scope in the runtime layer before CMD starts and are removed
when it exits, also when vgpuctl is interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from vgpu_cgroup._paths import HOOK_LIB, SIM_DIR, find_cgroup2_mount

from ._common import DaemonError, UsageError, assignments, connect, ctl, slice_arg


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
    knobs = assignments(args.props)
    parent = slice_arg(args.slice) if args.slice else "vgpu.slice"
    scope_name = f"run-{secrets.token_hex(6)}.scope"
    scope = f"{parent}/{scope_name}".strip("/")
    use_systemd = _has_systemd()
    argv = systemd_run_argv(parent, scope_name, cmd) if use_systemd else None
    with connect(args.socket) as c:
        simulated = bool(ctl(c, "status").get("simulated"))
        if knobs:
            ctl(c, "set", slice=scope, runtime=True, knobs=knobs)
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
        with connect(socket_path) as c:
            ctl(c, "reset", slice=scope, runtime=True)
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
