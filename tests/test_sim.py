"""Tests of the simulated GPU (libhook/sim): the stand-in driver every other
end-to-end test runs on, so its accounting and time-slicing must be right.

CUDA code runs in subprocesses (`run_py`) because the simulated driver binds
its device at cuInit; each test gets its own shm name and removes it after.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _simlib import (
    CUDA_ERROR_INVALID_DEVICE,
    CUDA_ERROR_INVALID_HANDLE,
    CUDA_ERROR_NO_DEVICE,
    CUDA_ERROR_NOT_FOUND,
    CUDA_ERROR_NOT_INITIALIZED,
    ROOT,
    MiB,
    load_cuda,
    load_nvml,
    new_shm_name,
    result_of,
    run_py,
    shm_env,
    spawn_py,
    unlink_shm,
)
from _simlib import build as build_sim

OVERHEAD = 300 * MiB


@pytest.fixture(scope="session")
def simdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sim(tmp_path_factory.mktemp("simbuild"))


@pytest.fixture
def shm() -> Iterator[str]:
    name = new_shm_name()
    yield name
    unlink_shm(name)


def env_for(shm: str, **extra: str) -> dict[str, str]:
    return {"VGPU_SIM_SHM": shm, **extra}


def header_functions(header: str, prefix: str) -> set[str]:
    text = (ROOT / "libhook" / "include" / header).read_text()
    return set(re.findall(rf"\b({prefix}[A-Za-z0-9_]+)\(", text))


def exported(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_exports_match_headers(simdir: Path) -> None:
    cuda = exported(simdir / "libcuda.so.1")
    want = header_functions("vgpu_cuda.h", "cu")
    assert want <= cuda, want - cuda
    assert all(s.startswith(("cu", "vgpuSim")) for s in cuda), cuda
    assert {"vgpuSimProcessStats", "vgpuSimDeviceStats", "vgpuSimReset"} <= cuda
    nvml = exported(simdir / "libnvidia-ml.so.1")
    want_nvml = header_functions("vgpu_nvml.h", "nvml")
    assert want_nvml <= nvml, want_nvml - nvml
    assert all(s.startswith("nvml") for s in nvml), nvml
    soname = subprocess.run(["objdump", "-p", str(simdir / "libcuda.so.1")], capture_output=True,
                            text=True, check=True).stdout
    assert re.search(r"SONAME\s+libcuda\.so\.1", soname)


def test_memory_accounting_and_oom(simdir: Path, shm: str) -> None:
    res = run_py("""
        r = {}
        cu.init_ctx()
        r['after_ctx'] = cu.stats()[1]
        r['info0'] = cu.mem_info()
        rc, p = cu.alloc(512 * MiB); check(rc)
        r['after_alloc'] = cu.stats()[1]
        r['oom'] = cu.alloc(300 * MiB)[0]
        r['info1'] = cu.mem_info()
        # shadow copy round trip on a small allocation
        rc, small = cu.alloc(4096); check(rc)
        check(lib.cuMemsetD8_v2(small, 7, 16))
        check(lib.cuMemcpyHtoD_v2(small + 16, b'hello', 5))
        buf = ctypes.create_string_buffer(21)
        check(lib.cuMemcpyDtoH_v2(buf, small, 21))
        r['copy'] = buf.raw.hex()
        r['copy_oob'] = lib.cuMemcpyHtoD_v2(small + 4090, b'0123456789', 10)
        check(lib.cuMemFree_v2(small))
        check(lib.cuMemFree_v2(p))
        r['after_free'] = cu.stats()[1]
        r['double_free'] = lib.cuMemFree_v2(p)
        pitch, q = ctypes.c_size_t(), ctypes.c_uint64()
        check(lib.cuMemAllocPitch_v2(ctypes.byref(q), ctypes.byref(pitch), 1000, 100, 4))
        r['pitch'] = pitch.value
        r['after_pitch'] = cu.stats()[1]
        check(lib.cuMemFree_v2(q.value))
        m = ctypes.c_uint64()
        check(lib.cuMemAllocManaged(ctypes.byref(m), 8 * MiB, 1))
        r['after_managed'] = cu.stats()[1]
        check(lib.cuMemFree_v2(m.value))
        class D3(ctypes.Structure):
            _fields_ = [('Width', ctypes.c_size_t), ('Height', ctypes.c_size_t),
                        ('Depth', ctypes.c_size_t), ('Format', ctypes.c_int),
                        ('NumChannels', ctypes.c_uint), ('Flags', ctypes.c_uint)]
        d = D3(1024, 1024, 2, 0x20, 4, 0)   # float4: 16 B per texel
        arr = ctypes.c_void_p()
        check(lib.cuArray3DCreate_v2(ctypes.byref(arr), ctypes.byref(d)))
        r['after_array'] = cu.stats()[1]
        check(lib.cuArrayDestroy(arr))
        d = D3(256, 256, 0, 0x01, 1, 0)     # uint8, 3 levels: 64K + 16K + 4K
        mip = ctypes.c_void_p()
        check(lib.cuMipmappedArrayCreate(ctypes.byref(mip), ctypes.byref(d), 3))
        r['after_mip'] = cu.stats()[1]
        check(lib.cuMipmappedArrayDestroy(mip))
        mod = ctypes.c_void_p()
        check(lib.cuModuleLoadData(ctypes.byref(mod), b'vgpu-sim'))
        r['after_module'] = cu.stats()[1]
        check(lib.cuModuleUnload(mod))
        check(lib.cuDevicePrimaryCtxRelease_v2(0))
        r['after_release'] = cu.stats()[1]
        out(r)
    """, simdir, env_for(shm, VGPU_SIM_MEM="1G"))
    assert res["after_ctx"] == OVERHEAD
    assert res["info0"] == [1024 * MiB - OVERHEAD, 1024 * MiB]
    assert res["after_alloc"] == OVERHEAD + 512 * MiB
    assert res["oom"] == 2
    assert res["info1"][0] == 1024 * MiB - OVERHEAD - 512 * MiB
    assert bytes.fromhex(res["copy"]) == b"\x07" * 16 + b"hello"
    assert res["copy_oob"] == 1
    assert res["after_free"] == OVERHEAD
    assert res["double_free"] == 1
    assert res["pitch"] == 1024
    assert res["after_pitch"] == OVERHEAD + 1024 * 100
    assert res["after_managed"] == OVERHEAD + 8 * MiB
    assert res["after_array"] == OVERHEAD + 1024 * 1024 * 2 * 16
    assert res["after_mip"] == OVERHEAD + 65536 + 16384 + 4096
    assert res["after_module"] == OVERHEAD + 2 * MiB
    assert res["after_release"] == 0


def test_context_overhead_once_per_process(simdir: Path, shm: str) -> None:
    res = run_py("""
        r = {}
        check(lib.cuInit(0))
        c1, c2, cur = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        check(lib.cuCtxCreate_v2(ctypes.byref(c1), 0, 0))
        r['one'] = cu.stats()[1]
        check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(c2), 0))
        r['two'] = cu.stats()[1]
        check(lib.cuCtxGetCurrent(ctypes.byref(cur)))
        r['cur_is_c1'] = cur.value == c1.value
        check(lib.cuCtxPushCurrent_v2(c2))
        rc, p = cu.alloc(64 * MiB); check(rc)
        check(lib.cuCtxPopCurrent_v2(ctypes.byref(cur)))
        r['popped_c2'] = cur.value == c2.value
        check(lib.cuCtxDestroy_v2(c1))
        r['destroyed_one'] = cu.stats()[1]
        r['stale'] = lib.cuCtxPushCurrent_v2(c1)
        r['no_ctx_alloc'] = cu.alloc(MiB)[0]
        check(lib.cuDevicePrimaryCtxReset_v2(0))
        r['after_reset'] = cu.stats()[1]
        out(r)
    """, simdir, env_for(shm))
    assert res["one"] == OVERHEAD
    assert res["two"] == OVERHEAD
    assert res["cur_is_c1"]
    assert res["popped_c2"]
    assert res["destroyed_one"] == OVERHEAD + 64 * MiB
    assert res["stale"] == 201
    assert res["no_ctx_alloc"] == 201
    assert res["after_reset"] == 0


def test_vmm_and_pools(simdir: Path, shm: str) -> None:
    res = run_py("""
        r = {}
        cu.init_ctx()
        base = cu.stats()[1]
        class Prop(ctypes.Structure):
            _fields_ = [('type', ctypes.c_int), ('handleTypes', ctypes.c_int),
                        ('locType', ctypes.c_int), ('locId', ctypes.c_int),
                        ('win32', ctypes.c_void_p), ('flags', ctypes.c_ubyte * 8)]
        class Access(ctypes.Structure):
            _fields_ = [('locType', ctypes.c_int), ('locId', ctypes.c_int), ('flags', ctypes.c_int)]
        prop = Prop(1, 0, 1, 0)
        g = ctypes.c_size_t()
        check(lib.cuMemGetAllocationGranularity(ctypes.byref(g), ctypes.byref(prop), 0))
        r['gran'] = g.value
        h = ctypes.c_uint64()
        r['unaligned'] = lib.cuMemCreate(ctypes.byref(h), 3 * MiB, ctypes.byref(prop), 0)
        check(lib.cuMemCreate(ctypes.byref(h), 8 * MiB, ctypes.byref(prop), 0))
        r['created'] = cu.stats()[1] - base
        va = ctypes.c_uint64()
        check(lib.cuMemAddressReserve(ctypes.byref(va), 16 * MiB, 0, 0, 0))
        check(lib.cuMemMap(va.value, 8 * MiB, 0, h.value, 0))
        acc = Access(1, 0, 3)
        check(lib.cuMemSetAccess(va.value, 8 * MiB, ctypes.byref(acc), 1))
        check(lib.cuMemRelease(h.value))
        r['released_mapped'] = cu.stats()[1] - base
        check(lib.cuMemUnmap(va.value, 8 * MiB))
        r['unmapped'] = cu.stats()[1] - base
        check(lib.cuMemAddressFree(va.value, 16 * MiB))

        # stream-ordered: default threshold 0 -> freed memory returns at sync
        s = ctypes.c_void_p()
        check(lib.cuStreamCreate(ctypes.byref(s), 0))
        p = ctypes.c_uint64()
        check(lib.cuMemAllocAsync(ctypes.byref(p), 32 * MiB, s))
        r['async'] = cu.stats()[1] - base
        check(lib.cuMemFreeAsync(p.value, s))
        r['async_freed_unsynced'] = cu.stats()[1] - base
        check(lib.cuStreamSynchronize(s))
        r['async_synced'] = cu.stats()[1] - base

        class PoolProps(ctypes.Structure):
            _fields_ = [('allocType', ctypes.c_int), ('handleTypes', ctypes.c_int),
                        ('locType', ctypes.c_int), ('locId', ctypes.c_int),
                        ('win32', ctypes.c_void_p), ('maxSize', ctypes.c_size_t),
                        ('usage', ctypes.c_ushort), ('reserved', ctypes.c_ubyte * 54)]
        pool = ctypes.c_void_p()
        check(lib.cuMemPoolCreate(ctypes.byref(pool), ctypes.byref(PoolProps(1, 0, 1, 0))))
        thr = ctypes.c_uint64(64 * MiB)
        check(lib.cuMemPoolSetAttribute(pool, 4, ctypes.byref(thr)))
        check(lib.cuMemAllocFromPoolAsync(ctypes.byref(p), 16 * MiB, pool, s))
        check(lib.cuMemFreeAsync(p.value, s))
        check(lib.cuStreamSynchronize(s))
        r['pool_kept'] = cu.stats()[1] - base
        v = ctypes.c_uint64()
        check(lib.cuMemPoolGetAttribute(pool, 5, ctypes.byref(v))); r['reserved_cur'] = v.value
        check(lib.cuMemPoolGetAttribute(pool, 7, ctypes.byref(v))); r['used_cur'] = v.value
        check(lib.cuMemPoolGetAttribute(pool, 8, ctypes.byref(v))); r['used_high'] = v.value
        check(lib.cuMemAllocFromPoolAsync(ctypes.byref(p), 8 * MiB, pool, s))
        r['pool_reuse'] = cu.stats()[1] - base
        check(lib.cuMemFreeAsync(p.value, s))
        check(lib.cuMemPoolTrimTo(pool, 0))
        r['pool_trimmed'] = cu.stats()[1] - base
        check(lib.cuMemPoolDestroy(pool))
        out(r)
    """, simdir, env_for(shm))
    assert res["gran"] == 2 * MiB
    assert res["unaligned"] == 1
    assert res["created"] == 8 * MiB
    assert res["released_mapped"] == 8 * MiB  # still mapped: physically held
    assert res["unmapped"] == 0
    assert res["async"] == 32 * MiB
    assert res["async_freed_unsynced"] == 32 * MiB
    assert res["async_synced"] == 0
    assert res["pool_kept"] == 16 * MiB
    assert res["reserved_cur"] == 16 * MiB
    assert res["used_cur"] == 0
    assert res["used_high"] == 16 * MiB
    assert res["pool_reuse"] == 16 * MiB
    assert res["pool_trimmed"] == 0


def test_sleep_kernel_timing(simdir: Path, shm: str) -> None:
    res = run_py("""
        cu.init_ctx(); fn = cu.sleep_fn()
        a, b = cu.event(), cu.event()
        t0 = time.monotonic()
        check(lib.cuEventRecord(a, None))
        check(cu.launch_sleep(fn, 20_000_000))
        check(lib.cuEventRecord(b, None))
        launch_s = time.monotonic() - t0
        query = lib.cuEventQuery(b)
        check(lib.cuEventSynchronize(b))
        wall = time.monotonic() - t0
        out({'launch_s': launch_s, 'query': query, 'wall': wall, 'ms': cu.elapsed_ms(a, b),
             'busy': cu.stats()[0], 'stream_query': lib.cuStreamQuery(None)})
    """, simdir, env_for(shm))
    assert res["launch_s"] < 0.015  # asynchronous: returns before the 20 ms kernel ends
    assert res["query"] == 600
    assert 19.9 <= res["ms"] <= 25.0
    assert 0.0199 <= res["wall"] < 0.2
    assert 19_900_000 <= res["busy"] <= 25_000_000
    assert res["stream_query"] == 0


def test_graph_capture_and_streams(simdir: Path, shm: str) -> None:
    res = run_py("""
        r = {}
        cu.init_ctx(); fn = cu.sleep_fn()
        s = ctypes.c_void_p(); check(lib.cuStreamCreate(ctypes.byref(s), 0))
        check(lib.cuStreamBeginCapture_v2(s, 0))
        st = ctypes.c_int()
        check(lib.cuStreamIsCapturing(s, ctypes.byref(st)))
        r['capturing'] = st.value
        for _ in range(3):
            check(cu.launch_sleep(fn, 5_000_000, s.value))
        # synchronizing the capturing stream fails and invalidates the capture
        r['sync_capturing'] = lib.cuStreamSynchronize(s)
        check(lib.cuStreamIsCapturing(s, ctypes.byref(st))); r['invalidated'] = st.value
        r['launch_invalidated'] = cu.launch_sleep(fn, 5_000_000, s.value)
        g = ctypes.c_void_p()
        r['end_invalidated'] = lib.cuStreamEndCapture(s, ctypes.byref(g))
        r['no_graph'] = g.value is None
        check(lib.cuStreamBeginCapture_v2(s, 0))
        for _ in range(3):
            check(cu.launch_sleep(fn, 5_000_000, s.value))
        check(lib.cuStreamEndCapture(s, ctypes.byref(g)))
        check(lib.cuStreamIsCapturing(s, ctypes.byref(st))); r['after'] = st.value
        r['busy_captured'] = cu.stats()[0]
        ex = ctypes.c_void_p(); check(lib.cuGraphInstantiateWithFlags(ctypes.byref(ex), g, 0))
        a, b = cu.event(), cu.event()
        check(lib.cuEventRecord(a, s))
        check(lib.cuGraphLaunch(ex, s))
        check(lib.cuEventRecord(b, s))
        check(lib.cuStreamSynchronize(s))
        r['graph_ms'] = cu.elapsed_ms(a, b)
        # cross-stream dependency: s2 waits for s's event
        s2 = ctypes.c_void_p(); check(lib.cuStreamCreate(ctypes.byref(s2), 0))
        c, d = cu.event(), cu.event()
        check(cu.launch_sleep(fn, 10_000_000, s.value)); check(lib.cuEventRecord(c, s))
        check(lib.cuStreamWaitEvent(s2, c, 0)); check(lib.cuEventRecord(d, s2))
        check(lib.cuEventSynchronize(d))
        r['wait_ok'] = lib.cuEventQuery(c)
        check(lib.cuGraphExecDestroy(ex)); check(lib.cuGraphDestroy(g))
        check(lib.cuStreamDestroy_v2(s)); check(lib.cuStreamDestroy_v2(s2))
        r['bad_fn'] = lib.cuLaunchKernel(0xdeadbeef, 1, 1, 1, 1, 1, 1, 0, None, None, None)
        r['bad_stream'] = lib.cuStreamSynchronize(0xdeadbeef)
        r['bad_event'] = lib.cuEventQuery(0x1234)
        out(r)
    """, simdir, env_for(shm))
    assert res["capturing"] == 1
    assert res["after"] == 0
    assert res["sync_capturing"] == 900
    assert res["invalidated"] == 2
    assert (res["launch_invalidated"], res["end_invalidated"], res["no_graph"]) == (901, 901, True)
    assert res["busy_captured"] == 0
    assert 14.9 <= res["graph_ms"] <= 22
    assert res["wait_ok"] == 0
    assert res["bad_fn"] == CUDA_ERROR_INVALID_HANDLE
    assert res["bad_stream"] == CUDA_ERROR_INVALID_HANDLE
    assert res["bad_event"] == CUDA_ERROR_INVALID_HANDLE


def test_capture_modes_and_what_they_forbid(simdir: Path, shm: str) -> None:
    """CUDA's rules for other calls during a stream capture (sim_ctx.c): a
    potentially unsafe call (a query, a synchronize, cuMemAlloc) from a
    thread in GLOBAL mode while another thread captures in GLOBAL mode fails
    and invalidates that capture; RELAXED and THREAD_LOCAL threads may; a
    capture's own thread may not unless it began the capture RELAXED; and
    some calls conflict whatever the modes: querying a captured event, work
    on the legacy stream beside a capturing blocking stream."""
    res = run_py("""
        import threading
        ctx = cu.init_ctx(); fn = cu.sleep_fn()

        def other(f):
            box = {}
            def body():
                check(lib.cuCtxSetCurrent(ctx))
                box['r'] = f()
            t = threading.Thread(target=body); t.start(); t.join()
            return box['r']

        def stream(flags):
            s = ctypes.c_void_p(); check(lib.cuStreamCreate(ctypes.byref(s), flags)); return s.value

        def status(s):
            st = ctypes.c_int()
            check(lib.cuStreamIsCapturing(s, ctypes.byref(st)))
            return st.value

        def end(s):
            g = ctypes.c_void_p(); return lib.cuStreamEndCapture(s, ctypes.byref(g))

        def exchange(mode):
            m = ctypes.c_int(mode); rc = lib.cuThreadExchangeStreamCaptureMode(ctypes.byref(m))
            return [rc, m.value]

        def alloc():
            rc, p = cu.alloc(1 << 20)
            if rc == 0:
                check(lib.cuMemFree_v2(p))
            return rc

        ev = cu.event(); check(lib.cuEventRecord(ev, None)); check(lib.cuEventSynchronize(ev))
        s, b = stream(1), stream(0)  # non-blocking, blocking
        flags = ctypes.c_uint()
        r = {'flags': [lib.cuStreamGetFlags(s, ctypes.byref(flags)), flags.value]}
        check(lib.cuStreamGetFlags(b, ctypes.byref(flags))); r['flags'].append(flags.value)
        # GLOBAL capture, another thread in GLOBAL mode: refused, capture invalidated
        unsafe = (('query', lambda: lib.cuEventQuery(ev)), ('sync', lambda: lib.cuCtxSynchronize()),
                  ('alloc', alloc))
        for name, call in unsafe:
            check(lib.cuStreamBeginCapture_v2(s, 0))
            r['global_' + name] = [other(call), status(s), end(s)]
        # ... but not from a thread that switched to RELAXED or THREAD_LOCAL
        for mode in (2, 1):
            check(lib.cuStreamBeginCapture_v2(s, 0))
            calls = other(lambda: [exchange(mode), lib.cuEventQuery(ev), alloc(),
                                   lib.cuStreamQuery(None), exchange(0)])
            r[f'mode{mode}'] = calls + [status(s), end(s)]
        # THREAD_LOCAL capture: other threads are free, its own thread is not
        check(lib.cuStreamBeginCapture_v2(s, 1))
        r['tl_other'] = [other(lambda: lib.cuEventQuery(ev)), status(s)]
        r['tl_own'] = [lib.cuEventQuery(ev), status(s), end(s)]
        # RELAXED capture: its own thread may query
        check(lib.cuStreamBeginCapture_v2(s, 2))
        r['relaxed_own'] = [lib.cuEventQuery(ev), status(s), end(s)]
        # a record into a capturing stream from another thread joins the capture;
        # the event is then a captured one: querying it conflicts
        e2 = cu.event()
        check(lib.cuStreamBeginCapture_v2(s, 2))
        r['captured_event'] = [other(lambda: lib.cuEventRecord(e2, s)), status(s),
                               lib.cuEventQuery(e2), status(s), end(s)]
        check(lib.cuEventRecord(e2, s)); check(lib.cuEventSynchronize(e2))
        r['recorded_again'] = lib.cuEventQuery(e2)
        # the legacy stream beside a capturing blocking stream, not beside a non-blocking one
        check(lib.cuStreamBeginCapture_v2(s, 2))
        r['legacy_nonblocking'] = [cu.launch_sleep(fn, 1000, None), status(s), end(s)]
        check(lib.cuStreamBeginCapture_v2(b, 2))
        st = ctypes.c_int()
        r['legacy_blocking'] = [lib.cuStreamIsCapturing(None, ctypes.byref(st)), status(b),
                                cu.launch_sleep(fn, 1000, None), status(b), end(b)]
        # only the thread that began a non-relaxed capture ends it
        check(lib.cuStreamBeginCapture_v2(s, 0))
        r['wrong_thread'] = [other(lambda: end(s)), status(s), end(s)]
        r['bad_mode'] = exchange(7)
        check(lib.cuCtxSynchronize())
        out(r)
    """, simdir, env_for(shm))
    unsupported, invalidated, implicit, captured, wrong_thread = 900, 901, 906, 907, 908
    assert res["flags"] == [0, 1, 0]
    active, gone = 1, 2
    for name in ("query", "sync", "alloc"):
        assert res["global_" + name] == [unsupported, gone, invalidated], name
    assert res["mode2"] == [[0, 0], 0, 0, 0, [0, 2], active, 0]
    assert res["mode1"] == [[0, 0], 0, 0, 0, [0, 1], active, 0]
    assert res["tl_other"] == [0, active]
    assert res["tl_own"] == [unsupported, gone, invalidated]
    assert res["relaxed_own"] == [0, active, 0]
    assert res["captured_event"] == [0, active, captured, gone, invalidated]
    assert res["recorded_again"] == 0
    assert res["legacy_nonblocking"] == [0, active, 0]
    assert res["legacy_blocking"] == [implicit, active, implicit, gone, invalidated]
    assert res["wrong_thread"] == [wrong_thread, active, 0]
    assert res["bad_mode"] == [1, 7]


_SATURATE = """
    cu.init_ctx(); fn = cu.sleep_fn()
    start, end = float(os.environ['T_START']), float(os.environ['T_END'])
    a, b = cu.event(), cu.event()
    while time.time() < start:
        time.sleep(0.001)
    b0 = cu.stats()[0]
    check(lib.cuEventRecord(a, None))
    while time.time() < end:
        for _ in range(20):
            check(cu.launch_sleep(fn, 1_000_000))
        ev = cu.event(); check(lib.cuEventRecord(ev, None))
        while lib.cuEventQuery(ev) != 0 and time.time() < end:
            time.sleep(0.002)
        check(lib.cuEventDestroy_v2(ev))
    check(lib.cuEventRecord(b, None)); check(lib.cuEventSynchronize(b))
    out({'pid': os.getpid(), 'busy': cu.stats()[0] - b0, 'ms': cu.elapsed_ms(a, b)})
"""


def test_two_processes_share_the_device(simdir: Path, shm: str) -> None:
    start = time.time() + 0.5
    env = env_for(shm, T_START=str(start), T_END=str(start + 1.0))
    procs = [spawn_py(_SATURATE, simdir, env) for _ in range(2)]
    res = [result_of(p) for p in procs]
    busy = [r["busy"] for r in res]
    total = sum(busy)
    assert total > 0.7e9  # the device was kept busy (handoffs cost a little)
    for r in res:
        share = r["busy"] / total
        assert abs(share - 0.5) <= 0.05, res
        # each process's own timing includes its neighbour's slices
        assert r["ms"] * 1e6 / r["busy"] > 1.7, res
    # the ground truth survives the processes' exit
    cuda = load_cuda(simdir)
    with shm_env(shm):
        got = ctypes.c_uint64()
        assert cuda.vgpuSimProcessStats(res[0]["pid"], ctypes.byref(got), None) == 0
        assert got.value >= busy[0]


def test_get_proc_address(simdir: Path) -> None:
    cuda = load_cuda(simdir)

    def addr(name: str) -> int:
        return ctypes.cast(getattr(cuda, name), ctypes.c_void_p).value or 0

    def gpa(name: str, ver: int, flags: int = 0) -> tuple[int, int, int]:
        fn, status = ctypes.c_void_p(), ctypes.c_int(-1)
        rc = cuda.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), ver, flags,
                                      ctypes.byref(status))
        return rc, fn.value or 0, status.value

    assert gpa("cuMemAlloc", 12000) == (0, addr("cuMemAlloc_v2"), 0)
    assert gpa("cuMemGetInfo", 12000)[1] == addr("cuMemGetInfo_v2")
    assert gpa("cuCtxCreate", 12040)[1] == addr("cuCtxCreate_v2")
    assert gpa("cuCtxCreate", 12050)[1] == addr("cuCtxCreate_v4")
    assert gpa("cuEventElapsedTime", 12070)[1] == addr("cuEventElapsedTime")
    assert gpa("cuEventElapsedTime", 12080)[1] == addr("cuEventElapsedTime_v2")
    assert gpa("cuGetProcAddress", 11080)[1] == addr("cuGetProcAddress")
    assert gpa("cuGetProcAddress", 12000)[1] == addr("cuGetProcAddress_v2")
    assert gpa("cuLaunchKernel", 12000, 2)[1] == addr("cuLaunchKernel_ptsz")
    assert gpa("cuLaunchKernel", 12000, 1)[1] == addr("cuLaunchKernel")
    assert gpa("cuStreamBeginCapture", 12000, 2)[1] == addr("cuStreamBeginCapture_v2_ptsz")
    exchange = "cuThreadExchangeStreamCaptureMode"
    assert gpa(exchange, 12000)[1] == addr(exchange)
    assert gpa("cuStreamGetFlags", 12000)[1] == addr("cuStreamGetFlags")
    assert gpa("cuMemAlloc", 12000, 2)[1] == addr("cuMemAlloc_v2")  # no ptsz variant
    assert gpa("cuNoSuchThing", 12000) == (CUDA_ERROR_NOT_FOUND, 0, 1)
    assert gpa("cuMemCreate", 9000) == (CUDA_ERROR_NOT_FOUND, 0, 2)
    # v1 entry point, and calls before cuInit
    fn = ctypes.c_void_p()
    assert cuda.cuGetProcAddress(b"cuInit", ctypes.byref(fn), 12000, ctypes.c_uint64(0)) == 0
    assert fn.value == addr("cuInit")


def test_pynvml_reads_the_device(simdir: Path, shm: str) -> None:
    import pynvml

    holder = spawn_py("""
        cu.init_ctx(); fn = cu.sleep_fn()
        rc, p = cu.alloc(100 * MiB); check(rc)
        for _ in range(40):
            check(cu.launch_sleep(fn, 20_000_000))
        print('READY', flush=True)
        check(lib.cuCtxSynchronize())
    """, simdir, env_for(shm))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "READY"
        time.sleep(0.4)
        load_nvml(simdir)
        with shm_env(shm):
            pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            assert pynvml.nvmlDeviceGetCount() == 1
            name = pynvml.nvmlDeviceGetName(h)
            assert (name.decode() if isinstance(name, bytes) else name) == "vgpu simulated GPU"
            uuid = pynvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            hexes = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
            assert re.fullmatch("GPU-" + hexes, uuid)
            expect_used = OVERHEAD + 2 * MiB + 100 * MiB
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            total = 16 << 30
            assert (mem.total, mem.used, mem.free) == (total, expect_used, total - expect_used)
            mem2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            assert mem2.used == expect_used
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(h)
            assert [(p.pid, p.usedGpuMemory) for p in procs] == [(holder.pid, expect_used)]
            samples = pynvml.nvmlDeviceGetProcessUtilization(h, 0)
            mine = [s for s in samples if s.pid == holder.pid]
            assert mine, [(s.pid, s.smUtil) for s in samples]
            assert mine[0].smUtil >= 80, [(s.pid, s.smUtil) for s in samples]
            later = pynvml.nvmlDeviceGetProcessUtilization(h, mine[0].timeStamp - 200_000)
            assert any(s.pid == holder.pid for s in later)
            assert pynvml.nvmlDeviceGetUtilizationRates(h).gpu >= 80
            drv = pynvml.nvmlSystemGetDriverVersion()
            assert re.fullmatch(r"\d+\.\d+\.\d+", drv.decode() if isinstance(drv, bytes) else drv)
        finally:
            pynvml.nvmlShutdown()
    finally:
        holder.kill()
        holder.wait()


def test_sigkilled_process_is_reaped_and_device_recovers(simdir: Path, shm: str) -> None:
    victim = spawn_py("""
        cu.init_ctx(); fn = cu.sleep_fn()
        rc, p = cu.alloc(1024 * MiB); check(rc)
        check(cu.launch_sleep(fn, 10_000_000_000))   # holds the device for 10 s
        print('READY', flush=True)
        time.sleep(60)
    """, simdir, env_for(shm))
    assert victim.stdout is not None
    assert victim.stdout.readline().strip() == "READY"
    time.sleep(0.1)
    cuda = load_cuda(simdir)
    used = ctypes.c_uint64()
    with shm_env(shm):
        assert cuda.vgpuSimDeviceStats(0, None, ctypes.byref(used), None) == 0
        assert used.value == OVERHEAD + 2 * MiB + 1024 * MiB
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert cuda.vgpuSimDeviceStats(0, None, ctypes.byref(used), None) == 0
        assert used.value == 0
    res = run_py("""
        cu.init_ctx(); fn = cu.sleep_fn()
        t0 = time.monotonic()
        check(cu.launch_sleep(fn, 1_000_000)); check(lib.cuCtxSynchronize())
        out({'s': time.monotonic() - t0, 'free': cu.mem_info()[0]})
    """, simdir, env_for(shm))
    assert res["s"] < 0.5  # the dead holder did not hang the device
    assert res["free"] == (16 << 30) - OVERHEAD - 2 * MiB


def test_fork_child_fails_cleanly_and_init_errors(simdir: Path, shm: str) -> None:
    res = run_py("""
        r = {'before_init': lib.cuDeviceGetCount(ctypes.byref(ctypes.c_int()))}
        r['bad_flags'] = lib.cuInit(1)
        cu.init_ctx()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            n = ctypes.c_int()
            rc = lib.cuDeviceGetCount(ctypes.byref(n)) * 1000 + lib.cuInit(0)
            os.write(wfd, str(rc).encode()); os._exit(0)
        os.waitpid(pid, 0)
        r['child'] = int(os.read(rfd, 64))
        n = ctypes.c_int()
        check(lib.cuDeviceGetCount(ctypes.byref(n)))
        r['parent_count'] = n.value
        out(r)
    """, simdir, env_for(shm))
    assert res["before_init"] == CUDA_ERROR_NOT_INITIALIZED
    assert res["bad_flags"] == 1
    assert res["child"] == CUDA_ERROR_NOT_INITIALIZED * 1000 + CUDA_ERROR_NOT_INITIALIZED
    assert res["parent_count"] == 1


def test_concurrent_creation_agrees(simdir: Path, shm: str) -> None:
    code = """
        check(lib.cuInit(0))
        t = ctypes.c_size_t(); check(lib.cuDeviceTotalMem_v2(ctypes.byref(t), 0))
        u = ctypes.create_string_buffer(16); check(lib.cuDeviceGetUuid_v2(u, 0))
        out([t.value, u.raw.hex()])
    """
    env = env_for(shm, VGPU_SIM_MEM="3G", VGPU_SIM_DEVICES="2")
    procs = [spawn_py(code, simdir, env) for _ in range(4)]
    res = [result_of(p) for p in procs]
    assert all(r == res[0] for r in res)
    assert res[0][0] == 3 << 30
    assert os.path.exists(f"/dev/shm/{shm}")


def test_devices_have_their_own_memory_and_time_slices(simdir: Path, shm: str) -> None:
    """VGPU_SIM_DEVICES=2: a full device 0 leaves device 1 all its memory,
    and kernels on the two devices run at the same time, while two contexts
    on one device take turns (the serialized pair takes the sum of its
    kernels: a lower bound that no machine load can break)."""
    res = run_py("""
        check(lib.cuInit(0))
        n = ctypes.c_int(); check(lib.cuDeviceGetCount(ctypes.byref(n)))
        ctx, fns = [], []
        for d in (0, 1, 0):
            c = ctypes.c_void_p(); check(lib.cuCtxCreate_v2(ctypes.byref(c), 0, d))
            ctx.append(c.value); fns.append(cu.sleep_fn())
        r = {'n': n.value}
        check(lib.cuCtxSetCurrent(ctx[0]))
        free0 = cu.mem_info()[0]
        rc, p = cu.alloc(free0); check(rc)
        r['full0'] = cu.alloc(2 * MiB)[0]
        r['info0'] = cu.mem_info()
        check(lib.cuCtxSetCurrent(ctx[1]))
        r['info1'] = cu.mem_info()
        rc, p1 = cu.alloc(256 * MiB); check(rc)
        r['mem'] = [cu.dev_stats(0)[1], cu.dev_stats(1)[1]]

        def pair(a, b):
            t0 = time.monotonic()
            for k in (a, b):
                check(lib.cuCtxSetCurrent(ctx[k])); check(cu.launch_sleep(fns[k], 300_000_000))
            for k in (a, b):
                check(lib.cuCtxSetCurrent(ctx[k])); check(lib.cuCtxSynchronize())
            return time.monotonic() - t0
        r['two_devices_s'] = pair(0, 1)
        r['one_device_s'] = pair(0, 2)
        r['busy'] = [cu.dev_stats(0)[0], cu.dev_stats(1)[0]]
        out(r)
    """, simdir, env_for(shm, VGPU_SIM_MEM="1G", VGPU_SIM_DEVICES="2",
                         VGPU_SIM_CTX_OVERHEAD=str(64 * MiB)))
    assert res["n"] == 2
    assert res["full0"] == 2  # CUDA_ERROR_OUT_OF_MEMORY on device 0 ...
    assert res["info0"] == [0, 1 << 30]
    assert res["info1"] == [(1 << 30) - 64 * MiB - 2 * MiB, 1 << 30]  # ... not on device 1
    assert res["mem"] == [1 << 30, 64 * MiB + 2 * MiB + 256 * MiB]
    assert res["two_devices_s"] < 0.55, res  # side by side: 0.3 s, not 0.6
    assert res["one_device_s"] >= 0.6, res  # one device: one after the other
    assert 0.9e9 <= res["busy"][0] < 1.2e9, res
    assert 0.3e9 <= res["busy"][1] < 0.4e9, res


_VISIBLE = """
    r = {'init': lib.cuInit(0)}
    if r['init'] == 0:
        n = ctypes.c_int(); check(lib.cuDeviceGetCount(ctypes.byref(n))); r['n'] = n.value
        r['uuids'] = []
        for d in range(n.value):
            u = ctypes.create_string_buffer(16); check(lib.cuDeviceGetUuid_v2(u, d))
            r['uuids'].append(u.raw.hex())
        r['past_end'] = lib.cuDeviceGet(ctypes.byref(ctypes.c_int()), n.value)
        c = ctypes.c_void_p(); check(lib.cuCtxCreate_v2(ctypes.byref(c), 0, 0))
        got = ctypes.c_int(-1); check(lib.cuCtxGetDevice(ctypes.byref(got)))
        r['ordinal'] = got.value
        rc, p = cu.alloc(64 * MiB); check(rc)
        r['mem'] = [cu.dev_stats(d)[1] for d in range(3)]
    out(r)
"""


def _uuid_text(hexes: str) -> str:
    h = hexes
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def test_cuda_visible_devices_picks_and_orders_devices(simdir: Path, shm: str) -> None:
    """The simulated driver reads CUDA_VISIBLE_DEVICES at cuInit as the real
    one does: indices or UUID prefixes, in the order given, up to the first
    entry that names no device (or one already named); none left is
    CUDA_ERROR_NO_DEVICE. The process's ordinals then name those devices,
    its memory lands on them, and the shared device's figures (NVML) keep
    the physical numbering."""
    base = {"VGPU_SIM_DEVICES": "3", "VGPU_SIM_CTX_OVERHEAD": "0"}
    every = run_py(_VISIBLE, simdir, env_for(shm, **base))
    assert every["n"] == 3
    assert len(set(every["uuids"])) == 3
    phys = every["uuids"]

    def run(cvd: str) -> dict[str, object]:
        got: dict[str, object] = run_py(_VISIBLE, simdir,
                                        env_for(shm, CUDA_VISIBLE_DEVICES=cvd, **base))
        return got

    one = run("2")
    assert one["uuids"] == [phys[2]]
    assert one["past_end"] == CUDA_ERROR_INVALID_DEVICE
    assert one["ordinal"] == 0
    assert one["mem"] == [0, 0, 64 * MiB]
    by_uuid = run(f"{_uuid_text(phys[1])[:12]}, 0")
    assert by_uuid["uuids"] == [phys[1], phys[0]]
    assert by_uuid["mem"] == [0, 64 * MiB, 0]  # ordinal 0 is physical device 1
    assert run("1,7,0")["uuids"] == [phys[1]]  # stops at the device that does not exist
    assert run("0,0,1")["uuids"] == [phys[0]]
    assert run("")["init"] == CUDA_ERROR_NO_DEVICE
    assert run("-1")["init"] == CUDA_ERROR_NO_DEVICE
