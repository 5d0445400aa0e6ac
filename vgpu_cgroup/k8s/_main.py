"""``vgpu-k8s``: vgpu's Kubernetes plugins, one per subcommand.

    vgpu-k8s dra            the DRA kubelet plugin, and the node's ResourceSlice
    vgpu-k8s device-plugin  the device plugin (vgpu.io/cores, vgpu.io/memory)

Both run beside vgpud on a GPU node (contrib/kubernetes/ has the DaemonSet):
they take the GPUs vgpud manages, install the hook library and hook.conf in
their state directory for containers to mount, and write pods' slice files
into vgpud's runtime layer. Exit status: 0 after SIGTERM/SIGINT, 1 usage
error, 2 a failure to start.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

import vgpu_cgroup
from vgpu_cgroup._log import configure, get_logger

from ._api import ApiError, ClusterApi, KubeApi
from ._deviceplugin import DevicePlugin, DevicePluginOptions
from ._dra import DraDriver, DraOptions, DraPlugin
from ._files import HookFiles
from ._limits import DRIVER
from ._resourceslice import publish
from ._vgpud import Gpu, SliceFiles, Vgpud, VgpudError

HOOK_LIB = os.path.join(os.path.dirname(os.path.abspath(vgpu_cgroup.__file__)), "_lib",
                        "libvgpu-hook.so")
EXIT_USAGE = 1
EXIT_START = 2
EPILOG = """\
Both run beside vgpud on a GPU node (contrib/kubernetes/daemonset.yaml): they
take the GPUs vgpud manages, install the hook library and hook.conf under
--state-dir for containers to mount, and write pods' slice files into vgpud's
runtime layer (--slices-dir).

examples:
  vgpu-k8s dra --gpu-cdi-device 'nvidia.com/gpu={index}'
  vgpu-k8s device-plugin --soft

exit status: 0 after SIGTERM/SIGINT, 1 usage error, 2 a failure to start.
"""


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vgpu-k8s", description="vgpu's Kubernetes plugins: claims and "
                "extended resources become the knobs of pods' slices.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--log-format", choices=("auto", "json", "console"), default="auto")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                        help="this node's name (default $NODE_NAME, from the downward API)")
        sp.add_argument("--vgpud-socket", default="/run/vgpu/vgpud.sock")
        sp.add_argument("--slices-dir", default="/run/vgpu/slices",
                        help="vgpud's runtime slice layer, where pods' slice files go")
        sp.add_argument("--state-dir", default="/var/lib/vgpu",
                        help="host directory for the hook library and hook.conf that "
                             "containers mount")
        sp.add_argument("--socket-dir", default="",
                        help="host directory holding vgpud's socket, mounted into containers "
                             "(default: the socket's directory; give vgpud a directory of "
                             "its own, so that containers see nothing else)")
        sp.add_argument("--container-socket-dir", default="/run/vgpu",
                        help="where containers see --socket-dir")
        sp.add_argument("--hook-lib", default=HOOK_LIB, help="the hook library to install")
        sp.add_argument("--on-no-daemon", choices=("fail", "unlimited"), default="fail",
                        help="hook.conf's on_no_daemon for containers")
        sp.add_argument("--cgroup-driver", choices=("systemd", "cgroupfs"), default="systemd",
                        help="the kubelet's cgroup driver")
        sp.add_argument("--cgroup-root", default="",
                        help="the kubelet's --cgroup-root, relative to the cgroup2 mount")
        sp.add_argument("--gpu-cdi-device", default="",
                        help="CDI id of the GPU itself, added to each container, e.g. "
                             "'nvidia.com/gpu={index}' (NVIDIA container toolkit's spec) or "
                             "'nvidia.com/gpu={uuid}'; empty: none")
        sp.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: the pod's service account)")

    d = sub.add_parser("dra", help="the DRA kubelet plugin and the node's ResourceSlice")
    common(d)
    d.add_argument("--driver-name", default=DRIVER)
    d.add_argument("--plugin-dir", default="/var/lib/kubelet/plugins",
                   help="the plugin socket goes in <dir>/<driver>/dra.sock")
    d.add_argument("--registry-dir", default="/var/lib/kubelet/plugins_registry")
    d.add_argument("--kubelet-plugin-dir", default="",
                   help="--plugin-dir as the kubelet sees it, if different")
    d.add_argument("--cdi-dir", default="/var/run/cdi")
    d.add_argument("--no-resource-slice", action="store_true",
                   help="do not publish the node's ResourceSlice")
    d.add_argument("--resync", type=float, default=300.0, metavar="SECONDS",
                   help="check the ResourceSlice this often (default 300)")
    dp = sub.add_parser("device-plugin", help="the device plugin: vgpu.io/cores (100 per "
                        "GPU) and vgpu.io/memory (256 MiB units)")
    common(dp)
    dp.add_argument("--device-plugin-dir", default="/var/lib/kubelet/device-plugins")
    dp.add_argument("--pod-resources-socket",
                    default="/var/lib/kubelet/pod-resources/kubelet.sock")
    dp.add_argument("--soft", action="store_true",
                    help="vCUDA's soft mode: pods are guaranteed their cores and may use "
                         "up to a whole GPU when it is free")
    dp.add_argument("--gc-interval", type=float, default=30.0, metavar="SECONDS")
    return p


def _check_template(template: str) -> None:
    try:
        template.format(index=0, uuid="GPU-0")
    except (KeyError, IndexError, ValueError) as e:
        raise UsageError(f"--gpu-cdi-device {template!r}: only {{index}} and {{uuid}} may "
                         f"be used ({e})") from None


def _hook(args: argparse.Namespace) -> HookFiles:
    _check_template(args.gpu_cdi_device)
    return HookFiles(state_dir=args.state_dir,
                     socket_dir=args.socket_dir or os.path.dirname(args.vgpud_socket),
                     container_socket_dir=args.container_socket_dir,
                     socket_name=os.path.basename(args.vgpud_socket),
                     on_no_daemon=args.on_no_daemon)


def wait_for_gpus(vgpud: Vgpud, stop: threading.Event) -> list[Gpu] | None:
    """vgpud's GPUs, waiting for vgpud to answer (it starts beside us)."""
    warned = False
    while True:
        try:
            gpus = vgpud.gpus()
            if gpus:
                return gpus
            err = "vgpud reports no GPU"
        except VgpudError as e:
            err = str(e)
        if not warned:
            get_logger().warning("waiting for vgpud", error=err)
            warned = True
        if stop.wait(2.0):
            return None


def _publisher(api: ClusterApi, node: str, driver: str, gpus: list[Gpu], every: float,
               stop: threading.Event) -> None:
    log = get_logger(component="vgpu-k8s-dra", node=node)
    delay = every
    while True:
        try:
            what = publish(api, node, driver, gpus)
            log.info("resource slice " + what, devices=len(gpus))
            delay = every
        except ApiError as e:
            log.error("cannot publish the ResourceSlice, retrying", error=e.msg)
            delay = 10.0
        if stop.wait(delay):
            return


def run_dra(args: argparse.Namespace, stop: threading.Event,
            api: ClusterApi | None = None) -> int:
    if not args.node_name:
        raise UsageError("--node-name (or $NODE_NAME) is required")
    hook = _hook(args)
    hook.install(args.hook_lib)
    vgpud = Vgpud(args.vgpud_socket)
    gpus = wait_for_gpus(vgpud, stop)
    if gpus is None:
        return 0
    if api is None:
        api = KubeApi.from_environment(args.kubeconfig)
    plugin_dir = os.path.join(args.plugin_dir, args.driver_name)
    kubelet_dir = os.path.join(args.kubelet_plugin_dir or args.plugin_dir, args.driver_name)
    opts = DraOptions(
        node=args.node_name, driver=args.driver_name,
        plugin_socket=os.path.join(plugin_dir, "dra.sock"),
        registrar_socket=os.path.join(args.registry_dir, f"{args.driver_name}-reg.sock"),
        kubelet_plugin_socket=os.path.join(kubelet_dir, "dra.sock"),
        cdi_dir=args.cdi_dir, slices_dir=args.slices_dir, cgroup_driver=args.cgroup_driver,
        cgroup_root=args.cgroup_root, gpu_cdi_device=args.gpu_cdi_device, hook=hook)
    driver = DraDriver(opts, api, SliceFiles(args.slices_dir, vgpud), gpus)
    pub = None
    if not args.no_resource_slice:
        pub = threading.Thread(target=_publisher, name="resourceslice", daemon=True,
                               args=(api, opts.node, opts.driver, gpus, args.resync, stop))
        pub.start()
    plugin = DraPlugin(driver)
    plugin.start()
    try:
        stop.wait()
    finally:
        plugin.stop()
        if pub is not None:
            pub.join(5)
    return 0


def run_device_plugin(args: argparse.Namespace, stop: threading.Event,
                      api: ClusterApi | None = None) -> int:
    if not args.node_name:
        raise UsageError("--node-name (or $NODE_NAME) is required")
    hook = _hook(args)
    hook.install(args.hook_lib)
    vgpud = Vgpud(args.vgpud_socket)
    gpus = wait_for_gpus(vgpud, stop)
    if gpus is None:
        return 0
    if api is None:
        api = KubeApi.from_environment(args.kubeconfig)
    opts = DevicePluginOptions(
        node=args.node_name, plugin_dir=args.device_plugin_dir,
        pod_resources_socket=args.pod_resources_socket, slices_dir=args.slices_dir,
        cgroup_driver=args.cgroup_driver, cgroup_root=args.cgroup_root,
        gpu_cdi_device=args.gpu_cdi_device, soft=args.soft, gc_interval=args.gc_interval,
        hook=hook)
    plugin = DevicePlugin(opts, api, SliceFiles(args.slices_dir, vgpud), gpus)
    plugin.start()
    try:
        plugin.run(stop)
    finally:
        plugin.stop()
    return 0


def main(argv: Sequence[str] | None = None, *, stop: threading.Event | None = None,
         api: ClusterApi | None = None) -> int:
    """Run a plugin until SIGTERM/SIGINT (or ``stop``, for tests, with an
    ``api`` of their own)."""
    try:
        args = _parser().parse_args(argv)
        if args.cmd is None:
            raise UsageError("a command is required (dra, device-plugin)")
    except UsageError as e:
        print(f"vgpu-k8s: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure(args.log_format)
    if stop is None:
        stop = threading.Event()

        def on_signal(sig: int, _frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    try:
        if args.cmd == "dra":
            return run_dra(args, stop, api)
        return run_device_plugin(args, stop, api)
    except UsageError as e:
        print(f"vgpu-k8s: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ApiError) as e:
        print(f"vgpu-k8s: cannot start: {e}", file=sys.stderr)
        return EXIT_START


def main_entry() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    main_entry()
