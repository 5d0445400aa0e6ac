/*
 * mem_race - threads racing random allocations and frees, for the memory
 * admission tests. Every thread shares the process's primary context.
 *
 *   mem_race THREADS SECONDS MAX_MIB [SEED]
 *
 * Each thread loops for SECONDS: with probability 1/2 (or always, when it
 * holds nothing) it allocates 1..MAX_MIB MiB, else frees one of its
 * buffers. It starts racing when a line arrives on stdin (after printing
 * a "ready" line once its context exists). Before exiting it frees everything, then waits for a line on
 * stdin (so a test can compare the daemon's books with the device's while
 * the process still lives), and prints one JSON line of counts.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "vgpu_cuda.h"

#define MAX_HELD 64
#define MiB (1024ull * 1024ull)

static CUcontext ctx;
static double seconds;
static unsigned max_mib;

struct result {
    unsigned seed;
    long ok, oom, other, frees, free_err;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *worker(void *arg)
{
    struct result *r = arg;
    CUdeviceptr held[MAX_HELD];
    int n = 0;
    cuCtxSetCurrent(ctx);
    double end = now_s() + seconds;
    while (now_s() < end) {
        if (n == 0 || (n < MAX_HELD && (rand_r(&r->seed) & 1))) {
            size_t sz = (size_t)(1 + rand_r(&r->seed) % max_mib) * MiB;
            CUresult rc = cuMemAlloc_v2(&held[n], sz);
            if (rc == CUDA_SUCCESS)
                n++, r->ok++;
            else if (rc == CUDA_ERROR_OUT_OF_MEMORY)
                r->oom++;
            else
                r->other++;
        } else {
            int i = (int)(rand_r(&r->seed) % (unsigned)n);
            if (cuMemFree_v2(held[i]) != CUDA_SUCCESS)
                r->free_err++;
            held[i] = held[--n];
            r->frees++;
        }
    }
    while (n > 0) {
        if (cuMemFree_v2(held[--n]) != CUDA_SUCCESS)
            r->free_err++;
        r->frees++;
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s THREADS SECONDS MAX_MIB [SEED]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    seconds = atof(argv[2]);
    max_mib = (unsigned)atoi(argv[3]);
    unsigned seed = argc > 4 ? (unsigned)atoi(argv[4]) : (unsigned)getpid();
    if (threads < 1 || threads > 64 || max_mib < 1)
        return 2;
    CUdevice dev;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev)) {
        fprintf(stderr, "mem_race: CUDA setup failed\n");
        return 1;
    }
    /* Every process makes its context before any races: a context is
     * admitted against the slice like an allocation. */
    printf("{\"pid\": %d, \"phase\": \"ready\"}\n", (int)getpid());
    fflush(stdout);
    char go[16];
    if (!fgets(go, sizeof go, stdin))
        return 1;
    pthread_t tid[64];
    struct result res[64] = {{0}};
    for (int i = 0; i < threads; i++) {
        res[i].seed = seed * 131u + (unsigned)i;
        pthread_create(&tid[i], NULL, worker, &res[i]);
    }
    struct result tot = {0};
    for (int i = 0; i < threads; i++) {
        pthread_join(tid[i], NULL);
        tot.ok += res[i].ok, tot.oom += res[i].oom, tot.other += res[i].other;
        tot.frees += res[i].frees, tot.free_err += res[i].free_err;
    }
    printf("{\"pid\": %d, \"phase\": \"freed\"}\n", (int)getpid());
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        line[0] = 0;
    printf("{\"pid\": %d, \"allocs\": %ld, \"oom\": %ld, \"other_err\": %ld, \"frees\": %ld, "
           "\"free_err\": %ld}\n",
           (int)getpid(), tot.ok, tot.oom, tot.other, tot.frees, tot.free_err);
    return 0;
}
