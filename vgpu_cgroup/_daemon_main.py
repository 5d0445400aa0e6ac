"""``vgpud``: parse arguments and configuration, find the GPUs, run the daemon.

Command-line options override the TOML file, which overrides the built-in
defaults.  Startup problems (bad config, no driver without --simulate, the
socket in use) end with one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
from collections.abc import Sequence

import trio

from vgpu_cgroup import __version__
from vgpu_cgroup._config import ConfigError, DaemonConfig, load_daemon_config
from vgpu_cgroup._daemon import Daemon
from vgpu_cgroup._knobs import KnobError
from vgpu_cgroup._log import configure, get_logger
from vgpu_cgroup._nvml import NvmlError, discover


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpud", description="vgpu node daemon: GPU time "
                                "shares and GPU memory caps per cgroup slice")
    p.add_argument("--config", metavar="FILE",
                   help="daemon configuration (default /etc/vgpu/vgpud.toml if present)")
    p.add_argument("--socket", metavar="PATH", help="Unix socket to listen on")
    p.add_argument("--simulate", action="store_true", default=None,
                   help="use the simulated GPU (no NVIDIA driver needed)")
    p.add_argument("--identity", choices=["cgroup", "declared"],
                   help="how clients are placed in slices (declared: development only)")
    p.add_argument("--etc-dir", metavar="DIR", help="persistent slice files directory")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="runtime state directory (runtime slice files, default socket)")
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument("--version", action="version", version=f"vgpud {__version__}")
    return p


def build_config(args: argparse.Namespace) -> DaemonConfig:
    """The effective configuration: file (or defaults) overridden by options."""
    cfg = load_daemon_config(args.config)
    defaults = DaemonConfig()
    if args.runtime_dir:
        cfg.runtime_dir = args.runtime_dir
        if cfg.run_slices_dir == defaults.run_slices_dir:
            cfg.run_slices_dir = os.path.join(args.runtime_dir, "slices")
        if cfg.socket == defaults.socket:
            cfg.socket = os.path.join(args.runtime_dir, "vgpud.sock")
    if args.socket:
        cfg.socket = args.socket
    if args.simulate:
        cfg.simulate = True
    if args.identity:
        cfg.identity = args.identity
    if args.etc_dir:
        cfg.etc_slices_dir = args.etc_dir
    if args.log_format:
        cfg.log_format = args.log_format
    return cfg


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        pass


async def _run(daemon: Daemon, listener: socket.socket) -> None:
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[str]) -> None:
            await daemon.serve(listener, handle_signals=True, task_status=task_status)
            nursery.cancel_scope.cancel()  # SIGTERM ended serve(): stop the watchdog too

        path = await nursery.start(serve)
        print(f"vgpud: listening on {path}", flush=True)
        sd_notify("READY=1")
        usec = os.environ.get("WATCHDOG_USEC")
        if usec and usec.isdigit() and int(usec) > 0:
            nursery.start_soon(_watchdog, int(usec) / 2e6)


async def _watchdog(period: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await trio.sleep(period)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return 1
    try:
        configure(cfg.log_format)
    except ValueError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return 1
    log = get_logger()
    try:
        devices = discover(simulate=cfg.simulate)
    except NvmlError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return 1
    daemon = Daemon(cfg, devices, simulated=cfg.simulate)
    try:
        daemon.load_slices()
    except ConfigError as exc:
        print(f"vgpud: {exc}", file=sys.stderr)
        return 1
    except (KnobError, ValueError) as exc:
        print(f"vgpud: slice configuration: {exc}", file=sys.stderr)
        return 1
    try:
        listener = daemon.bind()
    except OSError as exc:
        print(f"vgpud: cannot listen on {cfg.socket}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run, daemon, listener)
    log.info("vgpud stopped")
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
