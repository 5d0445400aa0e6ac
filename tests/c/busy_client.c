/*
 * busy_client - a long-running CUDA program for the reliability and load
 * tests: it holds memory, launches kernels continuously and keeps making
 * short-lived allocations, while the test kills and restarts vgpud.
 *
 *   busy_client busy HOLD_MIB NHOLD EXTRA_MIB KERNEL_NS [THINK_MS]
 *       Allocate NHOLD buffers of HOLD_MIB, and a small one with a pattern
 *       that is checked at the end.
 *       Then loop: launch sim_sleep_ns(KERNEL_NS) in bursts of 8 (then
 *       synchronize) and, between bursts, allocate and free EXTRA_MIB
 *       (0: never). Each successful short-lived allocation's call start and
 *       return (CLOCK_MONOTONIC ns) are kept (the last 2048). Commands on
 *       stdin, one per line:
 *         g  go: start the short-lived allocations, print {"phase":"go"}
 *         q  quiet: stop the short-lived allocations, print {"phase":"quiet"}
 *         p  pause: stop launching and allocating, print {"phase":"paused",
 *            "launched":N} (so the daemon's count can be compared), wait for e
 *         e  end: check the pattern, free, print the result line, exit 0
 *       A closed stdin is "e".
 *
 *   busy_client threads NTHREADS LAUNCHES
 *       NTHREADS threads launch LAUNCHES kernels each, all at once, then
 *       synchronize; print {"phase":"done","launched":N}, wait for a line on
 *       stdin, print the result line and exit.
 *
 *   busy_client fork EXE [ARGS...]
 *       Init CUDA and allocate 64 MiB; fork a child that touches no CUDA and
 *       exits, and a child that execs EXE ARGS (a CUDA program, under the hook
 *       through the inherited environment); print {"phase":"forked",...};
 *       wait for a line, allocate 32 MiB more, free all, print and exit.
 *
 * Result lines are one JSON object each. Exit 0 when every CUDA call that
 * must succeed did, else 1.
 */
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vgpu_cuda.h"

#define MiB (1024ull * 1024ull)
#define MAX_HOLD 32
#define SPANS 2048
#define PATTERN_BYTES 4096

static CUcontext ctx;
static CUfunction fn;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int setup(void)
{
    CUdevice dev;
    CUmodule mod;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx))
        return 1;
    if (cuModuleLoadData(&mod, "vgpu-sim") || cuModuleGetFunction(&fn, mod, "sim_sleep_ns"))
        return 1;
    return 0;
}

static CUresult launch(uint64_t ns)
{
    void *params[] = {&ns};
    return cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
}

/* Non-blocking: the next command character on stdin, 0 if none, 'e' at EOF. */
static char poll_cmd(int timeout_ms)
{
    struct pollfd p = {.fd = 0, .events = POLLIN};
    if (poll(&p, 1, timeout_ms) <= 0)
        return 0;
    char line[16];
    ssize_t n = read(0, line, sizeof line);
    if (n <= 0)
        return 'e';
    return line[0];
}

static int busy(int argc, char **argv)
{
    if (argc < 6)
        return 2;
    size_t hold = (size_t)strtoull(argv[2], NULL, 10) * MiB;
    int nhold = atoi(argv[3]);
    size_t extra = (size_t)strtoull(argv[4], NULL, 10) * MiB;
    uint64_t kns = strtoull(argv[5], NULL, 10);
    int think_ms = argc > 6 ? atoi(argv[6]) : 0;
    if (nhold < 0 || nhold > MAX_HOLD || hold < PATTERN_BYTES)
        return 2;
    if (setup()) {
        printf("{\"pid\": %d, \"error\": \"setup\"}\n", (int)getpid());
        return 1;
    }
    CUdeviceptr held[MAX_HOLD];
    unsigned char pat[PATTERN_BYTES], back[PATTERN_BYTES];
    int hold_rc = 0;
    for (int i = 0; i < nhold; i++) {
        int rc = cuMemAlloc_v2(&held[i], hold);
        if (rc) {
            hold_rc = rc;
            nhold = i;
            break;
        }
    }
    /* The simulated device keeps contents only of small buffers: the data
     * check uses one of PATTERN_BYTES. */
    CUdeviceptr probe = 0;
    memset(pat, (int)getpid() & 0xff, sizeof pat);
    if (!hold_rc && (cuMemAlloc_v2(&probe, PATTERN_BYTES) || cuMemcpyHtoD_v2(probe, pat, sizeof pat)))
        hold_rc = -1;
    printf("{\"pid\": %d, \"phase\": \"holding\", \"hold_rc\": %d}\n", (int)getpid(), hold_rc);
    fflush(stdout);

    static uint64_t span[SPANS][2];
    long launched = 0, launch_err = 0, sync_err = 0, ok = 0, oom = 0, other = 0, free_err = 0;
    long nspan = 0;
    int quiet = 1;
    for (;;) {
        char c = poll_cmd(think_ms);
        if (c == 'e')
            break;
        if (c == 'g' && extra) {
            quiet = 0;
            printf("{\"pid\": %d, \"phase\": \"go\"}\n", (int)getpid());
            fflush(stdout);
        }
        if (c == 'q') {
            quiet = 1;
            printf("{\"pid\": %d, \"phase\": \"quiet\"}\n", (int)getpid());
            fflush(stdout);
        }
        if (c == 'p') {
            printf("{\"pid\": %d, \"phase\": \"paused\", \"launched\": %ld}\n", (int)getpid(), launched);
            fflush(stdout);
            while ((c = poll_cmd(100)) != 'e')
                ;
            break;
        }
        CUdeviceptr p = 0;
        if (!quiet) {
            uint64_t t0 = now_ns();
            int rc = cuMemAlloc_v2(&p, extra);
            uint64_t t1 = now_ns();
            if (rc == CUDA_SUCCESS) {
                ok++;
                span[nspan % SPANS][0] = t0;
                span[nspan % SPANS][1] = t1;
                nspan++;
            } else if (rc == CUDA_ERROR_OUT_OF_MEMORY) {
                p = 0;
                oom++;
            } else {
                p = 0;
                other++;
            }
        }
        for (int i = 0; i < 8; i++) {
            if (launch(kns))
                launch_err++;
            else
                launched++;
        }
        if (cuCtxSynchronize())
            sync_err++;
        if (p && cuMemFree_v2(p)) /* held across the burst, so that neighbours contend */
            free_err++;
    }
    int data_ok = probe && !cuMemcpyDtoH_v2(back, probe, sizeof back) && !memcmp(pat, back, sizeof pat);
    if (probe && cuMemFree_v2(probe))
        free_err++;
    for (int i = 0; i < nhold; i++)
        if (cuMemFree_v2(held[i]))
            free_err++;
    printf("{\"pid\": %d, \"phase\": \"end\", \"hold_rc\": %d, \"launched\": %ld, \"launch_err\": %ld, "
           "\"sync_err\": %ld, \"ok\": %ld, \"oom\": %ld, \"other\": %ld, \"free_err\": %ld, "
           "\"data_ok\": %d, \"spans\": [",
           (int)getpid(), hold_rc, launched, launch_err, sync_err, ok, oom, other, free_err, data_ok);
    long first = nspan > SPANS ? nspan - SPANS : 0;
    for (long i = first; i < nspan; i++)
        printf("%s[%" PRIu64 ", %" PRIu64 "]", i > first ? ", " : "", span[i % SPANS][0],
               span[i % SPANS][1]);
    printf("]}\n");
    fflush(stdout);
    return hold_rc == 0 && launch_err == 0 && sync_err == 0 && other == 0 && free_err == 0 && data_ok ? 0 : 1;
}

struct tharg {
    long n, done, err;
};

static void *th_main(void *arg)
{
    struct tharg *a = arg;
    cuCtxSetCurrent(ctx);
    for (long i = 0; i < a->n; i++) {
        if (launch(1000))
            a->err++;
        else
            a->done++;
    }
    return NULL;
}

static int threads(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    int nt = atoi(argv[2]);
    long per = atol(argv[3]);
    if (nt < 1 || nt > 256 || per < 0)
        return 2;
    if (setup())
        return 1;
    pthread_t tid[256];
    struct tharg a[256];
    uint64_t t0 = now_ns();
    for (int i = 0; i < nt; i++) {
        a[i] = (struct tharg){.n = per};
        pthread_create(&tid[i], NULL, th_main, &a[i]);
    }
    long done = 0, err = 0;
    for (int i = 0; i < nt; i++) {
        pthread_join(tid[i], NULL);
        done += a[i].done;
        err += a[i].err;
    }
    int sync_rc = cuCtxSynchronize();
    printf("{\"pid\": %d, \"phase\": \"done\", \"launched\": %ld, \"launch_err\": %ld, \"sync_rc\": %d, "
           "\"wall_ns\": %" PRIu64 "}\n",
           (int)getpid(), done, err, sync_rc, now_ns() - t0);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        line[0] = 0;
    printf("{\"pid\": %d, \"phase\": \"end\"}\n", (int)getpid());
    return err == 0 && sync_rc == 0 ? 0 : 1;
}

static int forker(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    if (setup())
        return 1;
    CUdeviceptr a, b;
    int rc_a = cuMemAlloc_v2(&a, 64 * MiB);
    int st_plain = -1, st_exec = -1;
    fflush(stdout);
    pid_t p1 = fork();
    if (p1 == 0)
        _exit(7); /* touches no CUDA: the parent's books must not move */
    pid_t p2 = fork();
    if (p2 == 0) {
        execv(argv[2], argv + 2);
        _exit(127);
    }
    waitpid(p1, &st_plain, 0);
    waitpid(p2, &st_exec, 0);
    int launch_rc = launch(1000);
    int sync_rc = cuCtxSynchronize();
    printf("{\"pid\": %d, \"phase\": \"forked\", \"alloc_rc\": %d, \"plain_exit\": %d, \"exec_exit\": %d, "
           "\"launch_rc\": %d, \"sync_rc\": %d}\n",
           (int)getpid(), rc_a, WIFEXITED(st_plain) ? WEXITSTATUS(st_plain) : -1,
           WIFEXITED(st_exec) ? WEXITSTATUS(st_exec) : -1, launch_rc, sync_rc);
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin))
        line[0] = 0;
    int rc_b = cuMemAlloc_v2(&b, 32 * MiB);
    int free_rc = (rc_a == 0 && cuMemFree_v2(a)) || (rc_b == 0 && cuMemFree_v2(b));
    printf("{\"pid\": %d, \"phase\": \"end\", \"alloc2_rc\": %d, \"free_rc\": %d}\n", (int)getpid(), rc_b,
           free_rc);
    return rc_a == 0 && rc_b == 0 && !free_rc && launch_rc == 0 && sync_rc == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && !strcmp(argv[1], "busy"))
        return busy(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "threads"))
        return threads(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "fork"))
        return forker(argc, argv);
    fprintf(stderr, "usage: %s busy HOLD_MIB NHOLD EXTRA_MIB KERNEL_NS | threads N LAUNCHES | fork EXE [ARGS]\n",
            argv[0]);
    return 2;
}
