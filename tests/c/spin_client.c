/*
 * spin_client - keeps the (simulated) GPU busy and reports the share of it
 * that the device itself says this process got.
 *
 *   spin_client KERNEL_NS SECONDS [START_AT] [SYNC_EVERY]
 *
 * Launches sim_sleep_ns(KERNEL_NS) kernels back to back, synchronizing
 * every SYNC_EVERY launches (default 64). Warms up for 0.5 s, then (after
 * waiting for the wall-clock time START_AT, a float of seconds since the
 * epoch, so that several clients measure the same window) measures for
 * SECONDS. With SECONDS < 0 it runs until stdin closes, printing one share
 * line per 100 ms window (for live-change tests).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/select.h>
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

static double wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t busy(void)
{
    uint64_t b = 0, m = 0;
    vgpuSimProcessStats(0, &b, &m);
    return b;
}

static int stdin_closed(void)
{
    fd_set fds;
    FD_ZERO(&fds);
    FD_SET(0, &fds);
    struct timeval tv = {0, 0};
    if (select(1, &fds, NULL, NULL, &tv) > 0) {
        char c;
        return read(0, &c, 1) <= 0;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s KERNEL_NS SECONDS [START_AT] [SYNC_EVERY]\n", argv[0]);
        return 2;
    }
    uint64_t ns = strtoull(argv[1], NULL, 10);
    double seconds = atof(argv[2]);
    double start_at = argc > 3 ? atof(argv[3]) : 0;
    long sync_every = argc > 4 ? atol(argv[4]) : 64;
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    CUfunction fn;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cuCtxSetCurrent(ctx) || cuModuleLoadData(&mod, "vgpu-sim") ||
        cuModuleGetFunction(&fn, mod, "sim_sleep_ns")) {
        fprintf(stderr, "spin_client: CUDA setup failed\n");
        return 1;
    }
    uint64_t arg = ns;
    void *params[] = {&arg};
    long n = 0;
#define LAUNCH()                                                                     \
    do {                                                                             \
        if (cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL)) {           \
            fprintf(stderr, "spin_client: launch failed\n");                         \
            return 1;                                                                \
        }                                                                            \
        if (++n % sync_every == 0)                                                   \
            cuCtxSynchronize();                                                      \
    } while (0)
    double t = mono();
    while (mono() - t < 0.5)
        LAUNCH();
    if (start_at > 0)
        while (wall() < start_at)
            LAUNCH();
    if (seconds < 0) {
        double w0 = mono();
        uint64_t b0 = busy();
        while (!stdin_closed()) {
            LAUNCH();
            double w1 = mono();
            if (w1 - w0 >= 0.1) {
                uint64_t b1 = busy();
                printf("{\"t\": %.3f, \"share\": %.4f}\n", wall(), (double)(b1 - b0) / 1e9 / (w1 - w0));
                fflush(stdout);
                w0 = w1, b0 = b1;
            }
        }
        return 0;
    }
    uint64_t b0 = busy();
    double w0 = mono();
    long n0 = n;
    while (mono() - w0 < seconds)
        LAUNCH();
    uint64_t b1 = busy();
    double w1 = mono();
    printf("{\"pid\": %d, \"share\": %.4f, \"launches\": %ld}\n", (int)getpid(),
           (double)(b1 - b0) / 1e9 / (w1 - w0), n - n0);
    cuCtxSynchronize();
    return 0;
}
