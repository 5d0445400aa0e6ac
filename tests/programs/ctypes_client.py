"""ctypes_client - the CUDA runtime's way of reaching the driver, in Python:
dlopen libcuda.so.1, dlsym cuGetProcAddress_v2, ask it for cuGetProcAddress
itself, then fetch every entry point through that.

    python ctypes_client.py N NS [ALLOC_BYTES...] [--ptsz]

Same work and JSON line as tests/c/client_basic.c. With --ptsz, entry points
are fetched with CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM (the _ptsz
variants) and kernels go to the per-thread default stream.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

CU_GET_PROC_ADDRESS_DEFAULT = 0
CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM = 2
R = ctypes.c_int
P = ctypes.c_void_p


def main(argv: list[str]) -> int:
    ptsz = "--ptsz" in argv
    args = [a for a in argv if not a.startswith("--")]
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    n, ns = int(args[0]), int(args[1])
    sizes = [int(a) for a in args[2:]]
    cuda = ctypes.CDLL("libcuda.so.1")
    gpa2_t = ctypes.CFUNCTYPE(R, ctypes.c_char_p, ctypes.POINTER(P), ctypes.c_int, ctypes.c_uint64,
                              ctypes.POINTER(ctypes.c_int))
    gpa2 = gpa2_t(("cuGetProcAddress_v2", cuda))
    status = ctypes.c_int(0)
    p = P()
    gpa2(b"cuGetProcAddress", ctypes.byref(p), 12000, 0, ctypes.byref(status))
    gpa = gpa2_t(p.value) if p.value else gpa2
    flags = CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM if ptsz else CU_GET_PROC_ADDRESS_DEFAULT

    def fn(name: str, *argtypes: object) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
        q = P()
        rc = gpa(name.encode(), ctypes.byref(q), 12000, flags, ctypes.byref(status))
        if rc != 0 or not q.value:
            raise RuntimeError(f"cuGetProcAddress({name}) -> {rc}")
        return ctypes.CFUNCTYPE(R, *argtypes)(q.value)  # type: ignore[arg-type]

    u64 = ctypes.c_uint64
    t0 = time.monotonic_ns()
    init_rc = fn("cuInit", ctypes.c_uint)(0)
    out: dict[str, object] = {"pid": os.getpid(), "init_rc": init_rc,
                              "init_ns": time.monotonic_ns() - t0, "ptsz": ptsz}
    if init_rc != 0:
        print(json.dumps(out), flush=True)
        return 1
    dev = ctypes.c_int(0)
    fn("cuDeviceGet", ctypes.POINTER(ctypes.c_int), ctypes.c_int)(ctypes.byref(dev), 0)
    ctx = P()
    ctx_rc = fn("cuDevicePrimaryCtxRetain", ctypes.POINTER(P), ctypes.c_int)(ctypes.byref(ctx), dev)
    out["ctx_rc"] = ctx_rc
    if ctx_rc != 0:
        print(json.dumps(out), flush=True)
        return 1
    fn("cuCtxSetCurrent", P)(ctx)
    alloc = fn("cuMemAlloc", ctypes.POINTER(u64), ctypes.c_size_t)
    free = fn("cuMemFree", u64)
    ptrs = [u64(0) for _ in sizes]
    alloc_rc: list[int] = [alloc(ctypes.byref(ptrs[i]), s) for i, s in enumerate(sizes)]
    out["alloc_rc"] = alloc_rc
    mfree, mtotal = ctypes.c_size_t(0), ctypes.c_size_t(0)
    fn("cuMemGetInfo", ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t))(
        ctypes.byref(mfree), ctypes.byref(mtotal))
    out["mem_free"], out["mem_total"] = mfree.value, mtotal.value
    mod, func = P(), P()
    fn("cuModuleLoadData", ctypes.POINTER(P), ctypes.c_char_p)(ctypes.byref(mod), b"vgpu-sim")
    fn("cuModuleGetFunction", ctypes.POINTER(P), P, ctypes.c_char_p)(
        ctypes.byref(func), mod, b"sim_sleep_ns")
    launch = fn("cuLaunchKernel", P, *([ctypes.c_uint] * 7), P, ctypes.POINTER(P),
                ctypes.POINTER(P))
    arg = u64(ns)
    params = (P * 1)(ctypes.cast(ctypes.byref(arg), P))
    l0 = time.monotonic_ns()
    launched, launch_rc = 0, 0
    for _ in range(n):
        launch_rc = launch(func, 1, 1, 1, 1, 1, 1, 0, None, params, None)
        if launch_rc:
            break
        launched += 1
    out["sync_rc"] = fn("cuCtxSynchronize")()
    out["launch_wall_ns"] = time.monotonic_ns() - l0
    out["launched"], out["launch_rc"] = launched, launch_rc
    hold = os.environ.get("CLIENT_HOLD_MS")
    if hold:
        time.sleep(int(hold) / 1000)
    out["free_rc"] = int(any(free(ptrs[i]) != 0 for i, rc in enumerate(alloc_rc) if rc == 0))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
