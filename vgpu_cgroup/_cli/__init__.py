"""vgpuctl, the command line: ``_ctl``, its parser and commands; ``_output``,
what it prints; ``_run``, ``vgpuctl run``; ``_common``, errors and the round
trip to vgpud.

Uses the core, the wire (its control client) and the top-level helpers
(``_paths``); never the daemon's shell, which it reaches only through the
socket. Nothing but the command-line shims imports it.
"""

from ._ctl import main, main_entry

__all__ = ["main", "main_entry"]
