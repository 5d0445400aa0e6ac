"""PyTorch workloads for the H200 benchmarks, one JSON line of results each.

Run natively or under `vgpuctl run`; the harness (bench/h200.py) compares the
two in one run. Every mode warms up first, then measures for --seconds of
wall time, synchronising before reading the host clock.

Modes:
  matmul   4096x4096 bf16 matmul loop (SPEC.md's reference workload)
  big      16384x16384 bf16 matmuls, about 10 ms each on an H200
  graph    CUDA graph of 20 4096x4096 matmuls, replayed
  tiny     a loop of tiny elementwise ops (launch-bound)
  train    a small MLP training loop (launch and allocation counting)
  trainer  a transformer training loop: bf16 autocast, AdamW, the loss read
           back every few steps (the Python a real loop runs between steps)
  infer    a latency tenant: a request every --period-ms, each a small
           transformer's forward pass on a small batch; reports latency
           percentiles from arrival to result, and the GPU time it used
  memfill  allocate 64 MiB tensors until CUDA OOM, then report

With --sync-start, a mode prints {"ready": true} once warmed up and waits
for a line on stdin holding the unix time to start measuring at: several
tenants then measure the same window without guessing their start-up time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch


def _emit(result: dict[str, Any]) -> None:
    result["pid"] = os.getpid()
    print(json.dumps(result), flush=True)


ARGS: argparse.Namespace


def _wait_start() -> None:
    """After warm-up: wait for the common start time (tenants measure the
    same window), given up front (--start-at) or by the harness (--sync-start)."""
    torch.cuda.synchronize()
    if ARGS.sync_start:
        _emit({"ready": True})
        line = sys.stdin.readline()
        ARGS.start_at = float(line.strip() or 0)
    if ARGS.start_at:
        time.sleep(max(0.0, ARGS.start_at - time.time()))


def _timed_loop(step: Any, seconds: float, warmup: int, per_step: int) -> dict[str, Any]:
    """Warm up, wait for the common start time, then count iterations for
    `seconds`. With --timeline, record (t, iters) at every synchronisation
    to see a live change take effect."""
    for _ in range(warmup):
        step()
    _wait_start()
    t0 = time.perf_counter()
    wall0 = time.time()
    n = 0
    deadline = t0 + seconds
    timeline: list[tuple[float, int]] = []
    while True:
        step()
        n += 1
        if n % per_step == 0:
            torch.cuda.synchronize()
            now = time.perf_counter()
            if ARGS.timeline:
                timeline.append((round(now - t0, 4), n))
            if now >= deadline:
                break
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res: dict[str, Any] = {"iters": n, "seconds": dt, "rate": n / dt, "wall_start": wall0}
    if ARGS.timeline:
        res["timeline"] = timeline
    return res


def mode_matmul(args: argparse.Namespace, size: int = 4096) -> dict[str, Any]:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)

    def step() -> None:
        torch.matmul(a, b, out=out)

    r = _timed_loop(step, args.seconds, warmup=20, per_step=args.sync_every)
    r["tflops"] = r["rate"] * 2 * size**3 / 1e12
    return r


def mode_big(args: argparse.Namespace) -> dict[str, Any]:
    args.sync_every = 2
    return mode_matmul(args, size=16384)


def mode_graph(args: argparse.Namespace) -> dict[str, Any]:
    size = 4096
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(a)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            torch.matmul(a, b, out=out)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            torch.matmul(a, b, out=out)

    r = _timed_loop(g.replay, args.seconds, warmup=3, per_step=5)
    r["matmuls_per_s"] = r["rate"] * 20
    return r


def mode_tiny(args: argparse.Namespace) -> dict[str, Any]:
    x = torch.zeros(256, device="cuda")

    def step() -> None:
        x.add_(1.0)

    return _timed_loop(step, args.seconds, warmup=1000, per_step=1000)


def mode_train(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    ).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(256, 512, device="cuda")
    y = torch.randint(0, 10, (256,), device="cuda")
    losses = []
    before = _daemon_counts(args)
    prof_kernels = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
        events = prof.events()
        prof_kernels = sum(
            1
            for e in events
            if e.device_type == torch.autograd.DeviceType.CUDA
            and "memset" not in e.name.lower()
            and "memcpy" not in e.name.lower()
        )
        runtime_launches = sum(
            1
            for e in events
            if e.name
            in (
                "cudaLaunchKernel",
                "cudaLaunchKernelExC",
                "cuLaunchKernel",
                "cuLaunchKernelEx",
                "cudaGraphLaunch",
            )
        )
        from collections import Counter

        api = Counter(
            e.name
            for e in events
            if e.device_type != torch.autograd.DeviceType.CUDA
            and ("aunch" in e.name or e.name.startswith("cu"))
        )
        dev = Counter(
            e.name[:60] for e in events if e.device_type == torch.autograd.DeviceType.CUDA
        )
        breakdown = {"api": dict(api.most_common(25)), "device": dict(dev.most_common(40))}
    else:
        for _ in range(args.steps):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.cuda.synchronize()
        runtime_launches = None
        breakdown = None
    after = _daemon_counts(args)
    stats = torch.cuda.memory_stats()
    return {
        "steps": args.steps,
        "final_loss": float(loss),
        "profiler_kernels": prof_kernels,
        "profiler_launch_calls": runtime_launches,
        "profiler_breakdown": breakdown,
        "daemon_before": before,
        "daemon_after": after,
        "torch_segments_allocated": stats.get("segment.all.allocated"),
        "torch_segments_freed": stats.get("segment.all.freed"),
    }


def _transformer(d: int, heads: int, layers: int, vocab: int) -> torch.nn.Module:
    layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu",
                                             batch_first=True, norm_first=True)
    return torch.nn.Sequential(
        torch.nn.Embedding(vocab, d),
        torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
        torch.nn.LayerNorm(d),
        torch.nn.Linear(d, vocab),
    ).cuda()


def mode_trainer(args: argparse.Namespace) -> dict[str, Any]:
    """A transformer (6 layers, d=1024, 16 heads) trained on batches of
    16 x 512 tokens: bf16 autocast, AdamW, and the loss read back to the host
    every 5 steps, as a training loop logs it."""
    torch.manual_seed(0)
    vocab = 8192
    model = _transformer(1024, 16, 6, vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, vocab, (16, 512), device="cuda")
    y = torch.randint(0, vocab, (16, 512), device="cuda")
    steps = [0]
    last = [0.0]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab).float(), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps[0] += 1
        if steps[0] % 5 == 0:
            last[0] = float(loss.detach())  # the host waits for the GPU here

    r = _timed_loop(step, args.seconds, warmup=5, per_step=5)
    r["final_loss"] = last[0]
    r["tokens_per_s"] = r["rate"] * 16 * 512
    return r


def mode_infer(args: argparse.Namespace) -> dict[str, Any]:
    """A request every --period-ms: a 4-layer d=1024 transformer's forward
    pass on 16 sequences of 256 tokens, under no_grad and bf16, replayed from
    a CUDA graph (as serving stacks run it: the GPU's time, not Python's
    launches, is the request's cost), and its result read back. Latency is
    from the request's arrival (its slot on the schedule, so a late start
    counts) to the result on the host."""
    torch.manual_seed(0)
    vocab = 8192
    model = _transformer(1024, 16, 4, vocab).eval()
    x = torch.randint(0, vocab, (16, 256), device="cuda")
    start_ev = torch.cuda.Event(enable_timing=True)
    end_ev = torch.cuda.Event(enable_timing=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.cuda.stream(s):
            for _ in range(3):
                model(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(x).argmax(-1)

    def serve() -> float:
        start_ev.record()
        g.replay()
        end_ev.record()
        out.cpu()
        return float(start_ev.elapsed_time(end_ev)) / 1e3

    for _ in range(20):
        serve()
    _wait_start()
    period = args.period_ms / 1e3
    lat: list[float] = []
    gpu = 0.0
    t0 = time.perf_counter()
    nxt = t0
    while True:
        now = time.perf_counter()
        if now - t0 >= args.seconds:
            break
        if now < nxt:
            time.sleep(nxt - now)
        arrival = nxt
        nxt += period
        gpu += serve()
        lat.append(time.perf_counter() - arrival)
    dt = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3

    return {"served": len(lat), "seconds": dt, "rate": len(lat) / dt,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": lat[-1] * 1e3 if lat else None,
            "gpu_busy": gpu / dt, "gpu_ms_per_request": 1e3 * gpu / max(1, len(lat)),
            "period_ms": args.period_ms}


def _daemon_counts(args: argparse.Namespace) -> dict[str, Any] | None:
    """This process's launch/alloc counts as vgpud sees them (via vgpuctl)."""
    if not args.vgpuctl:
        return None
    import subprocess

    torch.cuda.synchronize()
    out = subprocess.run(
        [*args.vgpuctl.split(), "--json", "tree"], capture_output=True, text=True, check=True
    ).stdout
    pid = os.getpid()

    def find(node: dict[str, Any]) -> dict[str, Any] | None:
        for p in node.get("processes", []):
            if p.get("pid") == pid:
                return dict(p)
        for c in node.get("children", []):
            got = find(c)
            if got is not None:
                return got
        return None

    return find(json.loads(out))


def mode_memfill(args: argparse.Namespace) -> dict[str, Any]:
    free0, total0 = torch.cuda.mem_get_info()
    chunks = []
    chunk = args.chunk_mib << 20
    err = ""
    while True:
        try:
            chunks.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError as e:
            err = str(e).splitlines()[0][:200]
            break
        if len(chunks) * chunk > (1 << 40):
            break
    got = len(chunks) * chunk
    free1, total1 = torch.cuda.mem_get_info()
    res = {
        "mem_get_info_before": [free0, total0],
        "mem_get_info_full": [free1, total1],
        "allocated_bytes": got,
        "reserved_bytes": torch.cuda.memory_reserved(),
        "oom": err,
    }
    if args.hold > 0:
        _emit(dict(res, phase="holding"))
        time.sleep(args.hold)
    return res


MODES = {
    "matmul": mode_matmul,
    "big": mode_big,
    "graph": mode_graph,
    "tiny": mode_tiny,
    "train": mode_train,
    "trainer": mode_trainer,
    "infer": mode_infer,
    "memfill": mode_memfill,
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--sync-every", type=int, default=50)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--vgpuctl", default="", help="command prefix to reach vgpuctl")
    p.add_argument("--chunk-mib", type=int, default=64)
    p.add_argument("--hold", type=float, default=0.0)
    p.add_argument("--tag", default="")
    p.add_argument("--start-at", type=float, default=0.0, help="unix time to start measuring")
    p.add_argument("--timeline", action="store_true")
    p.add_argument("--sync-start", action="store_true",
                   help="print {ready} after warm-up, read the start time from stdin")
    p.add_argument("--period-ms", type=float, default=5.0, help="infer: a request every ...")
    args = p.parse_args(argv)
    global ARGS
    ARGS = args
    torch.cuda.init()
    res = MODES[args.mode](args)
    res["mode"] = args.mode
    res["tag"] = args.tag
    _emit(res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
