/*
 * tenant - a configurable workload for the compute tests on the simulated
 * GPU: the shapes of real tenants that a one-matmul-loop benchmark misses.
 *
 *   tenant KEY=VALUE...
 *
 *   mode=steady     (default) launch sim_sleep_ns(kernel_ns) back to back,
 *                   synchronizing every `sync` launches (the queue depth the
 *                   tenant keeps: 1 = one kernel at a time), then spend
 *                   `gap_ns` on the CPU (a training step's Python) before
 *                   the next round.
 *   mode=requests   a latency tenant: every `period_ns` a request arrives;
 *                   serving it is `kernels` launches of kernel_ns, then a
 *                   synchronize. Its latency is from arrival to the end of
 *                   that synchronize (a late request waits from its arrival).
 *
 *   kernel_ns=500000 sync=64 gap_ns=0 period_ns=5000000 kernels=2
 *   seconds=6 (measured window)  start_at=EPOCH_SECONDS (several tenants
 *   measure the same window; before it they warm up doing the same work)
 *   warmup=0.5 (seconds of work before start_at is even looked at)
 *
 * Prints one JSON line: pid, share (the simulated device's own busy time
 * for this process over the window, a fraction of wall time), kernels (run
 * within the window), rate (kernels per second), and for requests the
 * number served and latency p50/p99/max in microseconds.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vgpu_cuda.h"
#include "../../libhook/sim/vgpu_sim.h"

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
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

static void sleep_until_ns(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) != 0) {
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static CUfunction fn;
static uint64_t kernel_ns = 500000;

static int launch(void)
{
    uint64_t arg = kernel_ns;
    void *params[] = {&arg};
    if (cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL) != CUDA_SUCCESS) {
        fprintf(stderr, "tenant: launch failed\n");
        return -1;
    }
    return 0;
}

#define MAX_LAT 65536

int main(int argc, char **argv)
{
    const char *mode = "steady";
    long sync_every = 64, kernels = 2;
    uint64_t gap_ns = 0, period_ns = 5000000;
    double seconds = 6, start_at = 0, warmup = 0.5;
    for (int i = 1; i < argc; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "tenant: argument %s is not KEY=VALUE\n", argv[i]);
            return 2;
        }
        *eq = 0;
        const char *k = argv[i], *v = eq + 1;
        if (!strcmp(k, "mode"))
            mode = v;
        else if (!strcmp(k, "kernel_ns"))
            kernel_ns = strtoull(v, NULL, 10);
        else if (!strcmp(k, "sync"))
            sync_every = atol(v);
        else if (!strcmp(k, "gap_ns"))
            gap_ns = strtoull(v, NULL, 10);
        else if (!strcmp(k, "period_ns"))
            period_ns = strtoull(v, NULL, 10);
        else if (!strcmp(k, "kernels"))
            kernels = atol(v);
        else if (!strcmp(k, "seconds"))
            seconds = atof(v);
        else if (!strcmp(k, "start_at"))
            start_at = atof(v);
        else if (!strcmp(k, "warmup"))
            warmup = atof(v);
        else {
            fprintf(stderr, "tenant: unknown key %s\n", k);
            return 2;
        }
    }
    bool requests = !strcmp(mode, "requests");
    if ((!requests && strcmp(mode, "steady")) || sync_every < 1 || kernels < 1 || period_ns == 0) {
        fprintf(stderr, "tenant: bad arguments\n");
        return 2;
    }
    CUdevice dev;
    CUcontext ctx;
    CUmodule mod;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) ||
        cuCtxSetCurrent(ctx) || cuModuleLoadData(&mod, "vgpu-sim") ||
        cuModuleGetFunction(&fn, mod, "sim_sleep_ns")) {
        fprintf(stderr, "tenant: CUDA setup failed\n");
        return 1;
    }
    static uint64_t lat[MAX_LAT];
    long nlat = 0, n = 0, n0 = 0;
    uint64_t b0 = 0, w0 = 0, end = 0;
    uint64_t t_warm = mono_ns() + (uint64_t)(warmup * 1e9);
    bool measuring = false;
    uint64_t next = mono_ns();
    for (;;) {
        uint64_t now = mono_ns();
        if (!measuring && now >= t_warm && wall() >= start_at) {
            measuring = true;
            cuCtxSynchronize();
            b0 = busy();
            w0 = mono_ns();
            end = w0 + (uint64_t)(seconds * 1e9);
            n0 = n;
            next = w0;
        }
        if (measuring && now >= end)
            break;
        if (requests) {
            if (now < next)
                sleep_until_ns(next);
            uint64_t arrival = next;
            next += period_ns;
            for (long k = 0; k < kernels; k++)
                if (launch())
                    return 1;
            cuCtxSynchronize();
            n += kernels;
            if (measuring && nlat < MAX_LAT)
                lat[nlat++] = mono_ns() - arrival;
        } else {
            for (long k = 0; k < sync_every; k++)
                if (launch())
                    return 1;
            cuCtxSynchronize();
            n += sync_every;
            if (gap_ns) {
                uint64_t until = mono_ns() + gap_ns;
                while (mono_ns() < until) {
                } /* on the CPU, like a training step's Python */
            }
        }
    }
    uint64_t b1 = busy();
    double span = (double)(mono_ns() - w0) / 1e9;
    printf("{\"pid\": %d, \"share\": %.4f, \"kernels\": %ld, \"rate\": %.1f", (int)getpid(),
           (double)(b1 - b0) / 1e9 / span, n - n0, (double)(n - n0) / span);
    if (requests && nlat) {
        qsort(lat, (size_t)nlat, sizeof lat[0], cmp_u64);
        printf(", \"served\": %ld, \"p50_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f", nlat,
               (double)lat[nlat / 2] / 1e3, (double)lat[(nlat * 99) / 100] / 1e3,
               (double)lat[nlat - 1] / 1e3);
    }
    printf("}\n");
    return 0;
}
