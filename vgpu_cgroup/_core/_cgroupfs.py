"""The kernel's cgroup files, read as texts: where the cgroup v2 hierarchy
is mounted (``/proc/self/mountinfo``) and which cgroup a process is in
(``/proc/<pid>/cgroup``). Pure functions over file texts, so they are tested
on sample data; the daemon (``_node._identity``) and ``vgpuctl run``
(``_paths``) read the files.
"""

from __future__ import annotations


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, etc.)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mount(mountinfo_text: str) -> str:
    """Mount point of the cgroup v2 hierarchy from ``/proc/self/mountinfo`` text.

    The fstype follows the ``-`` separator (the optional fields before it vary
    in number).  LookupError if there is no cgroup2 mount.
    """
    for line in mountinfo_text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 5 or sep + 1 >= len(fields):
            continue
        if fields[sep + 1] == "cgroup2":
            return _unescape(fields[4])
    raise LookupError("no cgroup2 filesystem in mountinfo (is cgroup v2 mounted?)")


def parse_proc_cgroup(text: str) -> str:
    """The v2 path (``0::`` line) of a ``/proc/<pid>/cgroup`` text, without the
    leading ``/`` ("" for the root).  LookupError if the line is missing."""
    for line in text.splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            path = path.removesuffix(" (deleted)")
            return path.strip("/")
    raise LookupError("no cgroup v2 ('0::') line in /proc/<pid>/cgroup")
