/*
 * Launch overhead of an empty kernel through the CUDA driver API.
 * Prints one JSON line: ns per cuLaunchKernel call (host side, measured over
 * batches of launches with a synchronize per batch) and first-call latency.
 * Run natively and with LD_PRELOAD=libvgpu-hook.so in one harness run.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "vgpu_cuda.h"

static const char ptx[] =
    ".version 8.0\n"
    ".target sm_90\n"
    ".address_size 64\n"
    ".visible .entry empty()\n"
    "{\n"
    "  ret;\n"
    "}\n";

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define CHECK(call)                                                        \
    do {                                                                   \
        CUresult rc_ = (call);                                             \
        if (rc_ != CUDA_SUCCESS) {                                         \
            fprintf(stderr, "%s failed: %d\n", #call, (int)rc_);          \
            return 1;                                                      \
        }                                                                  \
    } while (0)

int main(int argc, char **argv)
{
    long batches = argc > 1 ? atol(argv[1]) : 200;
    long per_batch = argc > 2 ? atol(argv[2]) : 1000;
    uint64_t t0 = now_ns();
    CHECK(cuInit(0));
    uint64_t t_init = now_ns() - t0;
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    CHECK(cuDeviceGet(&dev, 0));
    CHECK(cuDevicePrimaryCtxRetain(&ctx, dev));
    CHECK(cuCtxSetCurrent(ctx));
    uint64_t t_ready = now_ns() - t0;
    CHECK(cuModuleLoadData(&mod, ptx));
    CHECK(cuModuleGetFunction(&fn, mod, "empty"));
    for (int i = 0; i < 2000; i++)
        CHECK(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL));
    CHECK(cuCtxSynchronize());
    uint64_t best = UINT64_MAX, total = 0;
    for (long b = 0; b < batches; b++) {
        uint64_t s = now_ns();
        for (long i = 0; i < per_batch; i++)
            CHECK(cuLaunchKernel(fn, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL));
        uint64_t e = now_ns();
        CHECK(cuCtxSynchronize());
        uint64_t d = e - s;
        total += d;
        if (d < best)
            best = d;
    }
    printf("{\"launches\": %ld, \"ns_per_launch_mean\": %.1f, \"ns_per_launch_best\": %.1f, "
           "\"init_ns\": %llu, \"ready_ns\": %llu}\n",
           batches * per_batch, (double)total / (double)(batches * per_batch),
           (double)best / (double)per_batch, (unsigned long long)t_init,
           (unsigned long long)t_ready);
    return 0;
}
