"""``python -m vgpu_cgroup._ctl``: vgpuctl from a checkout.

vgpuctl lives in ``vgpu_cgroup._cli``; this module stays at its old path
because commands outside the package name it (the README, bench/,
tests/_e2e.py, the demo). The console script points at the new place
(pyproject.toml).
"""

from vgpu_cgroup._cli import main, main_entry

__all__ = ["main", "main_entry"]

if __name__ == "__main__":
    main_entry()
