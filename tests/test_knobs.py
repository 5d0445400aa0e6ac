"""Knob parsing and formatting: cgroup v2 conventions, clear errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vgpu_cgroup._core._knobs import (
    KNOBS,
    KnobError,
    format_knob,
    knob_spec,
    parse_knob,
)

G = 1024**3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        ("30", 30.0),
        (12.5, 12.5),
        ("100", 100.0),
        ("max", None),
        (" MAX ", None),
        ("1e2", 100.0),
    ],
)
def test_cores_max(value: object, expected: float | None) -> None:
    assert parse_knob("gpu.cores.max", value) == expected


@pytest.mark.parametrize(
    "value", [0, "0", 101, -1, "abc", True, None, [30], float("nan"), "1e3", "inf"]
)
def test_cores_max_rejects(value: object) -> None:
    with pytest.raises(KnobError) as ei:
        parse_knob("gpu.cores.max", value)
    assert "gpu.cores.max" in str(ei.value)
    assert "max" in str(ei.value)


def test_cores_min_and_weight() -> None:
    assert parse_knob("gpu.cores.min", 0) == 0.0
    assert parse_knob("gpu.cores.min", "50") == 50.0
    with pytest.raises(KnobError):
        parse_knob("gpu.cores.min", "max")
    assert parse_knob("gpu.cores.weight", "100") == 100
    assert parse_knob("gpu.cores.weight", 10000) == 10000
    assert parse_knob("gpu.cores.weight", 3.0) == 3
    for bad in (0, 10001, 2.5, "x"):
        with pytest.raises(KnobError, match=r"1\.\.10000"):
            parse_knob("gpu.cores.weight", bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        ("8G", 8 * G),
        ("8g", 8 * G),
        ("8GiB", 8 * G),
        ("8gb", 8 * G),
        ("7680M", 7680 * 1024**2),
        ("1.5K", 1536),
        ("1T", 1024**4),
        ("512", 512),
        ("512B", 512),
        ("max", None),
        (0, 0),
    ],
)
def test_bytes(value: object, expected: int | None) -> None:
    assert parse_knob("gpu.memory.max", value) == expected
    assert parse_knob("gpu.memory.high", value) == expected


@pytest.mark.parametrize("value", ["-1", -1, "8X", "G", "", "8 G B", 1.5, True, "1e9", 2**64])
def test_bytes_rejects(value: object) -> None:
    with pytest.raises(KnobError, match=r"gpu\.memory\.max"):
        parse_knob("gpu.memory.max", value)


def test_devices() -> None:
    assert parse_knob("gpu.devices", "all") is None
    assert parse_knob("gpu.devices", "0,1") == ("0", "1")
    assert parse_knob("gpu.devices", " 0 , 01 ") == ("0", "1")
    assert parse_knob("gpu.devices", ["0", "GPU-abc-123"]) == ("0", "GPU-abc-123")
    assert parse_knob("gpu.devices", 2) == ("2",)
    # UUIDs as NVML writes them, whatever case they were given in
    assert parse_knob("gpu.devices", "GPU-ABCDEF01-2345") == ("GPU-abcdef01-2345",)
    assert parse_knob("gpu.devices", "") == ()
    for bad in ("x", ["-1"], [True], "GPU", 1.5):
        with pytest.raises(KnobError, match=r"gpu\.devices"):
            parse_knob("gpu.devices", bad)


def test_unknown_and_readonly() -> None:
    with pytest.raises(KnobError, match=r"valid knobs: gpu\.cores\.max") as ei:
        parse_knob("gpu.cores.maxx", 1)
    assert ei.value.knob == "gpu.cores.maxx"
    with pytest.raises(KnobError, match="read-only"):
        parse_knob("gpu.memory.current", 1)
    with pytest.raises(KnobError):
        format_knob("nope", 1)


def test_format() -> None:
    assert format_knob("gpu.cores.max", None) == "max"
    assert format_knob("gpu.cores.max", 30.0) == "30"
    assert format_knob("gpu.cores.max", 12.5) == "12.5"
    assert format_knob("gpu.memory.max", 8 * G) == "8589934592"
    assert format_knob("gpu.memory.high", None) == "max"
    assert format_knob("gpu.devices", ("0", "GPU-x")) == "0,GPU-x"
    assert format_knob("gpu.devices", None) == "all"
    assert format_knob("gpu.cores.weight", 100) == "100"
    assert format_knob("gpu.cores.idle", 1) == "1"


@pytest.mark.parametrize("bad", [2, -1, "yes", "1.0", 0.5, None])
def test_idle_is_zero_or_one(bad: object) -> None:
    with pytest.raises(KnobError, match=r"gpu\.cores\.idle"):
        parse_knob("gpu.cores.idle", bad)
    assert parse_knob("gpu.cores.idle", True) == 1
    assert parse_knob("gpu.cores.idle", "0") == 0


@given(st.sampled_from(sorted(KNOBS)), st.data())
def test_roundtrip(name: str, data: st.DataObject) -> None:
    """format(parse(x)) parses back to the same value."""
    strategies: dict[str, st.SearchStrategy[object]] = {
        "gpu.cores.max": st.one_of(st.just("max"), st.floats(0.001, 100)),
        "gpu.cores.min": st.floats(0, 100),
        "gpu.cores.weight": st.integers(1, 10000),
        "gpu.cores.idle": st.one_of(st.sampled_from([0, 1, "0", "1"]), st.booleans()),
        "gpu.memory.max": st.one_of(st.just("max"), st.integers(0, 2**63)),
        "gpu.memory.high": st.one_of(
            st.just("max"),
            st.builds(lambda n, s: f"{n}{s}", st.integers(0, 10**6), st.sampled_from("KMGkmg")),
        ),
        "gpu.devices": st.one_of(
            st.just("all"), st.lists(st.integers(0, 15).map(str), min_size=1, max_size=4)
        ),
        "gpu.clients.max": st.one_of(st.just("max"), st.integers(0, 2**40),
                                     st.integers(0, 10**6).map(str)),
    }
    v = parse_knob(name, data.draw(strategies[name]))
    again = parse_knob(name, format_knob(name, v))
    if isinstance(v, float):
        assert again == pytest.approx(v, rel=1e-5)
    else:
        assert again == v


def test_clients_max() -> None:
    assert parse_knob("gpu.clients.max", "max") is None
    assert parse_knob("gpu.clients.max", "64") == 64
    assert parse_knob("gpu.clients.max", 0) == 0
    assert parse_knob("gpu.clients.max", 8.0) == 8
    for bad in (-1, "-1", 2.5, "lots", True, [1]):
        with pytest.raises(KnobError, match=r"gpu\.clients\.max"):
            parse_knob("gpu.clients.max", bad)
    with pytest.raises(KnobError, match="read-only"):
        knob_spec("gpu.clients.events")


def test_values_per_device() -> None:
    """A limit may differ between GPUs, like io.max's lines per device:
    ``DEV=VALUE`` entries (an index or a UUID) and at most one plain value
    for the GPUs they do not name; shown the way they are read back."""
    from vgpu_cgroup._core._knobs import DeviceRef, PerDevice

    v = parse_knob("gpu.memory.max", "8G 1=2G")
    assert v == PerDevice(8 << 30, (("1", 2 << 30),))
    assert format_knob("gpu.memory.max", v) == f"{8 << 30} 1={2 << 30}"
    assert parse_knob("gpu.memory.max", format_knob("gpu.memory.max", v)) == v
    only = parse_knob("gpu.cores.max", "1=30")
    assert only == PerDevice(None, (("1", 30.0),))
    assert format_knob("gpu.cores.max", only) == "max 1=30"
    assert parse_knob("gpu.cores.weight", "0=200, GPU-AB-CD=50") == PerDevice(
        100, (("0", 200), ("GPU-ab-cd", 50)))
    assert parse_knob("gpu.memory.high", ["max", "GPU-ab=1G"]) == PerDevice(
        None, (("GPU-ab", 1 << 30),))
    assert parse_knob("gpu.cores.min", "20") == 20.0  # one value: for every GPU, as before
    assert parse_knob("gpu.memory.max", "8 G") == 8 << 30
    gpu1 = DeviceRef("GPU-ab", 1)
    by_both = parse_knob("gpu.memory.max", "1=1G GPU-ab=2G 3G")
    assert isinstance(by_both, PerDevice)
    assert by_both.on(gpu1) == 2 << 30  # the UUID's entry wins over the index's
    assert by_both.on(DeviceRef("GPU-cd", 1)) == 1 << 30
    assert by_both.on(DeviceRef("GPU-cd", 0)) == 3 << 30
    assert by_both.on(None) == 3 << 30
    for bad, why in (("1=", "expected bytes"), ("x=5G", "bad device 'x'"),
                     ("1=5G 1=6G", "device 1 given twice"),
                     ("5G 6G 1=2G", "more than one value"), ("1=-5", "expected bytes")):
        with pytest.raises(KnobError, match=why):
            parse_knob("gpu.memory.max", bad)
    with pytest.raises(KnobError, match="out of range"):
        parse_knob("gpu.cores.max", "0=30 1=130")
    with pytest.raises(KnobError):
        parse_knob("gpu.cores.idle", "1=1")  # gpu.cores.idle is one value for every GPU
