"""Operations: systemd notify/watchdog/socket activation against sockets the
test owns, configuration layers and reload, the whole vgpuctl with --json,
and `vgpuctl run` cleaning up after itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeHook, RunningDaemon, requires_sim, wait_for

from vgpu_cgroup._cli import _ctl, _run
from vgpu_cgroup._cli._common import UsageError
from vgpu_cgroup._paths import HOOK_LIB, find_cgroup2_mount
from vgpu_cgroup._wire._client import Client

ROOT = Path(__file__).resolve().parent.parent
VGPUD = [sys.executable, "-m", "vgpu_cgroup._daemon_main"]


def _env(**more: str) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(ROOT)
    env["VGPU_SIM_SHM"] = f"vgpu-ops-{os.getpid()}"
    env.update(more)
    return env


def _args(tmp: Path) -> list[str]:
    (tmp / "etc").mkdir(exist_ok=True)
    return ["--simulate", "--runtime-dir", str(tmp / "run"), "--etc-dir", str(tmp / "etc"),
            "--log-format", "json"]


@contextlib.contextmanager
def _vgpud(tmp: Path, *extra: str, **env: str) -> Iterator[subprocess.Popen[str]]:
    log = open(tmp / "vgpud.log", "a")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([*VGPUD, *_args(tmp), *extra], env=_env(**env),
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("vgpud: listening on"), (tmp / "vgpud.log").read_text()
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _ctl_json(sock: str, *argv: str) -> Any:
    p = subprocess.run([sys.executable, "-m", "vgpu_cgroup._ctl", "--socket", sock, "--json",
                        *argv], env=_env(), capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _recv_all(s: socket.socket, until: float) -> list[str]:
    msgs: list[str] = []
    while time.monotonic() < until:
        s.settimeout(max(0.01, until - time.monotonic()))
        try:
            msgs.append(s.recv(4096).decode())
        except TimeoutError:
            break
    return msgs


# ---------------------------------------------------------------- systemd


@requires_sim
def test_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    with notify, _vgpud(tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify"),
                        WATCHDOG_USEC="200000") as proc:
        notify.settimeout(10)
        first = notify.recv(4096).decode()
        lines = first.split("\n")
        assert lines[0] == "READY=1"
        assert lines[1].startswith("STATUS=listening on ")
        assert "simulated" in lines[1]
        # Every 100 ms (half of WatchdogSec), from the daemon's own loop.
        msgs = _recv_all(notify, time.monotonic() + 1.0)
        assert msgs.count("WATCHDOG=1") >= 5, msgs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        rest = _recv_all(notify, time.monotonic() + 0.5)
        assert rest[-1] == "STOPPING=1", rest


@requires_sim
def test_watchdog_stops_when_the_loop_is_wedged(tmp_path: Path) -> None:
    """SIGSTOP wedges everything: no pings arrive, so systemd would act."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    with notify, _vgpud(tmp_path, NOTIFY_SOCKET=str(tmp_path / "notify"),
                        WATCHDOG_USEC="100000") as proc:
        notify.settimeout(10)
        assert notify.recv(4096).startswith(b"READY=1")
        proc.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        _recv_all(notify, time.monotonic() + 0.05)  # drain what was in flight
        assert _recv_all(notify, time.monotonic() + 0.5) == []
        proc.send_signal(signal.SIGCONT)
        assert "WATCHDOG=1" in _recv_all(notify, time.monotonic() + 0.5)


def _activated(tmp: Path, listener: socket.socket) -> subprocess.Popen[str]:
    """vgpud with the listener as fd 3, LISTEN_PID set to its own pid (as
    systemd does it: the variables are set after fork, before exec)."""
    wrapper = ("import os, sys\n"
               "os.dup2(int(sys.argv[1]), 3)\n"
               "os.environ['LISTEN_FDS'] = '1'\n"
               "os.environ['LISTEN_PID'] = str(os.getpid())\n"
               "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n")
    return subprocess.Popen(
        [sys.executable, "-c", wrapper, str(listener.fileno()), "-m",
         "vgpu_cgroup._daemon_main", *_args(tmp), "--socket", str(tmp / "unused.sock")],
        env=_env(), pass_fds=(listener.fileno(),), stdout=subprocess.PIPE,
        stderr=open(tmp / "vgpud.log", "a"), text=True)


@requires_sim
def test_socket_activation_survives_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    with listener:
        first = _activated(tmp_path, listener)
        try:
            assert first.stdout is not None
            line = first.stdout.readline()
            assert line.startswith(f"vgpud: listening on {path} (socket-activated)"), line
            assert not (tmp_path / "unused.sock").exists()  # nothing bound by vgpud
            with Client(path) as c:
                c.hello("ctl")
                st = c.ctl("status")
            assert st["socket_activated"] is True
            assert st["socket"] == path
            first.terminate()
            assert first.wait(10) == 0
        finally:
            first.kill()
            first.wait()
        # The socket belongs to the "socket unit" (us): still there after the stop.
        assert os.path.exists(path)
        # A client that connects while no daemon runs waits in the backlog ...
        waiting = Client(path, timeout=20)
        waiting.send({"t": "hello", "v": 1, "role": "ctl", "pid": os.getpid(), "comm": "t"})
        second = _activated(tmp_path, listener)
        try:
            # ... and is served by the next daemon on the same fd.
            assert waiting.recv()["t"] == "welcome"
            assert waiting.request({"t": "ctl", "op": "status"})["data"]["socket_activated"]
            waiting.close()
            with Client(path) as c:
                c.hello("ctl")
                assert c.ctl("tree")["slice"] == ""
            second.terminate()
            assert second.wait(10) == 0
        finally:
            second.kill()
            second.wait()
        assert os.path.exists(path)


# ---------------------------------------------------------------- configuration


@requires_sim
def test_broken_slice_file_keeps_running_state(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "tenants-alice.slice.conf").write_text("gpu.cores.max = 30\n")
    with _vgpud(tmp_path) as proc:
        sock = str(tmp_path / "run" / "vgpud.sock")
        shown = _ctl_json(sock, "show", "tenants-alice.slice")
        assert shown["knobs"]["gpu.cores.max"] == {
            "value": "30", "source": str(etc / "tenants-alice.slice.conf")}
        (etc / "tenants-alice.slice.conf").write_text(
            "# alice\ngpu.cores.max = 40\ngpu.memory.max = \"lots\"\n")
        proc.send_signal(signal.SIGHUP)

        def logged() -> bool:
            return "reload failed" in (tmp_path / "vgpud.log").read_text()

        wait_for(logged, 5)
        err = next(json.loads(ln) for ln in (tmp_path / "vgpud.log").read_text().splitlines()
                   if "reload failed" in ln)
        assert err["path"] == str(etc / "tenants-alice.slice.conf")
        assert err["line"] == 3
        assert err["level"] == "error"
        # The old value holds, and status / set say what is wrong and where.
        shown = _ctl_json(sock, "show", "tenants-alice.slice")
        assert shown["knobs"]["gpu.cores.max"]["value"] == "30"
        st = _ctl_json(sock, "status")
        assert st["config_error"].startswith(f"{etc / 'tenants-alice.slice.conf'}:3: ")
        p = subprocess.run([*VGPUD[:1], "-m", "vgpu_cgroup._ctl", "--socket", sock, "set",
                            "tenants-bob.slice", "gpu.cores.max=10"], env=_env(),
                           capture_output=True, text=True)
        assert p.returncode == 0
        assert "tenants-alice.slice.conf:3:" in p.stderr
        # Fixed: the next reload takes it.
        (etc / "tenants-alice.slice.conf").write_text("gpu.cores.max = 40\n")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _ctl_json(sock, "status")["config_error"] is None, 5)
        assert _ctl_json(sock, "show", "tenants-alice.slice")["knobs"]["gpu.cores.max"][
            "value"] == "40"


def test_set_layers_persistent_runtime_and_reset(vgpud: RunningDaemon,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    etc = Path(vgpud.etc_dir)
    (etc / "t.slice.conf").write_text("gpu.cores.max = 30\ngpu.cores.weight = 50\n")
    assert vgpud.call(vgpud.daemon.reload) is True

    def show() -> dict[str, Any]:
        return _json(capsys, vgpud, "show", "t.slice")["knobs"]  # type: ignore[no-any-return]

    control = Path(vgpud.etc_dir + ".control") / "t.slice.conf"
    runtime = Path(vgpud.runtime_dir) / "slices" / "t.slice.conf"
    # Persistent set wins over /etc and survives a reload (and a restart).
    _json(capsys, vgpud, "set", "t.slice", "gpu.cores.max=40")
    assert show()["gpu.cores.max"] == {"value": "40", "source": str(control)}
    assert vgpud.call(vgpud.daemon.reload) is True
    assert show()["gpu.cores.max"]["source"] == str(control)
    # Runtime wins over both until reboot.
    _json(capsys, vgpud, "set", "--runtime", "t.slice", "gpu.cores.max=50")
    assert vgpud.call(vgpud.daemon.reload) is True
    assert show()["gpu.cores.max"] == {"value": "50", "source": str(runtime)}
    # A later persistent set of the same knob takes it back from the runtime layer.
    _json(capsys, vgpud, "set", "t.slice", "gpu.cores.max=45")
    assert not runtime.exists()
    assert vgpud.call(vgpud.daemon.reload) is True
    assert show()["gpu.cores.max"] == {"value": "45", "source": str(control)}
    # reset --runtime keeps persistent settings; reset drops them: back to /etc.
    _json(capsys, vgpud, "set", "--runtime", "t.slice", "gpu.cores.weight=70")
    data = _json(capsys, vgpud, "reset", "--runtime", "t.slice")
    assert data["removed"] == [str(runtime)]
    assert show()["gpu.cores.weight"]["value"] == "50"
    assert show()["gpu.cores.max"]["value"] == "45"
    data = _json(capsys, vgpud, "reset", "t.slice")
    assert data["removed"] == [str(control)]
    assert show()["gpu.cores.max"] == {"value": "30", "source": str(etc / "t.slice.conf")}
    # Human output, and resetting nothing is fine.
    assert _ctl.main(["--socket", vgpud.socket, "reset", "t.slice"]) == 0
    assert "t.slice: removed nothing" in capsys.readouterr().out


def test_reset_of_transient_slice_removes_it(vgpud: RunningDaemon,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _json(capsys, vgpud, "set", "--runtime", "vgpu.slice/run-1.scope", "gpu.cores.max=20")
    assert "vgpu.slice/run-1.scope" in vgpud.call(vgpud.daemon.tree.slices)
    _json(capsys, vgpud, "reset", "--runtime", "vgpu.slice/run-1.scope")
    assert "vgpu.slice/run-1.scope" not in vgpud.call(vgpud.daemon.tree.slices)
    assert "vgpu.slice" not in vgpud.call(vgpud.daemon.tree.slices)


def test_reset_with_another_broken_file_still_forgets_knobs(
        vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    _json(capsys, vgpud, "set", "--runtime", "a.slice", "gpu.cores.max=20")
    (Path(vgpud.etc_dir) / "b.slice.conf").write_text("gpu.cores.max = [\n")
    rc = _ctl.main(["--socket", vgpud.socket, "--json", "reset", "--runtime", "a.slice"])
    out = capsys.readouterr()
    assert rc == 0
    data = json.loads(out.out)
    bad = str(Path(vgpud.etc_dir) / "b.slice.conf")
    assert data["config_error"].startswith(f"{bad}:1: TOML syntax error")
    assert f"vgpud runs on its last good configuration: {bad}:1:" in out.err
    knobs = _json(capsys, vgpud, "show", "a.slice")["knobs"]
    assert knobs["gpu.cores.max"] == {"value": "max", "source": "default"}


def test_reload_over_the_socket_says_whether_the_files_were_taken(
        vgpud: RunningDaemon) -> None:
    run = Path(vgpud.runtime_dir) / "slices"
    run.mkdir(exist_ok=True)
    (run / "k8s-claim-1.conf").write_text('slice = "kubepods/pod1"\ngpu.cores.max = 30\n')
    with vgpud.client() as c:
        assert c.ctl("reload") == {"ok": True, "config_error": None}
    assert vgpud.call(lambda: vgpud.daemon.tree.show("kubepods/pod1"))["knobs"][
        "gpu.cores.max"]["value"] == "30"
    (run / "k8s-claim-2.conf").write_text("gpu.cores.max = [\n")
    with vgpud.client() as c:
        data = c.ctl("reload")
    assert data["ok"] is False
    assert data["config_error"].startswith(f"{run / 'k8s-claim-2.conf'}:1: TOML syntax error")
    assert vgpud.call(lambda: vgpud.daemon.tree.show("kubepods/pod1"))["knobs"][
        "gpu.cores.max"]["value"] == "30"


# ---------------------------------------------------------------- vgpuctl


def _json(capsys: pytest.CaptureFixture[str], rd: RunningDaemon, *argv: str) -> Any:
    rc = _ctl.main(["--socket", rd.socket, "--json", *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out)


def test_every_command_json(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    hook = FakeHook(vgpud, slice="tenants.slice/tenants-alice.slice/job1")
    try:
        slot = hook.attach()["slot"]
        assert hook.reserve(slot, 3 << 20)["t"] == "granted"
        assert hook.reserve(slot, 1 << 20)["t"] == "granted"
        hook.release(slot, 1 << 20)
        hook.stat.dev[slot].launches = 1234
        hook.stat.dev[slot].allocs = 2
        hook.stat.dev[slot].frees = 1
        _json(capsys, vgpud, "set", "tenants-alice.slice", "gpu.memory.max=8M",
              "gpu.cores.max=50")

        tree = _json(capsys, vgpud, "tree")
        alice = tree["children"][0]["children"][0]
        proc = alice["children"][0]["processes"][0]
        assert {"pid", "comm", "launches", "allocs", "frees", "mem_bytes"} <= set(proc)
        assert proc["pid"] == os.getpid()
        assert (proc["launches"], proc["allocs"], proc["frees"]) == (1234, 2, 1)
        assert proc["mem_bytes"] == 3 << 20
        assert _ctl.main(["--socket", vgpud.socket, "tree"]) == 0
        text = capsys.readouterr().out
        assert "tenants-alice.slice [gpu.cores.max=50 gpu.memory.max=8M mem=3M]" in text
        assert f"└─{os.getpid()} vgpuctl (launches 1234, allocs 2, frees 1, mem 3M)" in text

        shown = _json(capsys, vgpud, "show", "tenants-alice.slice")
        assert shown["gpu.memory.current"]["total"] == 3 << 20
        assert shown["effective"]["gpu.memory.max"] == str(8 << 20)
        assert shown["processes"] == []  # job1's process, not alice's own
        assert hook.reserve(slot, 6 << 20)["t"] == "denied"

        events = _json(capsys, vgpud, "events")
        assert events["slices"]["tenants.slice/tenants-alice.slice"]["gpu.memory.events"][
            "max"] == 1
        one = _json(capsys, vgpud, "events", "tenants-alice.slice")
        assert list(one["slices"]) == ["tenants.slice/tenants-alice.slice"]
        assert _ctl.main(["--socket", vgpud.socket, "events"]) == 0
        assert "NR_THROTTLED" in capsys.readouterr().out

        top = _json(capsys, vgpud, "top")
        assert top["slices"]["tenants.slice/tenants-alice.slice/job1"]["memory_current"] == \
            3 << 20
        # -n 3: JSON lines, one document per iteration.
        assert _ctl.main(["--socket", vgpud.socket, "--json", "top", "-n", "3", "-d",
                          "0.01"]) == 0
        docs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
        assert len(docs) == 3
        assert all("window_ns" in d for d in docs)
        # --json after the subcommand works too.
        st = _json(capsys, vgpud, "status")
        assert st["simulated"] is True
        assert st["layers"]["persistent"] == vgpud.etc_dir + ".control"
        assert any(c["role"] == "hook" for c in st["clients"])
        assert _ctl.main(["--socket", vgpud.socket, "status"]) == 0
        text = capsys.readouterr().out
        assert "1 hooked process(es)" in text
        assert "gpu 0: Fake H200" in text
    finally:
        hook.close()


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ([], ["show"], ["tree"], ["top"], ["events"], ["set"], ["reset"], ["run"],
                ["status"]):
        with pytest.raises(SystemExit) as exc:
            _ctl.main([*cmd, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out, cmd
    with pytest.raises(SystemExit):
        _ctl.main(["top", "--json", "--help"])
    assert "-d SECONDS" in capsys.readouterr().out


def test_errors_say_what_to_do(vgpud: RunningDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert _ctl.main(["--socket", vgpud.socket, "top", "-n", "0"]) == 1
    assert "positive" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "show", "nope.slice"]) == 2
    assert "vgpuctl tree lists them" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "events", "nope.slice"]) == 2
    assert "see vgpuctl tree" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "set", "a.slice", "gpu.bogus=1"]) == 2
    assert "valid knobs" in capsys.readouterr().err
    assert _ctl.main(["--socket", vgpud.socket, "bogus"]) == 1
    assert "see vgpuctl --help" in capsys.readouterr().err


# ---------------------------------------------------------------- run


def test_systemd_run_command_line() -> None:
    argv = _run.systemd_run_argv("tenants.slice/tenants-alice.slice", "run-abc.scope",
                                 ["python", "-c", "pass"])
    assert argv == ["systemd-run", "--scope", "--quiet", "--collect", "--unit=run-abc.scope",
                    "--slice=tenants-alice.slice", "--", "python", "-c", "pass"]
    assert _run.systemd_run_argv("", "run-x.scope", ["true"])[5] == "--slice=-.slice"
    with pytest.raises(UsageError, match="slice unit"):
        _run.systemd_run_argv("kubepods/pod1", "run-x.scope", ["true"])


def test_run_uses_systemd_when_present(vgpud: RunningDaemon, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    class FakePopen:
        def __init__(self, argv: list[str], env: dict[str, str]) -> None:
            seen["argv"] = argv
            seen["env"] = env
            # While CMD runs, its knobs are on the scope systemd-run creates.
            unit = next(a for a in argv if a.startswith("--unit="))[len("--unit="):]
            with vgpud.client() as c:
                seen["show"] = c.ctl("show", slice=f"tenants.slice/{unit}")

        def wait(self) -> int:
            return 7

    monkeypatch.setattr(_run, "_has_systemd", lambda: True)
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    rc = _ctl.main(["--socket", vgpud.socket, "run", "--slice", "tenants.slice", "-p",
                    "gpu.cores.max=25", "--", "prog", "arg"])
    assert rc == 7
    assert seen["argv"][:3] == ["systemd-run", "--scope", "--quiet"]
    assert seen["argv"][-3:] == ["--", "prog", "arg"]
    assert "--slice=tenants.slice" in seen["argv"]
    assert seen["env"]["LD_PRELOAD"].startswith(HOOK_LIB)
    assert seen["show"]["knobs"]["gpu.cores.max"]["value"] == "25"
    # Gone once CMD exited.
    assert [s for s in vgpud.call(vgpud.daemon.tree.slices) if "run-" in s] == []


def _cgroup_writable() -> None:
    try:
        mount = find_cgroup2_mount()
    except (OSError, LookupError):
        pytest.skip("no cgroup v2")
    if not os.access(mount, os.W_OK):
        pytest.skip("cgroup v2 not writable")


def test_run_cleans_up_when_terminated(vgpud: RunningDaemon, tmp_path: Path) -> None:
    """vgpuctl killed (SIGTERM, as a job runner would): CMD gets the signal,
    and the scope's knobs and cgroup go away anyway."""
    _cgroup_writable()
    marker = tmp_path / "started"
    rt = Path(vgpud.runtime_dir) / "slices"
    script = f"ls {rt} > {marker}; exec sleep 30"
    p = subprocess.Popen([sys.executable, "-m", "vgpu_cgroup._ctl", "--socket", vgpud.socket,
                          "run", "-p", "gpu.memory.max=1G", "--", "sh", "-c", script],
                         env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: marker.exists() and marker.read_text() != "", 10)
        listed = marker.read_text().split()
        assert listed[0].startswith("vgpu.slice%2Frun-")  # knobs were in place
        scope = listed[0].removeprefix("vgpu.slice%2F").removesuffix(".conf")
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.wait()
    assert os.listdir(rt) == []
    assert [s for s in vgpud.call(vgpud.daemon.tree.slices) if "run-" in s] == []
    assert not os.path.exists(os.path.join(find_cgroup2_mount(), "vgpu.slice", scope))
