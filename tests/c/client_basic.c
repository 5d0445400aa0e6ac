/*
 * client_basic - a CUDA driver-API program that links libcuda directly, for
 * the hook's tests and the end-to-end tests with the real daemon.
 *
 *   client_basic N NS [ALLOC_BYTES...]
 *
 * cuInit, primary context, allocate each ALLOC_BYTES with cuMemAlloc_v2,
 * launch sim_sleep_ns(NS) N times on the default stream, synchronize, free,
 * and print one JSON line of what happened. Env CLIENT_HOLD_MS keeps the
 * allocations that long before freeing (for tests that look from outside).
 * Env CLIENT_ABANDON_CAPTURE=1 first begins a capture on a stream of its own
 * and destroys the stream without ending it; =unseen destroys it through
 * CUDA 3.x's cuStreamDestroy, which the hook does not intercept (a capture
 * that ends where the hook cannot see it end).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vgpu_cuda.h"

CUresult cuStreamDestroy(CUstream hStream); /* cuda.h maps it to _v2 */

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s N NS [ALLOC_BYTES...]\n", argv[0]);
        return 2;
    }
    long n = strtol(argv[1], NULL, 10);
    uint64_t ns = strtoull(argv[2], NULL, 10);
    int nalloc = argc - 3;
    CUdeviceptr ptrs[64] = {0};
    int arc[64] = {0};
    if (nalloc > 64)
        nalloc = 64;

    uint64_t t0 = now_ns();
    int init_rc = cuInit(0);
    uint64_t t_init = now_ns() - t0;
    CUdevice dev = 0;
    CUcontext ctx = NULL;
    int ctx_rc = -1, launch_rc = 0, sync_rc = -1, free_rc = 0;
    size_t mfree = 0, mtotal = 0, dtotal = 0;
    long launched = 0;
    uint64_t t_launch = 0;
    if (init_rc == 0) {
        cuDeviceGet(&dev, 0);
        ctx_rc = cuDevicePrimaryCtxRetain(&ctx, dev);
        if (ctx_rc == 0)
            cuCtxSetCurrent(ctx);
    }
    if (ctx_rc == 0) {
        for (int i = 0; i < nalloc; i++)
            arc[i] = cuMemAlloc_v2(&ptrs[i], (size_t)strtoull(argv[3 + i], NULL, 10));
        cuMemGetInfo_v2(&mfree, &mtotal);
        cuDeviceTotalMem_v2(&dtotal, dev);
        CUmodule mod;
        CUfunction fn;
        const char *abandon = getenv("CLIENT_ABANDON_CAPTURE");
        if (abandon) {
            CUstream cs;
            if (cuStreamCreate(&cs, CU_STREAM_NON_BLOCKING) == 0 &&
                cuStreamBeginCapture_v2(cs, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) == 0) {
                if (!strcmp(abandon, "unseen"))
                    cuStreamDestroy(cs);
                else
                    cuStreamDestroy_v2(cs);
            }
        }
        if (cuModuleLoadData(&mod, "vgpu-sim") == 0 && cuModuleGetFunction(&fn, mod, "sim_sleep_ns") == 0) {
            uint64_t arg = ns;
            void *params[] = {&arg};
            uint64_t l0 = now_ns();
            for (long i = 0; i < n; i++) {
                launch_rc = cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
                if (launch_rc)
                    break;
                launched++;
            }
            sync_rc = cuCtxSynchronize();
            t_launch = now_ns() - l0;
        } else {
            launch_rc = -1;
        }
        const char *hold = getenv("CLIENT_HOLD_MS");
        if (hold)
            usleep((useconds_t)strtoul(hold, NULL, 10) * 1000);
        for (int i = 0; i < nalloc; i++)
            if (arc[i] == 0 && cuMemFree_v2(ptrs[i]) != 0)
                free_rc = 1;
    }
    printf("{\"pid\": %d, \"init_rc\": %d, \"init_ns\": %" PRIu64 ", \"ctx_rc\": %d, \"launched\": %ld, "
           "\"launch_rc\": %d, \"sync_rc\": %d, \"launch_wall_ns\": %" PRIu64 ", \"free_rc\": %d, "
           "\"mem_free\": %zu, \"mem_total\": %zu, \"dev_total\": %zu, \"alloc_rc\": [",
           (int)getpid(), init_rc, t_init, ctx_rc, launched, launch_rc, sync_rc, t_launch, free_rc, mfree,
           mtotal, dtotal);
    for (int i = 0; i < nalloc; i++)
        printf("%s%d", i ? ", " : "", arc[i]);
    printf("]}\n");
    fflush(stdout);
    return init_rc == 0 && ctx_rc == 0 ? 0 : 1;
}
