"""vgpuctl against an in-process vgpud: output, errors, exit codes, run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_DEVICES, FakeHook, RunningDaemon

from vgpu_cgroup._cli import _ctl
from vgpu_cgroup._paths import HOOK_LIB, find_cgroup2_mount


def ctl_json(capsys: pytest.CaptureFixture[str], rd: RunningDaemon, *argv: str) -> Any:
    rc = _ctl.main(["--socket", rd.socket, "--json", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_set_show_with_unit_name(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    data = ctl_json(capsys, vgpud, "set", "tenants-alice.slice", "gpu.cores.max=30",
                    "gpu.memory.max=4G")
    assert data["slice"] == "tenants.slice/tenants-alice.slice"
    shown = ctl_json(capsys, vgpud, "show", "tenants-alice.slice")
    assert shown["knobs"]["gpu.memory.max"]["value"] == str(4 << 30)
    # Persistent, like systemctl set-property: the control layer's file set it.
    src = shown["knobs"]["gpu.memory.max"]["source"]
    assert src == os.path.join(vgpud.etc_dir + ".control", "tenants-alice.slice.conf")
    assert os.path.exists(src)
    assert shown["knobs"]["gpu.cores.weight"]["source"] == "default"
    # Human output reads like cgroup files.
    assert _ctl.main(["--socket", vgpud.socket, "show", "tenants.slice/tenants-alice.slice"]) == 0
    text = capsys.readouterr().out
    assert "gpu.cores.weight 100 (default)" in text
    assert "gpu.memory.max " in text


def test_set_runtime_persists(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    data = ctl_json(capsys, vgpud, "set", "--runtime", "rt.slice", "gpu.cores.max=50")
    assert data["source"].startswith(os.path.join(vgpud.runtime_dir, "slices"))
    assert os.path.exists(data["source"])


def test_tree_and_top(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    hook = FakeHook(vgpud, slice="a.slice/job1")
    try:
        tree = ctl_json(capsys, vgpud, "tree")
        a = next(c for c in tree["children"] if c["name"] == "a.slice")
        assert a["children"][0]["processes"][0]["comm"] == "vgpuctl"
        assert _ctl.main(["--socket", vgpud.socket, "tree"]) == 0
        text = capsys.readouterr().out
        assert "a.slice" in text
        assert "└─job1" in text
        top = ctl_json(capsys, vgpud, "top")
        assert top["slices"]["a.slice/job1"]["processes"] == 1
        assert _ctl.main(["--socket", vgpud.socket, "top"]) == 0  # not a tty: one iteration
        assert "a.slice/job1" in capsys.readouterr().out
    finally:
        hook.close()


def test_top_and_show_have_a_row_per_device(vgpud: RunningDaemon,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """On a node of two GPUs, ``top`` follows each slice's row with one per
    device it used, and ``show`` has ``gpu.cores.stat`` per device."""
    hook = FakeHook(vgpud, slice="m.slice")
    try:
        slot0 = hook.attach(FAKE_DEVICES[0].uuid)["slot"]
        slot1 = hook.attach(FAKE_DEVICES[1].uuid)["slot"]
        assert hook.reserve(slot0, 3 << 20)["t"] == "granted"
        assert hook.reserve(slot1, 5 << 20)["t"] == "granted"
        cid = hook.client.welcome["id"]
        vgpud.call(lambda: vgpud.daemon.tree.add_core_usage(cid, FAKE_DEVICES[1].uuid,
                                                            7_000, 2_000, 1))
        top = ctl_json(capsys, vgpud, "top")
        assert top["devices"] == {d.uuid: d.index for d in FAKE_DEVICES}
        assert top["slices"]["m.slice"]["memory_devices"] == {FAKE_DEVICES[0].uuid: 3 << 20,
                                                              FAKE_DEVICES[1].uuid: 5 << 20}
        assert _ctl.main(["--socket", vgpud.socket, "top"]) == 0
        lines = capsys.readouterr().out.splitlines()
        at = next(i for i, ln in enumerate(lines) if ln.startswith("m.slice"))
        assert lines[at + 1].split() == ["gpu", "0", "0.0", "3M"]
        assert lines[at + 2].split() == ["gpu", "1", "0.0", "5M"]
        shown = ctl_json(capsys, vgpud, "show", "m.slice")
        assert shown["gpu.cores.stat.devices"] == {
            FAKE_DEVICES[1].uuid: {"usage_usec": 7, "throttled_usec": 2, "nr_throttled": 1}}
        assert _ctl.main(["--socket", vgpud.socket, "show", "m.slice"]) == 0
        text = capsys.readouterr().out
        assert (f"gpu.cores.stat {FAKE_DEVICES[1].uuid} usage_usec 7 throttled_usec 2 "
                "nr_throttled 1") in text
    finally:
        hook.close()


def test_errors_and_exit_codes(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str],
                               tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.sock")
    assert _ctl.main(["--socket", missing, "tree"]) == 2
    err = capsys.readouterr().err
    assert f"cannot connect to vgpud at {missing}: No such file or directory" in err
    assert "(is vgpud running?)" in err
    assert _ctl.main(["--socket", vgpud.socket, "set", "a.slice", "gpu.cores.max"]) == 1
    assert "KNOB=VALUE" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "frobnicate"]) == 1
    assert _ctl.main(["--socket", vgpud.socket, "set", "a.slice", "gpu.cores.max=lots"]) == 2
    assert "gpu.cores.max" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "show", "absent.slice"]) == 2
    assert "absent.slice" in capsys.readouterr().err
    assert _ctl.main([]) == 1


def test_run_in_transient_cgroup(vgpud: RunningDaemon, capfd: pytest.CaptureFixture[str],
                                 tmp_path: Path) -> None:
    try:
        mount = find_cgroup2_mount()
    except LookupError:
        pytest.skip("no cgroup v2")
    if not os.access(mount, os.W_OK):
        pytest.skip("cgroup v2 not writable")
    out_file = tmp_path / "out.txt"
    script = (f"cat /proc/self/cgroup > {out_file}; "
              f"echo \"$LD_PRELOAD|$VGPU_SOCKET|$LD_LIBRARY_PATH\" >> {out_file}; exit 3")
    env_before = os.environ.get("LD_PRELOAD")
    rc = _ctl.main(["--socket", vgpud.socket, "run", "-p", "gpu.cores.max=20", "--",
                    "sh", "-c", script])
    assert rc == 3
    lines = out_file.read_text().splitlines()
    cg = next(ln[3:] for ln in lines if ln.startswith("0::"))
    assert cg.startswith("/vgpu.slice/run-")
    assert cg.endswith(".scope")
    preload, sock, libpath = lines[-1].split("|")
    assert preload.split(":")[0] == HOOK_LIB
    assert sock == vgpud.socket
    assert libpath.split(":")[0].endswith("_lib/sim")  # the fixture daemon is simulated
    assert os.environ.get("LD_PRELOAD") == env_before
    # The transient cgroup is gone, and so are its knobs (slice and file).
    assert not os.path.exists(os.path.join(mount, cg.lstrip("/")))
    assert os.listdir(os.path.join(vgpud.runtime_dir, "slices")) == []
    with vgpud.client() as c:
        assert cg.lstrip("/") not in vgpud.call(vgpud.daemon.tree.slices)
        assert "run-" not in json.dumps(c.ctl("tree"))


def test_run_bad_command(vgpud: RunningDaemon, capfd: pytest.CaptureFixture[str]) -> None:
    try:
        mount = find_cgroup2_mount()
    except LookupError:
        pytest.skip("no cgroup v2")
    if not os.access(mount, os.W_OK):
        pytest.skip("cgroup v2 not writable")
    assert _ctl.main(["--socket", vgpud.socket, "run", "--", "/nonexistent/cmd"]) == 127
    assert "cannot run" in capfd.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "run"]) == 1


def test_events_hierarchical_local_and_a_read_only_root(
        vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    ctl_json(capsys, vgpud, "set", "ev.slice", "gpu.memory.max=1M")
    hook = FakeHook(vgpud, slice="ev.slice/job1")
    try:
        slot = hook.attach()["slot"]
        assert hook.reserve(slot, 2 << 20)["t"] == "denied"
        data = ctl_json(capsys, vgpud, "events")["slices"]
        assert data["ev.slice"]["gpu.memory.events"] == {"high": 0, "max": 1, "oom": 1}
        assert data["ev.slice"]["gpu.memory.events.local"] == {"high": 0, "max": 1, "oom": 0}
        assert data[""]["gpu.memory.events"] == {"high": 0, "max": 1, "oom": 1}
        assert data[""]["gpu.memory.events.local"] == {"high": 0, "max": 0, "oom": 0}

        def row(argv: list[str], slc: str) -> list[str]:
            assert _ctl.main(["--socket", vgpud.socket, "events", *argv]) == 0
            lines = capsys.readouterr().out.splitlines()
            return next(ln.split() for ln in lines if ln.split()[0] == slc)

        assert row([], "-.slice")[1:4] == ["0", "1", "1"]  # HIGH MAX OOM
        assert row(["--local"], "-.slice")[1:4] == ["0", "0", "0"]
        assert row(["--local"], "ev.slice/job1")[1:4] == ["0", "0", "1"]
        assert _ctl.main(["--socket", vgpud.socket, "show", "ev.slice"]) == 0
        text = capsys.readouterr().out
        assert "gpu.memory.events high 0 max 1 oom 1" in text
        assert "gpu.memory.events.local high 0 max 1 oom 0" in text
    finally:
        hook.close()
    assert _ctl.main(["--socket", vgpud.socket, "set", "-.slice", "gpu.cores.max=50"]) == 2
    assert "root slice (-.slice) takes no knobs" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "show", "-.slice"]) == 0  # not an option
    assert capsys.readouterr().out.startswith("# -.slice\n")
