"""vgpud, the node daemon: the shell around the pure core.

* ``_daemon``: the Daemon, which wires its services together, routes each
  request and runs the control tick; its services: ``_accept`` (the
  listening socket and connection bounds), ``_sessions`` (handshakes,
  registration), ``_memory`` (reservations, attach, NVML reconciliation),
  ``_compute`` (device ownership, GPU time), ``_control`` (status, show,
  tree, top, events, set, reset, reload), ``_recovery`` (memory of
  processes not connected, after a restart);
* its loops: ``_host`` (the epoll main loop, trio as its guest) and
  ``_lane`` (every connection after its handshake);
* the machine: ``_identity`` (peer credentials, cgroups), ``_nvml``,
  ``_systemd``, ``_files`` (the configuration layers on disk);
* ``_metrics`` (the Prometheus endpoint) and ``_main`` (``vgpud``'s command
  line).

Uses the core and the wire; never the CLI or the Kubernetes plugins.
Everything here runs on the daemon's one thread (``_daemon`` says how).
"""

from ._daemon import Daemon
from ._main import main, main_entry
from ._nvml import Device
from ._session import Session

__all__ = ["Daemon", "Device", "Session", "main", "main_entry"]
