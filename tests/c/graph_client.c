/*
 * graph_client - captures kernels into a CUDA graph on a stream of its own,
 * then replays the graph, the way PyTorch's CUDA graphs do.
 *
 *   graph_client KERNEL_NS NODES SECONDS
 *
 * Prints one JSON line: whether capture and instantiation succeeded, how many
 * replays ran, and the GPU share the simulated device measured for them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "vgpu_cuda.h"
#include "../../libhook/sim/vgpu_sim.h"

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    uint64_t ns = strtoull(argv[1], NULL, 10);
    int nodes = atoi(argv[2]);
    double seconds = atof(argv[3]);
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    CUstream s;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cuCtxSetCurrent(ctx) || cuModuleLoadData(&mod, "vgpu-sim") ||
        cuModuleGetFunction(&fn, mod, "sim_sleep_ns") || cuStreamCreate(&s, CU_STREAM_NON_BLOCKING)) {
        fprintf(stderr, "graph_client: CUDA setup failed\n");
        return 1;
    }
    void *params[] = {&ns};
    CUgraph g = NULL;
    CUgraphExec ge = NULL;
    int begin = cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_GLOBAL);
    int launch_rc = 0;
    for (int i = 0; i < nodes && !begin; i++)
        launch_rc |= cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, s, params, NULL);
    /* Let the hook's accountant run while the capture is open: its event
     * queries must not invalidate the capture. */
    usleep(20000);
    int end = begin ? -1 : (int)cuStreamEndCapture(s, &g);
    int inst = end ? -1 : (int)cuGraphInstantiateWithFlags(&ge, g, 0);
    long replays = 0;
    double share = 0;
    if (!inst) {
        uint64_t b0 = 0, b1 = 0, m = 0;
        vgpuSimProcessStats(0, &b0, &m);
        double t0 = mono();
        while (mono() - t0 < seconds) {
            if (cuGraphLaunch(ge, s))
                break;
            if (++replays % 4 == 0)
                cuStreamSynchronize(s);
        }
        cuStreamSynchronize(s);
        vgpuSimProcessStats(0, &b1, &m);
        share = (double)(b1 - b0) / 1e9 / (mono() - t0);
    }
    printf("{\"begin_rc\": %d, \"launch_rc\": %d, \"end_rc\": %d, \"instantiate_rc\": %d, "
           "\"replays\": %ld, \"share\": %.4f}\n", begin, launch_rc, end, inst, replays, share);
    return 0;
}
