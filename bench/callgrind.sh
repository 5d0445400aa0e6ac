#!/usr/bin/env bash
# Instructions per hooked launch minus unhooked, uncapped, on the simulated
# GPU: valgrind --tool=callgrind counting only inside bench_launch() of
# bench/launch_loop.c (inclusive: the hook and the driver's cuLaunchKernel),
# so the simulated device's worker threads, start-up and the warm-up
# launches are not counted. Prints one JSON line. Needs valgrind and a built
# tree (make -C libhook). The hooked run must register with the daemon: the
# script fails if the hook printed a warning.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-20000}
lib=vgpu_cgroup/_lib
tmp=$(mktemp -d); trap 'kill $dpid 2>/dev/null || true; rm -rf "$tmp"; rm -f /dev/shm/$shm' EXIT
shm=vgpu-cg-$$
export VGPU_SIM_SHM=$shm VGPU_SIM_KERNEL_NS=0 PYTHONPATH=$PWD
cc -O2 -std=gnu11 -Ilibhook/include bench/launch_loop.c -o "$tmp/loop" -L$lib/sim -l:libcuda.so.1
python3 -m vgpu_cgroup._daemon_main --simulate --socket "$tmp/s" --runtime-dir "$tmp/run" \
    --etc-dir "$tmp/etc" --log-format json >"$tmp/log" 2>&1 &
dpid=$!
for _ in $(seq 100); do [ -S "$tmp/s" ] && break; sleep 0.1; done
count() {  # $1: extra env; prints collected Ir
    env $1 LD_LIBRARY_PATH=$lib/sim VGPU_SOCKET="$tmp/s" valgrind --tool=callgrind \
        --toggle-collect='bench_launch' --callgrind-out-file="$tmp/cg.out" \
        "$tmp/loop" "$N" >/dev/null 2>"$tmp/vg.log"
    if grep -q '^vgpu:' "$tmp/vg.log"; then
        echo "callgrind.sh: hook warning:" >&2
        grep '^vgpu:' "$tmp/vg.log" >&2
        exit 1
    fi
    awk '/^summary:/ {print $2}' "$tmp/cg.out"
}
plain=$(count "")
hooked=$(count "LD_PRELOAD=$PWD/$lib/libvgpu-hook.so")
python3 - "$plain" "$hooked" "$N" <<'PY'
import json, sys
plain, hooked, n = (int(x) for x in sys.argv[1:])
print(json.dumps({"launches": n, "ir_per_launch_unhooked": round(plain / n, 1),
                  "ir_per_launch_hooked": round(hooked / n, 1),
                  "hook_extra_ir_per_launch": round((hooked - plain) / n, 1)}))
PY
