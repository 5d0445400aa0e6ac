"""Configuration layers: slice names, slice files, daemon file, runtime writes."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from vgpu_cgroup._core._bounds import ClientLimits
from vgpu_cgroup._core._config import (
    ConfigError,
    DaemonConfig,
    expand_slice_name,
    slice_file_name,
)
from vgpu_cgroup._core._knobs import KnobError
from vgpu_cgroup._node._files import load_daemon_config, load_slice_layers, write_runtime_setting

G = 1024**3


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tenants-alice.slice", "tenants.slice/tenants-alice.slice"),
        ("a-b-c.slice", "a.slice/a-b.slice/a-b-c.slice"),
        ("tenants.slice", "tenants.slice"),
        ("-.slice", ""),
        ("", ""),
        ("/", ""),
        ("/tenants.slice/tenants-alice.slice", "tenants.slice/tenants-alice.slice"),
        ("tenants.slice/tenants-alice.slice/", "tenants.slice/tenants-alice.slice"),
        ("kubepods/pod1", "kubepods/pod1"),
        ("job1", "job1"),
    ],
)
def test_expand_slice_name(name: str, expected: str) -> None:
    assert expand_slice_name(name) == expected


@pytest.mark.parametrize(
    "name", ["a//b", "a/../b", "..", "a/./b", "a\0b", "-a.slice", "a--b.slice"]
)
def test_expand_slice_name_rejects(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid slice"):
        expand_slice_name(name)


def test_slice_file_name() -> None:
    assert slice_file_name("tenants.slice/tenants-alice.slice") == "tenants-alice.slice.conf"
    assert slice_file_name("") == "-.slice.conf"
    assert slice_file_name("kubepods/pod%1") == "kubepods%2Fpod%251.conf"
    assert slice_file_name("x.slice/tenants-alice.slice") == "x.slice%2Ftenants-alice.slice.conf"


def write(p: Path, text: str) -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def test_load_layers_order_and_names(tmp_path: Path) -> None:
    etc, run = tmp_path / "etc", tmp_path / "run"
    a = write(etc / "tenants-alice.slice.conf", 'gpu.cores.max = 30\ngpu.memory.max = "8G"\n')
    k = write(etc / "pod.conf", 'slice = "/kubepods/pod1"\n[gpu.cores]\nmin = 10\n')
    write(etc / "ignored.txt", "garbage = = =")
    r = write(run / "tenants-alice.slice.conf", '"gpu.cores.max" = "60"\n')
    got = load_slice_layers(str(etc), str(run))
    assert [(s.slice, s.knob, s.value, s.source) for s in got] == [
        ("kubepods/pod1", "gpu.cores.min", 10.0, k),
        ("tenants.slice/tenants-alice.slice", "gpu.cores.max", 30.0, a),
        ("tenants.slice/tenants-alice.slice", "gpu.memory.max", 8 * G, a),
        ("tenants.slice/tenants-alice.slice", "gpu.cores.max", 60.0, r),
    ]
    assert got[-1].raw == "60"


def test_missing_dirs_are_empty(tmp_path: Path) -> None:
    assert load_slice_layers(str(tmp_path / "no"), str(tmp_path / "nope")) == []


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("gpu.cores.max = 30\ngpu.cores.mxa = 1\n", 2, "unknown knob 'gpu.cores.mxa'"),
        ('\n\ngpu.memory.max = "8Q"\n', 3, "gpu.memory.max"),
        ("gpu.cores.max = 30\ngpu.cores.min = = 3\n", 2, "TOML syntax error"),
        ("[gpu.cores]\nmax = 30\nweight = 0\n", 3, "1..10000"),
        ("gpu.memory.current = 5\n", 1, "read-only"),
        ("slice = 5\n", 1, "slice: expected a string"),
        ("slice = 'a/../b'\n", 1, "invalid slice"),
        ('slice = "-.slice"\n\ngpu.cores.max = 10\n', 3, "root slice (-.slice) takes no knobs"),
        ("gpu.memory.events.local = 1\n", 1, "read-only"),
    ],
)
def test_bad_slice_files(tmp_path: Path, text: str, line: int, needle: str) -> None:
    write(tmp_path / "etc" / "a.slice.conf", "gpu.cores.max = 10\n")
    p = write(tmp_path / "etc" / "b.slice.conf", text)
    with pytest.raises(ConfigError) as ei:
        load_slice_layers(str(tmp_path / "etc"), str(tmp_path / "run"))
    e = ei.value
    assert e.path == p
    assert e.line == line
    assert needle in e.msg
    assert str(e).startswith(f"{p}:{line}: ")


def test_file_name_must_name_a_slice(tmp_path: Path) -> None:
    p = write(tmp_path / "foo.conf", "gpu.cores.max = 10\n")
    with pytest.raises(ConfigError, match=r"foo\.conf: file name is not a slice unit name"):
        load_slice_layers(str(tmp_path), str(tmp_path / "run"))
    assert ConfigError(p, None, "x").line is None


def test_daemon_config_defaults_and_file(tmp_path: Path) -> None:
    d = DaemonConfig()
    assert d.socket == "/run/vgpu/vgpud.sock"
    assert d.run_slices_dir == "/run/vgpu/slices"
    assert (d.identity, d.tick_ms, d.simulate, d.log_format, d.metrics_listen) == (
        "cgroup",
        10,
        False,
        "auto",
        None,
    )
    p = write(
        tmp_path / "vgpud.toml",
        'socket = "/tmp/v.sock"\nruntime_dir = "/tmp/rv"\nidentity = "declared"\n'
        'tick_ms = 5\nsimulate = true\nlog_format = "json"\nclock_exponent = 1\n'
        '[metrics]\nlisten = "127.0.0.1:9400"\n',
    )
    c = load_daemon_config(p)
    assert c.socket == "/tmp/v.sock"
    assert c.run_slices_dir == "/tmp/rv/slices"
    assert c.identity == "declared"
    assert c.tick_ms == 5
    assert c.clock_exponent == 1.0
    assert c.simulate is True
    assert c.log_format == "json"
    assert c.metrics_listen == "127.0.0.1:9400"
    assert c.limits == ClientLimits()
    p = write(tmp_path / "limits.toml",
              "[limits]\nclients = 100\nslice_clients = 50\nslice_handshakes = 4\n"
              "slice_hooks = 20\nmax_depth = 8\nhandshake_timeout_ms = 1500\n")
    assert load_daemon_config(p).limits == ClientLimits(
        clients=100, slice_clients=50, slice_handshakes=4, slice_hooks=20, max_depth=8,
        handshake_timeout_s=1.5)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ('socket = "/x"\nsockt = "/y"\n', 2, "unknown setting 'sockt'"),
        ('identity = "trust-me"\n', 1, "identity"),
        ("tick_ms = 0\n", 1, "out of range"),
        ("tick_ms = true\n", 1, "expected an integer"),
        ("clock_exponent = 1.5\n", 1, "out of range 0..1"),
        ('clock_exponent = "half"\n', 1, "expected int/float"),
        ('simulate = "yes"\n', 1, "expected bool"),
        ("[metrics]\nlisten = 9400\n", 2, "metrics.listen"),
        ("tick_ms = \n", 1, "TOML syntax error"),
        ("[limits]\nclients = 0\n", 2, "limits.clients: 0 out of range"),
        ("[limits]\nslice_hooks = 1.5\n", 2, "expected int"),
        ("[limits]\nslice_hook = 5\n", 2, "unknown setting 'limits.slice_hook'"),
    ],
)
def test_bad_daemon_config(tmp_path: Path, text: str, line: int, needle: str) -> None:
    p = write(tmp_path / "vgpud.toml", text)
    with pytest.raises(ConfigError) as ei:
        load_daemon_config(p)
    assert ei.value.line == line
    assert needle in ei.value.msg


def test_daemon_config_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_daemon_config(str(tmp_path / "nope.toml"))


def test_write_runtime_setting_merges_atomically(tmp_path: Path) -> None:
    run = tmp_path / "run" / "slices"
    p = write_runtime_setting(str(run), "tenants-alice.slice", {"gpu.cores.max": "30"})
    assert p == str(run / "tenants-alice.slice.conf")
    p2 = write_runtime_setting(
        str(run),
        "/tenants.slice/tenants-alice.slice",
        {"gpu.memory.max": "8G", "gpu.cores.max": "60"},
    )
    assert p2 == p
    doc = tomllib.loads(Path(p).read_text())
    assert doc["slice"] == "tenants.slice/tenants-alice.slice"
    assert doc["gpu"] == {"cores": {"max": "60"}, "memory": {"max": "8G"}}
    got = load_slice_layers(str(tmp_path / "etc"), str(run))
    assert {(s.slice, s.knob, s.value) for s in got} == {
        ("tenants.slice/tenants-alice.slice", "gpu.cores.max", 60.0),
        ("tenants.slice/tenants-alice.slice", "gpu.memory.max", 8 * G),
    }
    assert [n for n in os.listdir(run) if n.startswith(".")] == []
    # odd names round-trip through the escaped file name and the slice key
    p3 = write_runtime_setting(str(run), "kubepods/pod1", {"gpu.devices": "0,1"})
    assert os.path.basename(p3) == "kubepods%2Fpod1.conf"
    got = load_slice_layers(str(tmp_path / "etc"), str(run))
    assert ("kubepods/pod1", "gpu.devices", ("0", "1")) in {(s.slice, s.knob, s.value) for s in got}
    # bad values write nothing
    with pytest.raises(KnobError):
        write_runtime_setting(str(run), "x.slice", {"gpu.cores.max": "lots"})
    assert not (run / "x.slice.conf").exists()


def test_root_slice_file_is_refused(tmp_path: Path) -> None:
    # -.slice.conf names the root, which takes no knobs (as in cgroup v2)
    p = write(tmp_path / "etc" / "-.slice.conf", "# the node\ngpu.memory.max = \"8G\"\n")
    with pytest.raises(ConfigError) as ei:
        load_slice_layers(str(tmp_path / "etc"), str(tmp_path / "run"))
    assert (ei.value.path, ei.value.line) == (p, 2)
    assert "set them on a slice below it" in ei.value.msg
    with pytest.raises(ConfigError, match="root slice"):
        write_runtime_setting(str(tmp_path / "run"), "-.slice", {"gpu.cores.max": "50"})


def test_clients_max_cannot_be_set_on_the_root(tmp_path: Path) -> None:
    # Like pids.max (and like every knob: the root takes none), with the
    # node-wide bound in vgpud.toml instead.
    write(tmp_path / "-.slice.conf", "gpu.clients.max = 10\n")
    with pytest.raises(ConfigError) as ei:
        load_slice_layers(str(tmp_path), str(tmp_path / "run"))
    assert ei.value.line == 1
    assert "root slice" in ei.value.msg
    with pytest.raises(ConfigError, match="root slice"):
        write_runtime_setting(str(tmp_path / "run"), "", {"gpu.clients.max": "10"})
    assert not (tmp_path / "run").exists()


def test_compute_settings_reach_the_arbiter(tmp_path: Path) -> None:
    from vgpu_cgroup._core import arbiter_params

    conf = write(tmp_path / "vgpud.toml",
                 "[compute]\nwindow_us = 30000\nyield_inflight_us = 1000\n")
    cfg = load_daemon_config(conf)
    assert cfg.compute == {"window_us": 30000, "yield_inflight_us": 1000}
    p = arbiter_params(cfg.compute)
    assert (p.window_ns, p.yield_inflight_ns) == (30_000_000, 1_000_000)
    with pytest.raises(ConfigError, match="out of range"):
        load_daemon_config(write(tmp_path / "bad.toml", "[compute]\nwindow_us = 5\n"))
