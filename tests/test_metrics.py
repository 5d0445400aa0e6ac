"""The Prometheus endpoint: scraped over HTTP from a real vgpud and parsed
with prometheus_client's own text parser."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import requires_sim
from prometheus_client.parser import text_string_to_metric_families

from vgpu_cgroup._node._metrics import (
    MetricsError,
    parse_listen,
    registry_for,
    render,
    response_for,
)
from vgpu_cgroup._wire._client import Client

ROOT = Path(__file__).resolve().parent.parent


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def test_parse_listen_loopback_only() -> None:
    assert parse_listen("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert parse_listen("[::1]:9400") == ("::1", 9400)
    assert parse_listen("localhost:0") == ("127.0.0.1", 0)
    with pytest.raises(MetricsError, match="not loopback"):
        parse_listen("0.0.0.0:9400")
    assert parse_listen("0.0.0.0:9400", allow_any=True) == ("0.0.0.0", 9400)
    for bad in ("9400", "host:9400", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(MetricsError, match="metrics listen address"):
            parse_listen(bad)


def _fake_source() -> dict[str, Any]:
    dev = "GPU-0"
    leaf = {"slice": "a.slice", "processes": [{"pid": 1}], "children": [],
            "cores": {"usage_usec": 2_500_000, "throttled_usec": 500_000, "nr_throttled": 7,
                      "devices": {dev: {"usage_usec": 2_500_000, "throttled_usec": 500_000,
                                        "nr_throttled": 7}}},
            "memory": {"total": 10, "devices": {dev: 10}}, "peak": {dev: 20},
            "events": {"high": 1, "max": 2, "oom": 3},
            "events_local": {"high": 1, "max": 1, "oom": 3}}
    root = {"slice": "", "processes": [], "children": [leaf],
            "cores": {"usage_usec": 2_500_000, "throttled_usec": 500_000, "nr_throttled": 7,
                      "devices": {dev: {"usage_usec": 2_500_000, "throttled_usec": 500_000,
                                        "nr_throttled": 7}}},
            "memory": {"total": 10, "devices": {dev: 10}}, "peak": {dev: 20},
            "events": {"high": 1, "max": 2, "oom": 3},
            "events_local": {"high": 0, "max": 0, "oom": 0}}
    ev = {"max": 0, "clients": 0, "hooks": 5, "handshakes": 0, "node": 0, "depth": 0}
    return {"tree": root, "mem_max": {"": {dev: None, "GPU-1": None},
                                      "a.slice": {dev: 4096, "GPU-1": None}},
            "devices": [dev, "GPU-1"],
            "connections": 4,
            "clients": {"": (4, {**ev, "hooks": 0}), "a.slice": (3, ev),
                        "flood.slice": (0, {**ev, "hooks": 0, "clients": 9})}}


def test_collector_and_http_responses() -> None:
    reg = registry_for(_fake_source)
    s = _samples(render(reg).decode())
    a = frozenset({("slice", "a.slice")})
    ad = frozenset({("slice", "a.slice"), ("device", "GPU-0")})
    a1 = frozenset({("slice", "a.slice"), ("device", "GPU-1")})
    assert s[("vgpu_slice_gpu_time_seconds_total", ad)] == 2.5
    assert s[("vgpu_slice_throttled_seconds_total", ad)] == 0.5
    assert s[("vgpu_slice_throttled_total", ad)] == 7
    # per device: one the slice has not used yet reads 0
    assert s[("vgpu_slice_gpu_time_seconds_total", a1)] == 0
    assert s[("vgpu_slice_memory_current_bytes", a1)] == 0
    assert ("vgpu_slice_memory_max_bytes", a1) not in s  # a cap on GPU-0 only
    assert s[("vgpu_slice_memory_current_bytes", ad)] == 10
    assert s[("vgpu_slice_memory_peak_bytes", ad)] == 20
    assert s[("vgpu_slice_memory_max_bytes", ad)] == 4096
    # Unlimited: no max sample rather than a fake number.
    assert ("vgpu_slice_memory_max_bytes",
            frozenset({("slice", "-.slice"), ("device", "GPU-0")})) not in s
    assert s[("vgpu_slice_memory_events_total",
              frozenset({("slice", "a.slice"), ("type", "oom")}))] == 3
    assert s[("vgpu_slice_memory_events_local_total",
              frozenset({("slice", "a.slice"), ("type", "max")}))] == 1
    assert s[("vgpu_slice_memory_events_local_total",
              frozenset({("slice", "-.slice"), ("type", "max")}))] == 0
    assert s[("vgpu_slice_clients", a)] == 1
    assert s[("vgpu_slice_clients", frozenset({("slice", "-.slice")}))] == 1
    assert s[("vgpu_connections", frozenset())] == 4
    assert s[("vgpu_slice_connections", a)] == 3
    assert s[("vgpu_slice_clients_events_total",
              frozenset({("slice", "a.slice"), ("type", "hooks")}))] == 5
    # A slice with refusals and no connection left (not in the tree) too.
    assert s[("vgpu_slice_clients_events_total",
              frozenset({("slice", "flood.slice"), ("type", "clients")}))] == 9
    ok = response_for(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", reg)
    assert ok.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"Content-Type: text/plain; version=0.0.4" in ok
    assert response_for(b"GET /nope HTTP/1.0\r\n\r\n", reg).startswith(b"HTTP/1.0 404")
    assert response_for(b"POST /metrics HTTP/1.0\r\n\r\n", reg).startswith(b"HTTP/1.0 405")
    assert response_for(b"garbage\r\n\r\n", reg).startswith(b"HTTP/1.0 400")
    head = response_for(b"HEAD /metrics HTTP/1.0\r\n\r\n", reg)
    assert head.endswith(b"\r\n\r\n")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID")}
    env["PYTHONPATH"] = str(ROOT)
    env["VGPU_SIM_SHM"] = f"vgpu-metrics-{os.getpid()}"
    return env


def _vgpud(tmp: Path, *extra: str) -> subprocess.Popen[str]:
    (tmp / "etc").mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-m", "vgpu_cgroup._daemon_main", "--simulate", "--identity",
         "declared", "--runtime-dir", str(tmp / "run"), "--etc-dir", str(tmp / "etc"),
         "--log-format", "json", *extra],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@requires_sim
def test_scrape_running_daemon(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "tenants-alice.slice.conf").write_text('gpu.memory.max = "1G"\n')
    proc = _vgpud(tmp_path, "--metrics-listen", "127.0.0.1:0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert ", metrics on http://127.0.0.1:" in line, line
        url = line.rsplit(" ", 1)[-1].strip()
        sock = str(tmp_path / "run" / "vgpud.sock")
        with Client(sock) as ctl:
            ctl.hello("ctl")
            dev = ctl.ctl("status")["devices"][0]["uuid"]
        with Client(sock) as hook:
            hook.hello("hook", slice="tenants.slice/tenants-alice.slice/job1")
            slot = hook.request({"t": "attach", "dev": dev, "total": 1 << 34})["slot"]
            assert hook.request({"t": "reserve", "slot": slot, "n": 300 << 20})["t"] == \
                "granted"
            assert hook.request({"t": "reserve", "slot": slot, "n": 800 << 20})["t"] == \
                "denied"
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200
                text = resp.read().decode()
        s = _samples(text)
        alice = "tenants.slice/tenants-alice.slice"
        ad = frozenset({("slice", alice), ("device", dev)})
        assert s[("vgpu_slice_memory_current_bytes", ad)] == 300 << 20
        assert s[("vgpu_slice_memory_peak_bytes", ad)] == 300 << 20
        assert s[("vgpu_slice_memory_max_bytes", ad)] == 1 << 30
        def ev(kind: str, slc: str, typ: str) -> float:
            return s[(f"vgpu_slice_memory_events{kind}_total",
                      frozenset({("slice", slc), ("type", typ)}))]

        # refused by alice's max: counted there and above it (cgroup v2's
        # hierarchical events); the oom at the process's own slice, job1
        assert [ev("", x, "max") for x in (alice, "tenants.slice", "-.slice")] == [1, 1, 1]
        assert ev("_local", alice, "max") == 1
        assert ev("_local", "tenants.slice", "max") == 0
        assert ev("", alice, "oom") == ev("_local", alice + "/job1", "oom") == 1
        assert ev("_local", alice, "oom") == 0
        assert s[("vgpu_slice_clients", frozenset({("slice", alice)}))] == 1
        assert ("vgpu_slice_gpu_time_seconds_total", ad) in s
        # Connections are charged to this process's own cgroup (identity is
        # declared here, the charge is not): the root sees all of them.
        assert s[("vgpu_slice_connections", frozenset({("slice", "-.slice")}))] >= 1
        assert s[("vgpu_slice_clients_events_total",
                  frozenset({("slice", "-.slice"), ("type", "node")}))] == 0
        # The hook is gone: its memory too, at a next scrape.
        for _ in range(100):
            with urllib.request.urlopen(url, timeout=10) as resp:
                s = _samples(resp.read().decode())
            if s[("vgpu_slice_memory_current_bytes", ad)] == 0:
                break
            time.sleep(0.02)
        assert s[("vgpu_slice_memory_current_bytes", ad)] == 0
        assert s[("vgpu_slice_clients", frozenset({("slice", alice)}))] == 0
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
        assert exc.value.code == 404
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()


@requires_sim
def test_non_loopback_refused(tmp_path: Path) -> None:
    proc = _vgpud(tmp_path, "--metrics-listen", "0.0.0.0:9400")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "is not loopback" in err
    assert "--metrics-listen-any" in err
