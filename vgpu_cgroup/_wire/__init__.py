"""The wire: what crosses between vgpud, the hooks and the control clients.

* ``proto`` (``_protocol``, with the messages in ``_messages``): the
  sans-IO protocol over the Unix socket (docs/protocol.md): framing,
  validation, the events and replies;
* ``_shm``: the two shared pages of each hooked process, laid out by
  libhook/include/vgpu_abi.h and read through cffi (``_abi``, built by
  ``_abi_build``);
* ``_client``: a blocking control client (``vgpuctl``, the Kubernetes
  plugins, tests).

May use the core (it needs none of it today), never the daemon's shell
or the CLI; modules here import each other directly, everything else
imports from this package (tests/test_layers.py).
"""

from . import _protocol as proto
from ._client import Client, ClientError
from ._shm import (
    CTL_SIZE,
    DEV_ACTIVE,
    DEV_CONTENDED,
    DEV_UNLIMITED,
    GRANT_GEN_SHIFT,
    GRANT_STATE_MASK,
    MAX_DEVICES,
    RING_SLOTS,
    STAT_SIZE,
    UNLIMITED,
    ClientShm,
    StatCounters,
)

__all__ = [
    "CTL_SIZE",
    "DEV_ACTIVE",
    "DEV_CONTENDED",
    "DEV_UNLIMITED",
    "GRANT_GEN_SHIFT",
    "GRANT_STATE_MASK",
    "MAX_DEVICES",
    "RING_SLOTS",
    "STAT_SIZE",
    "UNLIMITED",
    "Client",
    "ClientError",
    "ClientShm",
    "StatCounters",
    "proto",
]
