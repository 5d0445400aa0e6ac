/*
 * hook_launch.c - the launch gate and the per-thread batches.
 *
 * Fast path, per launch: one acquire load of the ctl page pointer, relaxed
 * loads of the slot's flags and tokens, a relaxed add to the stat page, and
 * thread-local batch bookkeeping whose only shared step is one CAS on the
 * batch's state (the hand-off with the accountant). No syscall, no lock, no
 * allocation. A timing event is recorded before the first and after the last
 * launch of a batch (up to 64 launches or about 1 ms).
 *
 * When the budget is spent the calling thread (not the process) polls the
 * ctl page with nanosleep until the daemon refills it.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hook_internal.h"

_Atomic(struct vgpu_thread *) vgpu_threads;
_Atomic int vgpu_active_captures;
_Atomic uint64_t vgpu_lost_batches;

#define BATCH_MAX_LAUNCHES 64
#define BATCH_MAX_NS 1000000ull
#define GATE_POLL_NS 200000

static _Thread_local struct vgpu_thread *tls_thr;
static _Thread_local CUcontext tls_ctx;
static _Thread_local struct vgpu_ctxinfo *tls_ci;
static pthread_key_t thr_key;
static pthread_once_t key_once = PTHREAD_ONCE_INIT;

static void thr_exit(void *p)
{
    struct vgpu_thread *t = p;
    /* Open batches are closed by the accountant once idle; the struct is
     * reused by a later thread when all its batches are free. */
    atomic_store(&t->alive, 0);
}

static void make_key(void)
{
    pthread_key_create(&thr_key, thr_exit);
}

static bool all_free(struct vgpu_thread *t)
{
    for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
        for (int j = 0; j < VGPU_BATCH_RING; j++)
            if (atomic_load(&t->ts[i].b[j].state) != VGPU_B_FREE)
                return false;
    return true;
}

static struct vgpu_thread *thread_state(void)
{
    struct vgpu_thread *t = tls_thr;
    if (__builtin_expect(t != NULL, 1))
        return t;
    pthread_once(&key_once, make_key);
    for (t = atomic_load(&vgpu_threads); t; t = t->next) {
        int dead = 0;
        if (atomic_compare_exchange_strong(&t->alive, &dead, 1)) {
            if (all_free(t))
                break;
            atomic_store(&t->alive, 0);
        }
    }
    if (!t) {
        t = calloc(1, sizeof *t);
        if (!t)
            return NULL;
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
            t->ts[i].cur = -1;
        atomic_store(&t->alive, 1);
        struct vgpu_thread *head = atomic_load(&vgpu_threads);
        do
            t->next = head;
        while (!atomic_compare_exchange_weak(&vgpu_threads, &head, t));
    } else {
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++) {
            t->ts[i].ctx = NULL;
            t->ts[i].stream = NULL;
            t->ts[i].cur = -1;
        }
    }
    pthread_setspecific(thr_key, t);
    tls_thr = t;
    return t;
}

void vgpu_launch_atfork_child(void)
{
    tls_thr = NULL;
    tls_ctx = NULL;
    tls_ci = NULL;
    atomic_store(&vgpu_threads, NULL);
    atomic_store(&vgpu_active_captures, 0);
}

/* ---- the gate ---- */

static bool budget_ok(struct vgpu_ctl_page *ctl, int slot)
{
    uint32_t flags = __atomic_load_n(&ctl->dev[slot].flags, __ATOMIC_ACQUIRE);
    if (!(flags & VGPU_DEV_ACTIVE) || (flags & VGPU_DEV_UNLIMITED))
        return true;
    return __atomic_load_n(&ctl->dev[slot].tokens_ns, __ATOMIC_RELAXED) > 0;
}

__attribute__((noinline)) static void gate_wait(int hidx)
{
    uint64_t t0 = vgpu_now_ns();
    int slot = -1;
    for (;;) {
        struct timespec ts = {0, GATE_POLL_NS};
        nanosleep(&ts, NULL);
        struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
        slot = atomic_load_explicit(&vgpu_hdevs[hidx].slot, memory_order_relaxed);
        /* No daemon to refill the budget: run rather than hang. */
        if (!ctl || slot < 0 || !atomic_load_explicit(&vgpu_connected, memory_order_relaxed))
            break;
        if (budget_ok(ctl, slot))
            break;
    }
    VGPU_STAT_ADD(slot, throttled_ns, vgpu_now_ns() - t0);
    VGPU_STAT_ADD(slot, nr_throttled, 1);
}

static bool stream_capturing(CUstream s, int ptsz)
{
    CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
    __typeof__(real_cuStreamIsCapturing) f = ptsz ? real_cuStreamIsCapturing_ptsz : real_cuStreamIsCapturing;
    if (f && f(s, &st) == CUDA_SUCCESS)
        return st != CU_STREAM_CAPTURE_STATUS_NONE;
    return false;
}

struct launch {
    struct vgpu_batch *b;   /* batch to account into, NULL if unmeasured */
    int slot;
};

static struct vgpu_tstream *find_tstream(struct vgpu_thread *t, CUcontext ctx, CUstream s)
{
    for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
        if (t->ts[i].ctx == ctx && t->ts[i].stream == s)
            return &t->ts[i];
    /* Take over a slot whose batches are all done (or were never used). */
    for (int k = 0; k < VGPU_THREAD_STREAMS; k++) {
        struct vgpu_tstream *ts = &t->ts[(t->rr + (unsigned)k) % VGPU_THREAD_STREAMS];
        bool free_all = true;
        for (int j = 0; j < VGPU_BATCH_RING && free_all; j++)
            free_all = atomic_load(&ts->b[j].state) == VGPU_B_FREE;
        if (free_all) {
            t->rr++;
            ts->ctx = ctx;
            ts->stream = s;
            ts->cur = -1;
            return ts;
        }
    }
    return NULL;
}

static bool ensure_events(struct vgpu_batch *b, CUcontext ctx)
{
    if (b->ev_start && b->ev_end && b->ev_ctx == ctx)
        return true;
    if (b->ev_ctx == ctx) {
        if (b->ev_start)
            real_cuEventDestroy_v2(b->ev_start);
        if (b->ev_end)
            real_cuEventDestroy_v2(b->ev_end);
    }
    b->ev_start = b->ev_end = NULL;
    b->ev_ctx = NULL;
    if (real_cuEventCreate(&b->ev_start, CU_EVENT_DEFAULT) != CUDA_SUCCESS)
        return false;
    if (real_cuEventCreate(&b->ev_end, CU_EVENT_DEFAULT) != CUDA_SUCCESS) {
        real_cuEventDestroy_v2(b->ev_start);
        b->ev_start = NULL;
        return false;
    }
    b->ev_ctx = ctx;
    return true;
}

/* Find or open the batch this launch belongs to (before the launch). */
static struct vgpu_batch *batch_enter(CUcontext ctx, struct vgpu_ctxinfo *ci, CUstream s)
{
    struct vgpu_thread *t = thread_state();
    if (!t)
        return NULL;
    struct vgpu_tstream *ts = find_tstream(t, ctx, s);
    if (!ts)
        goto lost;
    if (ts->cur >= 0) {
        struct vgpu_batch *b = &ts->b[ts->cur];
        int open = VGPU_B_OPEN;
        if (atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_INUSE, memory_order_acquire,
                                                    memory_order_relaxed))
            return b;
        /* the accountant closed it while we were away: start another */
    }
    for (int k = 1; k <= VGPU_BATCH_RING; k++) {
        int idx = (ts->cur + k + VGPU_BATCH_RING) % VGPU_BATCH_RING;
        struct vgpu_batch *b = &ts->b[idx];
        if (atomic_load_explicit(&b->state, memory_order_acquire) != VGPU_B_FREE)
            continue;
        if (!ensure_events(b, ctx))
            goto lost;
        if (real_cuEventRecord(b->ev_start, s) != CUDA_SUCCESS)
            goto lost;
        b->ctx = ctx;
        b->ci = ci;
        b->stream = s;
        b->n = 0;
        b->first_ns = vgpu_coarse_ns();
        atomic_store_explicit(&b->last_ns, b->first_ns, memory_order_relaxed);
        b->conn_gen = atomic_load_explicit(&vgpu_conn_gen, memory_order_relaxed);
        atomic_store_explicit(&b->state, VGPU_B_INUSE, memory_order_relaxed);
        ts->cur = idx;
        return b;
    }
lost:
    /* Every batch is still in flight: this launch goes unmeasured. */
    atomic_fetch_add_explicit(&vgpu_lost_batches, 1, memory_order_relaxed);
    vgpu_warn_once(VGPU_W_BATCH, "vgpu: launch not measured (batch pool exhausted or event failure)");
    return NULL;
}

/* After the launch: count it, close the batch if it is full or old. */
static void batch_leave(struct vgpu_batch *b)
{
    uint64_t now = vgpu_coarse_ns();
    b->n++;
    atomic_store_explicit(&b->last_ns, now, memory_order_relaxed);
    if (b->n >= BATCH_MAX_LAUNCHES || now - b->first_ns >= BATCH_MAX_NS) {
        if (real_cuEventRecord(b->ev_end, b->stream) == CUDA_SUCCESS) {
            atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
        } else {
            atomic_fetch_add_explicit(&vgpu_lost_batches, 1, memory_order_relaxed);
            atomic_store_explicit(&b->state, VGPU_B_FREE, memory_order_release);
        }
        return;
    }
    atomic_store_explicit(&b->state, VGPU_B_OPEN, memory_order_release);
}

/* Everything before the real launch. s is the stream as the driver will see
 * it (CU_STREAM_PER_THREAD for a _ptsz launch on stream 0). */
static inline void gate_enter(struct launch *l, CUstream s, CUstream orig, int ptsz, int graph)
{
    l->b = NULL;
    l->slot = -1;
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    if (!ctl)
        return;
    if (__builtin_expect(atomic_load_explicit(&vgpu_active_captures, memory_order_relaxed) > 0, 0) &&
        stream_capturing(orig, ptsz))
        return; /* recorded into a graph, not run: neither gated nor measured */
    CUcontext ctx = NULL;
    if (real_cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx)
        return;
    struct vgpu_ctxinfo *ci = tls_ci;
    if (__builtin_expect(ctx != tls_ctx || !ci, 0)) {
        ci = vgpu_ctxinfo_get(ctx, true);
        if (!ci)
            return;
        tls_ctx = ctx;
        tls_ci = ci;
    }
    int hidx = ci->hidx;
    int slot = atomic_load_explicit(&vgpu_hdevs[hidx].slot, memory_order_relaxed);
    if (__builtin_expect(slot < 0, 0)) {
        slot = vgpu_hdev_attach(hidx);
        if (slot < 0)
            return;
    }
    if (!budget_ok(ctl, slot))
        gate_wait(hidx);
    slot = atomic_load_explicit(&vgpu_hdevs[hidx].slot, memory_order_relaxed);
    l->slot = slot;
    VGPU_STAT_ADD(slot, launches, 1);
    if (graph)
        VGPU_STAT_ADD(slot, graph_launches, 1);
    l->b = batch_enter(ctx, ci, s);
}

static inline void gate_leave(struct launch *l)
{
    if (l->b)
        batch_leave(l->b);
}

#define ENTER(name)                                                                        \
    int mode_ = vgpu_ensure();                                                             \
    if (__builtin_expect(mode_ >= VGPU_MODE_FAIL, 0) || !real_##name)                      \
        return VGPU_REFUSED_ERROR;

#define GATED(name, stream, ptsz, graph, call)                                             \
    {                                                                                      \
        ENTER(name);                                                                       \
        if (mode_ != VGPU_MODE_REGISTERED)                                                 \
            return call;                                                                   \
        CUstream orig_ = (stream);                                                         \
        CUstream s_ = ((ptsz) && orig_ == NULL) ? CU_STREAM_PER_THREAD : orig_;            \
        struct launch l_;                                                                  \
        gate_enter(&l_, s_, orig_, (ptsz), (graph));                                       \
        CUresult r_ = call;                                                                \
        gate_leave(&l_);                                                                   \
        return r_;                                                                         \
    }

VGPU_EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                    unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                                    CUstream hStream, void **params, void **extra)
    GATED(cuLaunchKernel, hStream, 0, 0,
          real_cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shmem, hStream, params, extra))

VGPU_EXPORT CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                         unsigned int bx, unsigned int by, unsigned int bz, unsigned int shmem,
                                         CUstream hStream, void **params, void **extra)
    GATED(cuLaunchKernel_ptsz, hStream, 1, 0,
          real_cuLaunchKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, hStream, params, extra))

VGPU_EXPORT CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params, void **extra)
    GATED(cuLaunchKernelEx, config ? config->hStream : NULL, 0, 0,
          real_cuLaunchKernelEx(config, f, params, extra))

VGPU_EXPORT CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **params,
                                           void **extra)
    GATED(cuLaunchKernelEx_ptsz, config ? config->hStream : NULL, 1, 0,
          real_cuLaunchKernelEx_ptsz(config, f, params, extra))

VGPU_EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                               unsigned int bx, unsigned int by, unsigned int bz,
                                               unsigned int shmem, CUstream hStream, void **params)
    GATED(cuLaunchCooperativeKernel, hStream, 0, 0,
          real_cuLaunchCooperativeKernel(f, gx, gy, gz, bx, by, bz, shmem, hStream, params))

VGPU_EXPORT CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy,
                                                    unsigned int gz, unsigned int bx, unsigned int by,
                                                    unsigned int bz, unsigned int shmem, CUstream hStream,
                                                    void **params)
    GATED(cuLaunchCooperativeKernel_ptsz, hStream, 1, 0,
          real_cuLaunchCooperativeKernel_ptsz(f, gx, gy, gz, bx, by, bz, shmem, hStream, params))

VGPU_EXPORT CUresult cuGraphLaunch(CUgraphExec g, CUstream hStream)
    GATED(cuGraphLaunch, hStream, 0, 1, real_cuGraphLaunch(g, hStream))

VGPU_EXPORT CUresult cuGraphLaunch_ptsz(CUgraphExec g, CUstream hStream)
    GATED(cuGraphLaunch_ptsz, hStream, 1, 1, real_cuGraphLaunch_ptsz(g, hStream))

/* ---- stream capture tracking: only while a capture is active anywhere do
 * launches pay for cuStreamIsCapturing. ---- */

VGPU_EXPORT CUresult cuStreamBeginCapture_v2(CUstream s, CUstreamCaptureMode mode)
{
    ENTER(cuStreamBeginCapture_v2);
    CUresult r = real_cuStreamBeginCapture_v2(s, mode);
    if (r == CUDA_SUCCESS)
        atomic_fetch_add(&vgpu_active_captures, 1);
    return r;
}

VGPU_EXPORT CUresult cuStreamBeginCapture_v2_ptsz(CUstream s, CUstreamCaptureMode mode)
{
    ENTER(cuStreamBeginCapture_v2_ptsz);
    CUresult r = real_cuStreamBeginCapture_v2_ptsz(s, mode);
    if (r == CUDA_SUCCESS)
        atomic_fetch_add(&vgpu_active_captures, 1);
    return r;
}

static void capture_ended(void)
{
    int c = atomic_load(&vgpu_active_captures);
    while (c > 0 && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
        ;
}

VGPU_EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture);
    bool was = stream_capturing(s, 0);
    CUresult r = real_cuStreamEndCapture(s, g);
    if (was && !stream_capturing(s, 0))
        capture_ended();
    return r;
}

VGPU_EXPORT CUresult cuStreamEndCapture_ptsz(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture_ptsz);
    bool was = stream_capturing(s, 1);
    CUresult r = real_cuStreamEndCapture_ptsz(s, g);
    if (was && !stream_capturing(s, 1))
        capture_ended();
    return r;
}
