/*
 * free_stall - frees while another thread's reservation waits on a daemon
 * that does not answer, for the hook's tests (issue 16).
 *
 *   free_stall NSMALL SMALL_BYTES
 *
 * Allocates 1 MiB and NSMALL buffers of SMALL_BYTES, prints {"ready": 1} and
 * waits for a line on stdin. Then starts a thread that allocates 1 MiB more
 * (the test's daemon withholds the answer), prints {"blocked": 1} and waits
 * for a line (the test has seen that reservation arrive). Then frees every
 * buffer, timing each cuMemFree_v2, and prints what it measured; waits for
 * a line (the daemon answers meanwhile), joins the thread, frees its
 * buffer, prints {"done": ...} and waits for a last line before exiting, so
 * the test can read the daemon's books while the connection is open.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "vgpu_cuda.h"

#define MiB (1024ull * 1024ull)

static CUcontext ctx;
static CUdeviceptr late;
static int late_rc = -1;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        exit(3);
}

static void *late_alloc(void *arg)
{
    (void)arg;
    cuCtxSetCurrent(ctx);
    late_rc = cuMemAlloc_v2(&late, MiB);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s NSMALL SMALL_BYTES\n", argv[0]);
        return 2;
    }
    int nsmall = atoi(argv[1]);
    size_t small = (size_t)strtoull(argv[2], NULL, 10);
    CUdevice dev = 0;
    if (cuInit(0) != CUDA_SUCCESS || cuDeviceGet(&dev, 0) != CUDA_SUCCESS ||
        cuDevicePrimaryCtxRetain(&ctx, dev) != CUDA_SUCCESS)
        return 4;
    cuCtxSetCurrent(ctx);
    CUdeviceptr *p = calloc((size_t)nsmall + 1, sizeof *p);
    int alloc_err = 0;
    for (int i = 0; i <= nsmall; i++)
        if (cuMemAlloc_v2(&p[i], i == 0 ? MiB : small) != CUDA_SUCCESS)
            alloc_err++;
    printf("{\"ready\": 1, \"alloc_err\": %d}\n", alloc_err);
    fflush(stdout);
    wait_line();

    pthread_t t;
    pthread_create(&t, NULL, late_alloc, NULL);
    printf("{\"blocked\": 1}\n");
    fflush(stdout);
    wait_line();

    uint64_t worst = 0, total = 0;
    int free_err = 0;
    for (int i = 0; i <= nsmall; i++) {
        uint64_t t0 = now_ns();
        if (cuMemFree_v2(p[i]) != CUDA_SUCCESS)
            free_err++;
        uint64_t d = now_ns() - t0;
        total += d;
        if (d > worst)
            worst = d;
    }
    printf("{\"freed\": %d, \"free_err\": %d, \"max_free_ns\": %" PRIu64 ", \"total_free_ns\": %" PRIu64 "}\n",
           nsmall + 1, free_err, worst, total);
    fflush(stdout);
    wait_line();

    pthread_join(t, NULL);
    int late_free = late_rc == CUDA_SUCCESS ? (int)cuMemFree_v2(late) : -1;
    printf("{\"done\": 1, \"late_rc\": %d, \"late_free\": %d}\n", late_rc, late_free);
    fflush(stdout);
    wait_line();
    return 0;
}
