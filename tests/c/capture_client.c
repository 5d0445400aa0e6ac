/*
 * capture_client - captures CUDA graphs in global mode, the way PyTorch's
 * torch.cuda.graph does, while other threads of the process keep the GPU
 * busy: under the hook, whose accountant times those threads' work from a
 * thread of its own, every capture must still succeed.
 *
 *   capture_client KERNEL_NS CAPTURES HOLD_MS LONG_MS LAUNCHERS KIND
 *
 * LAUNCHERS threads each launch KERNEL_NS kernels on a stream, without ever
 * synchronizing (a query or a synchronize of theirs would itself break a
 * global-mode capture: that is the program's to avoid, not the hook's). The
 * main thread CAPTURES times launches a kernel on a stream of its own (so a
 * batch of the hook's is open on it: one launch does not fill a batch),
 * begins a global-mode capture of that stream, captures three kernels,
 * holds the capture open HOLD_MS, checks it is still active, ends it,
 * instantiates the graph and replays it; then once more with the capture
 * held LONG_MS (0: not at all).
 *
 * KIND nonblocking (PyTorch's shape): the captured stream is non-blocking,
 * and the first launcher uses the legacy default stream (legal beside a
 * capture of a non-blocking stream), the others streams of their own.
 * KIND shared: as nonblocking, but the kernel before each capture is
 * launched by a thread of its own, which then exits: the batch of the
 * hook's left open on the captured stream is not the capturing thread's.
 * KIND blocking: the captured stream is blocking, so nothing may touch the
 * legacy stream during a capture; the launchers use streams of their own,
 * and before each capture a thread of its own launches one kernel on the
 * legacy stream and exits (a batch of the hook's is open there, not the
 * capturing thread's, while it captures).
 *
 * Prints one JSON line: how many captures there were and succeeded, and the
 * first failure (capture number, step, CUresult).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vgpu_cuda.h"

static CUcontext ctx;
static CUfunction fn;
static int blocking, shared;
static uint64_t kernel_ns;
static atomic_int stop;
static atomic_long launched;
static atomic_int launch_rc;

static void *launcher(void *arg)
{
    CUstream s = NULL; /* the legacy stream */
    if (cuCtxSetCurrent(ctx) || ((blocking || arg) && cuStreamCreate(&s, CU_STREAM_NON_BLOCKING))) {
        atomic_store(&launch_rc, -1);
        return NULL;
    }
    void *params[] = {&kernel_ns};
    while (!atomic_load(&stop)) {
        CUresult r = cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, s, params, NULL);
        if (r) {
            atomic_store(&launch_rc, (int)r);
            break;
        }
        atomic_fetch_add(&launched, 1);
    }
    return NULL;
}

struct failure {
    int capture;
    const char *step;
    int rc;
};

/* One kernel on stream *arg, from a thread of its own (shared, blocking):
 * too few to fill a batch, so the batch stays open. */
static void *prelaunch(void *arg)
{
    void *params[] = {&kernel_ns};
    if (cuCtxSetCurrent(ctx))
        return (void *)(intptr_t)-1;
    return (void *)(intptr_t)cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, *(CUstream *)arg, params, NULL);
}

/* One capture held hold_ms: 0, or nonzero with *f the first thing that failed. */
static int capture_once(CUstream s, int i, long hold_ms, struct failure *f)
{
    void *params[] = {&kernel_ns};
    CUgraph g = NULL;
    CUgraphExec ge = NULL;
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    int bad = 0;
#define FAIL(name, rc)                                                                     \
    do {                                                                                   \
        if (!bad)                                                                          \
            *f = (struct failure){i, name, (int)(rc)};                                     \
        bad = 1;                                                                           \
    } while (0)
    int r;
    if (shared || blocking) {
        CUstream ps = shared ? s : NULL;
        pthread_t t;
        void *tr = (void *)(intptr_t)-1;
        if (pthread_create(&t, NULL, prelaunch, &ps) == 0)
            pthread_join(t, &tr);
        if ((r = (int)(intptr_t)tr))
            FAIL("other_thread_launch", r);
    }
    if (!shared && (r = (int)cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, s, params, NULL)))
        FAIL("launch", r);
    if ((r = (int)cuStreamBeginCapture_v2(s, CU_STREAM_CAPTURE_MODE_GLOBAL))) {
        FAIL("begin", r);
        return bad;
    }
    /* What PyTorch asserts right after beginning (cudaStreamGetCaptureInfo). */
    if ((r = (int)cuStreamIsCapturing(s, &st)) || st != CU_STREAM_CAPTURE_STATUS_ACTIVE)
        FAIL("begin_status", r ? r : (int)st);
    for (int k = 0; k < 3; k++)
        if ((r = (int)cuLaunchKernel(fn, 1, 1, 1, 1, 1, 1, 0, s, params, NULL)))
            FAIL("capture_launch", r);
    /* The hook's accountant certainly looks at the other threads' batches
     * meanwhile. */
    for (long t = 0; t < hold_ms; t += 10)
        usleep(10000);
    if ((r = (int)cuStreamIsCapturing(s, &st)) || st != CU_STREAM_CAPTURE_STATUS_ACTIVE)
        FAIL("held_status", r ? r : (int)st);
    if ((r = (int)cuStreamEndCapture(s, &g)))
        FAIL("end", r);
    if (!bad && (r = (int)cuGraphInstantiateWithFlags(&ge, g, 0)))
        FAIL("instantiate", r);
    if (!bad && (r = (int)cuGraphLaunch(ge, s)))
        FAIL("replay", r);
    if (!bad && (r = (int)cuStreamSynchronize(s)))
        FAIL("sync", r);
    if (ge)
        cuGraphExecDestroy(ge);
    if (g)
        cuGraphDestroy(g);
    return bad;
#undef FAIL
}

int main(int argc, char **argv)
{
    if (argc < 7 || (strcmp(argv[6], "blocking") && strcmp(argv[6], "nonblocking") && strcmp(argv[6], "shared"))) {
        fprintf(stderr, "usage: %s KERNEL_NS CAPTURES HOLD_MS LONG_MS LAUNCHERS nonblocking|blocking|shared\n",
                argv[0]);
        return 2;
    }
    kernel_ns = strtoull(argv[1], NULL, 10);
    int captures = atoi(argv[2]);
    long hold_ms = atol(argv[3]), long_ms = atol(argv[4]);
    int nl = atoi(argv[5]);
    if (nl > 16)
        nl = 16;
    blocking = !strcmp(argv[6], "blocking");
    shared = !strcmp(argv[6], "shared");
    CUdevice dev;
    CUmodule mod;
    CUstream s;
    if (cuInit(0) || cuDeviceGet(&dev, 0) || cuDevicePrimaryCtxRetain(&ctx, dev) || cuCtxSetCurrent(ctx) ||
        cuModuleLoadData(&mod, "vgpu-sim") || cuModuleGetFunction(&fn, mod, "sim_sleep_ns") ||
        cuStreamCreate(&s, blocking ? 0 : CU_STREAM_NON_BLOCKING)) {
        fprintf(stderr, "capture_client: CUDA setup failed\n");
        return 1;
    }
    pthread_t th[16];
    for (int i = 0; i < nl; i++)
        pthread_create(&th[i], NULL, launcher, (void *)(intptr_t)i);
    usleep(50000); /* the launchers' batches are open and being timed */
    int total = captures + (long_ms > 0), ok = 0;
    struct failure first = {-1, "", 0};
    for (int i = 0; i < total; i++) {
        struct failure f = {-1, "", 0};
        if (capture_once(s, i, i < captures ? hold_ms : long_ms, &f) == 0)
            ok++;
        else if (first.capture < 0)
            first = f;
    }
    atomic_store(&stop, 1);
    for (int i = 0; i < nl; i++)
        pthread_join(th[i], NULL);
    cuCtxSynchronize();
    printf("{\"captures\": %d, \"ok\": %d, \"first_failure\": [%d, \"%s\", %d], \"launched\": %ld, "
           "\"launch_rc\": %d}\n",
           total, ok, first.capture, first.step, first.rc, atomic_load(&launched), atomic_load(&launch_rc));
    return 0;
}
