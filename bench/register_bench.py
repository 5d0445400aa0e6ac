"""Registration under load: N processes start CUDA at the same moment under
the hook against one vgpud on the simulated GPU. Reports each process's time
from its first CUDA call to ready (cuInit, which connects and registers) and
the wall time until all are ready.

    python3 bench/register_bench.py [--clients 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _e2e import VgpudProc, build, build_c  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, default=100)
    args = ap.parse_args(argv)
    build()
    with tempfile.TemporaryDirectory(prefix="vgpu-reg-") as td:
        tmp = Path(td)
        exe = build_c("client_basic", tmp)
        d = VgpudProc(tmp, sim_mem="64G")
        d.env["VGPU_SIM_CTX_OVERHEAD"] = str(1 << 20)
        d.start()
        try:
            env = d.client_env()
            t0 = time.monotonic()
            procs = [subprocess.Popen([str(exe), "0", "0"], env=env, stdout=subprocess.PIPE,
                                      text=True) for _ in range(args.clients)]
            outs = [p.communicate(timeout=120)[0] for p in procs]
            wall = time.monotonic() - t0
        finally:
            d.cleanup()
    init_ms = sorted(json.loads(o.splitlines()[-1])["init_ns"] / 1e6 for o in outs if o.strip())
    ok = sum(1 for o in outs if o.strip() and json.loads(o.splitlines()[-1])["init_rc"] == 0)
    res = {
        "clients": args.clients,
        "registered": ok,
        "init_ms_p50": round(init_ms[len(init_ms) // 2], 2),
        "init_ms_max": round(init_ms[-1], 2),
        "wall_s_all_done": round(wall, 3),
    }
    print(json.dumps(res))
    return 0 if ok == args.clients else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
