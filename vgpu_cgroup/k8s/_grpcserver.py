"""gRPC servers on Unix sockets, the way the kubelet talks to its plugins.

grpcio's threaded server: these plugins are their own process (not inside
vgpud's trio loop), their calls are few and short, and each request holds a
lock while it writes files, so threads are the simple right tool.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import grpc

from ._limits import LimitError

#: The kubelet's requests are small; anything bigger is refused by gRPC itself.
MAX_MESSAGE = 4 << 20


def remove_stale_socket(path: str) -> None:
    """Remove a socket left by an earlier run (never a file of another kind)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)


def unix_server(path: str, register: Callable[[grpc.Server], None], *,
                workers: int = 4) -> grpc.Server:
    """A started server listening on ``path`` (mode 0600: only root, the
    kubelet, may talk to a plugin)."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    remove_stale_socket(path)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                  ("grpc.max_send_message_length", MAX_MESSAGE),
                                  ("grpc.so_reuseport", 0)])
    register(server)
    old = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix://{os.path.abspath(path)}") == 0:
            raise OSError(f"cannot listen on {path}")
        server.start()
    finally:
        os.umask(old)
    return server


def stop_server(server: grpc.Server, path: str, grace: float = 1.0) -> None:
    server.stop(grace).wait(grace + 5)
    with contextlib.suppress(OSError):
        remove_stale_socket(path)


def unix_channel(path: str) -> grpc.Channel:
    return grpc.insecure_channel(f"unix://{os.path.abspath(path)}",
                                 options=[("grpc.max_receive_message_length", MAX_MESSAGE)])


def abort(context: grpc.ServicerContext, e: LimitError) -> NoReturn:
    """End the call with the error's gRPC status (grpc raises out of abort)."""
    code = getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN)
    context.abort(code, e.msg)


def rpc_error_text(e: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call (a grpc.Call at run time)."""
    if isinstance(e, grpc.Call):
        return f"{e.code().name}: {e.details()}"
    return str(e)
