"""``vgpud``: parse arguments and configuration, find the GPUs, run the daemon.

Command-line options override the TOML file, which overrides the built-in
defaults.  Startup problems (bad config, no driver without --simulate, the
socket in use) end with one clear line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import sys
from collections.abc import Sequence

import trio

from vgpu_cgroup import __version__
from vgpu_cgroup._core import ConfigError, DaemonConfig, KnobError
from vgpu_cgroup._log import configure, get_logger

from . import _systemd
from ._daemon import Daemon
from ._files import load_daemon_config
from ._host import run_hosted
from ._metrics import MetricsError, parse_listen, registry_for, serve_metrics
from ._nvml import NvmlError, discover

EPILOG = """\
examples:
  vgpud --simulate --runtime-dir /tmp/vgpu     try it without an NVIDIA driver
  vgpud --metrics-listen 127.0.0.1:9400        also serve Prometheus /metrics
  systemctl enable --now vgpud.socket vgpud    production (contrib/systemd)

slice files: /etc/vgpu/slices/*.conf (admin), /etc/vgpu/slices.control/
(vgpuctl set), /run/vgpu/slices/ (vgpuctl set --runtime); later wins.
SIGHUP re-reads them; a bad file is logged with its path and line and the
running configuration is kept.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vgpud", description="vgpu node daemon: GPU time "
                                "shares and GPU memory caps per cgroup slice",
                                epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   help="auto: console on a terminal, JSON lines otherwise")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve Prometheus metrics (off by default; loopback only)")
    p.add_argument("--metrics-listen-any", action="store_true", default=None,
                   help="allow a non-loopback --metrics-listen address")
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
        if cfg.control_slices_dir == cfg.etc_slices_dir.rstrip("/") + ".control":
            cfg.control_slices_dir = args.etc_dir.rstrip("/") + ".control"
        cfg.etc_slices_dir = args.etc_dir
    if args.metrics_listen:
        cfg.metrics_listen = args.metrics_listen
    if args.metrics_listen_any:
        cfg.metrics_listen_any = True
    if args.log_format:
        cfg.log_format = args.log_format
    return cfg


#: File descriptors vgpud needs besides one per connection: the listener,
#: epoll and wake-up fds, NVML's device files, metrics, a handshake's memfds.
FD_SLACK = 256


def raise_nofile(clients: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one, as a program that needs
    many fds is expected to (systemd's default soft limit is 1024, which
    would make accept fail with EMFILE for everyone long before
    ``limits.clients`` refuses anyone). Returns (the limit now, what the
    bounds need); the caller warns when the first is smaller."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return soft, clients + FD_SLACK


def _notify(state: str) -> None:
    """sd_notify, never fatal: a vanished notify socket must not stop us."""
    with contextlib.suppress(OSError):
        _systemd.notify(state)


async def _run(daemon: Daemon, listener: socket.socket,
               metrics: tuple[str, int] | None) -> None:
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[str]) -> None:
            await daemon.serve(listener, handle_signals=True, hosted=True,
                               task_status=task_status)
            nursery.cancel_scope.cancel()  # SIGTERM ended serve(): stop the metrics too

        path = await nursery.start(serve)
        where = f"listening on {path}" + (" (socket-activated)" if daemon.socket_activated else "")
        if metrics is not None:
            host, port = await nursery.start(serve_metrics, daemon, *metrics)
            where += f", metrics on http://{host}:{port}/metrics"
        print(f"vgpud: {where}", flush=True)
        # READY only now: the listener (inherited or bound) and metrics are up.
        _notify(f"READY=1\nSTATUS={where}, {len(daemon.devices)} GPU(s)"
                + (" simulated" if daemon.simulated else ""))
    _notify("STOPPING=1")


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
    metrics: tuple[str, int] | None = None
    if cfg.metrics_listen:
        try:
            metrics = parse_listen(cfg.metrics_listen, allow_any=cfg.metrics_listen_any)
            registry_for(lambda: {})  # fail now if prometheus-client is missing
        except MetricsError as exc:
            print(f"vgpud: {exc}", file=sys.stderr)
            return 1
    nofile, need = raise_nofile(cfg.limits.clients)
    if nofile < need:
        log.warning("RLIMIT_NOFILE is below what limits.clients needs: connections will "
                    "fail with EMFILE before the bound refuses them (raise LimitNOFILE=)",
                    nofile=nofile, needed=need, limits_clients=cfg.limits.clients)
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
    failed: list[str] = []
    with contextlib.suppress(KeyboardInterrupt):
        try:
            run_hosted(daemon, _run, daemon, listener, metrics)
        except* OSError as group:  # e.g. the metrics port is taken
            failed += [str(e) for e in group.exceptions]
    if failed:
        print(f"vgpud: {failed[0]}", file=sys.stderr)
        return 1
    log.info("vgpud stopped")
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
