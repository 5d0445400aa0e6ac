/*
 * hook_launch.c - the launch gate and the per-thread batches.
 *
 * Fast path, per launch: one acquire load of the ctl page pointer, loads of
 * the slot's flags (and, for a gated slot, of its grant word, of whether
 * this process has told the daemon it is busy, and of the device's in-flight
 * count and limit), relaxed adds to the stat page and the in-flight count,
 * and thread-local batch bookkeeping whose only shared step is one CAS on
 * the batch's state (the hand-off with the accountant). No syscall, no
 * lock, no allocation, no clock read, and no driver call: the current
 * context is cached per thread and re-read only after this thread created,
 * destroyed, set, pushed or popped a context (all hooked). A timing event
 * is recorded before the first and after the last launch of a batch.
 *
 * A gated (not UNLIMITED) slot launches only while its slice owns the
 * device (grant RUN, vgpu_abi.h) and fewer than inflight_max of its
 * launches are still running on it. The daemon hands ownership from slice
 * to slice; the in-flight bound (the GPU time the daemon allows, over the
 * measured GPU time per launch) is what makes a hand-over quick: the old
 * owner stops launching and what it has queued finishes within that time.
 * UNLIMITED slots skip all of it.
 *
 * Otherwise the calling thread (not the process) goes to the slow path:
 * it says `want` (once per grant generation, one-way, on the daemon's
 * socket) and, unless the grant is TAKE (the daemon pre-approved this
 * process: launch at once), waits on the grant word (a futex in the ctl
 * page, woken by the daemon). A wait for in-flight room waits on a futex
 * the accountant bumps when it retires launches. throttled_ns and
 * nr_throttled count waits for the device, not waits for room.
 *
 * A daemon that stops ticking while a launch waits (stopped, wedged) is
 * noticed through the page's heartbeat: after VGPU_STALL_NS without it the
 * launch runs, as it would with the daemon gone, rather than hang the
 * program (docs/design.md).
 *
 * Batches are never skipped: when a stream's pool is all in flight, a gated
 * thread waits for the accountant to free one, and an UNLIMITED one takes
 * its newest batch back from the accountant and extends it (its end event is
 * recorded again after the new launch).
 */
#include <limits.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hook_internal.h"

_Atomic(struct vgpu_thread *) vgpu_threads;
_Atomic int vgpu_active_captures;
_Atomic uint64_t vgpu_lost_batches;

#define GATE_WAIT_NS 20000000      /* a grant wait re-checks this often */
#define ROOM_WAIT_NS 1000000       /* a room wait re-checks this often */
#define ROOM_POLL_NS 50000
#define VGPU_STALL_NS 2000000000ull /* no heartbeat this long: the daemon is stalled */
#define POOL_WAIT_NS 2000000000ull /* give up measuring after this (accountant stuck) */

/* Initial-exec: the hook is loaded by LD_PRELOAD, so its TLS is static and
 * a thread-local read is one instruction instead of a __tls_get_addr call. */
#define TLS static _Thread_local __attribute__((tls_model("initial-exec")))
TLS struct vgpu_thread *tls_thr;
TLS CUcontext tls_ctx;                 /* current context as last read */
TLS struct vgpu_ctxinfo *tls_ci;       /* NULL: ask the driver */
TLS struct vgpu_tstream *tls_ts;       /* last stream launched on */
static pthread_key_t thr_key;
#define MAX_CAPTURES 64
static struct {
    _Atomic(CUstream) stream; /* NULL: free */
    int ptsz;
    CUcontext ctx;
} captures[MAX_CAPTURES];
static pthread_mutex_t capmu = PTHREAD_MUTEX_INITIALIZER;

static pthread_once_t key_once = PTHREAD_ONCE_INIT;

void vgpu_hdev_inflight_init(struct vgpu_hdev *d)
{
    uint32_t m = (uint32_t)(VGPU_INFLIGHT_NS / VGPU_COST_INIT_NS);
    if (m < VGPU_INFLIGHT_MIN)
        m = VGPU_INFLIGHT_MIN;
    atomic_store(&d->inflight, 0);
    atomic_store(&d->inflight_max, m);
    atomic_store(&d->batch_max, m / 2 ? m / 2 : 1);
    atomic_store(&d->busy, 0);
    pthread_mutex_init(&d->note_mu, NULL);
    d->seen_grant = VGPU_GRANT_WAIT;
    d->drain_pending = 0;
    d->cost_ns = 0;
    d->idle_launches = 0;
    d->idle_since = 0;
}

void vgpu_launch_ctx_changed(void)
{
    tls_ci = NULL;
}

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
    tls_ts = NULL;
    return t;
}

void vgpu_launch_atfork_child(void)
{
    tls_thr = NULL;
    tls_ctx = NULL;
    tls_ci = NULL;
    tls_ts = NULL;
    atomic_store(&vgpu_threads, NULL);
    atomic_store(&vgpu_active_captures, 0);
    pthread_mutex_init(&capmu, NULL);
    for (int i = 0; i < MAX_CAPTURES; i++)
        atomic_store(&captures[i].stream, NULL);
}

/* ---- context tracking: the driver's current context only changes through
 * these (and cuCtxCreate/cuCtxDestroy in hook_dev.c). ---- */

VGPU_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxSetCurrent)
        return VGPU_REFUSED_ERROR;
    tls_ci = NULL;
    return real_cuCtxSetCurrent(ctx);
}

VGPU_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxPushCurrent_v2)
        return VGPU_REFUSED_ERROR;
    tls_ci = NULL;
    return real_cuCtxPushCurrent_v2(ctx);
}

VGPU_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxPopCurrent_v2)
        return VGPU_REFUSED_ERROR;
    tls_ci = NULL;
    return real_cuCtxPopCurrent_v2(pctx);
}

/* ---- the gate ---- */

static inline bool gated(uint32_t flags)
{
    return (flags & (VGPU_DEV_ACTIVE | VGPU_DEV_UNLIMITED)) == VGPU_DEV_ACTIVE;
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
    unsigned bmax;          /* close the batch at this many launches */
};

/* Owner side: end the open batch b now (record its end event) so the
 * accountant can time it. Used before waiting and before reusing a stream
 * record for another stream. */
static void close_own(struct vgpu_batch *b)
{
    int open = VGPU_B_OPEN;
    if (!atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_CLOSING, memory_order_acquire,
                                                 memory_order_relaxed))
        return;
    if (real_cuEventRecord(b->ev_end, b->stream) == CUDA_SUCCESS) {
        atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
        return;
    }
    /* Not measurable: give it to the accountant to drop (it owns the
     * in-flight bookkeeping of dropped batches). */
    b->ev_end = NULL;
    atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
}

static void close_current(CUcontext ctx, CUstream s)
{
    struct vgpu_tstream *ts = tls_ts;
    if (ts && ts->ctx == ctx && ts->stream == s && ts->cur >= 0)
        close_own(&ts->b[ts->cur]);
}

static long futex_wait(_Atomic uint32_t *word, uint32_t val, long ns, bool shared)
{
    struct timespec ts = {ns / 1000000000l, ns % 1000000000l};
    return syscall(SYS_futex, word, shared ? FUTEX_WAIT : FUTEX_WAIT_PRIVATE, val, &ts, NULL, 0);
}

/* Say `want` unless this process already said it on this connection (and
 * has not said `idle` since): the daemon then knows the process has work. */
static void say_want(struct vgpu_hdev *hd, int slot)
{
    uint64_t conn = atomic_load_explicit(&vgpu_conn_gen, memory_order_relaxed);
    if (atomic_load_explicit(&hd->busy, memory_order_acquire) &&
        atomic_load_explicit(&hd->want_conn, memory_order_relaxed) == conn)
        return;
    pthread_mutex_lock(&hd->note_mu);
    if (!atomic_load_explicit(&hd->busy, memory_order_relaxed) ||
        atomic_load_explicit(&hd->want_conn, memory_order_relaxed) != conn) {
        if (vgpu_client_notify(slot, VGPU_NOTE_WANT)) { /* not sent: ask again next time */
            atomic_store_explicit(&hd->want_conn, conn, memory_order_relaxed);
            atomic_store_explicit(&hd->busy, 1, memory_order_release);
        }
    }
    pthread_mutex_unlock(&hd->note_mu);
}

/* The slow path of the gate: wait until the slice owns the device (or is
 * pre-approved to take it) and there is in-flight room (or the slot is no
 * longer gated, or the daemon is gone or stalled). Returns the slot. */
__attribute__((noinline, cold)) static int gate_wait(struct vgpu_hdev *hd, CUcontext ctx, CUstream s)
{
    close_current(ctx, s);
    uint64_t t0 = vgpu_now_ns();
    bool waited = false;
    uint64_t beat = 0, beat_at = t0;
    int slot;
    for (;;) {
        struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
        slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
        /* No daemon to hand the device over: run rather than hang. */
        if (!ctl || slot < 0 || slot >= (int)VGPU_MAX_DEVICES ||
            !atomic_load_explicit(&vgpu_connected, memory_order_relaxed))
            break;
        struct vgpu_ctl_dev *cd = &ctl->dev[slot];
        uint32_t flags = __atomic_load_n(&cd->flags, __ATOMIC_ACQUIRE);
        if (!gated(flags))
            break;
        uint32_t g = __atomic_load_n(&cd->grant, __ATOMIC_ACQUIRE);
        uint32_t st = g & VGPU_GRANT_STATE_MASK;
        if (st != VGPU_GRANT_WAIT) {
            /* RUN or TAKE: say so if not said, then wait only for room. */
            say_want(hd, slot);
            if (atomic_load_explicit(&hd->inflight, memory_order_relaxed) <
                    atomic_load_explicit(&hd->inflight_max, memory_order_relaxed) ||
                !vgpu_account_running())
                break;
            uint32_t w = atomic_load_explicit(&hd->room_word, memory_order_acquire);
            atomic_fetch_add_explicit(&hd->room_waiters, 1, memory_order_acq_rel);
            if (atomic_load_explicit(&hd->inflight, memory_order_acquire) >=
                atomic_load_explicit(&hd->inflight_max, memory_order_relaxed)) {
                vgpu_account_kick();
                futex_wait(&hd->room_word, w, ROOM_WAIT_NS, false);
            }
            atomic_fetch_sub_explicit(&hd->room_waiters, 1, memory_order_acq_rel);
            continue;
        }
        waited = true;
        say_want(hd, slot);
        /* A daemon that no longer ticks will not hand the device over. */
        uint64_t now = vgpu_now_ns();
        uint64_t hb = __atomic_load_n(&ctl->heartbeat, __ATOMIC_RELAXED);
        if (hb != beat) {
            beat = hb;
            beat_at = now;
        } else if (now - beat_at > VGPU_STALL_NS) {
            vgpu_warn_once(VGPU_W_STALL, "vgpu: vgpud has not answered for %llu ms; launching without "
                                         "waiting for the GPU until it does",
                           (unsigned long long)((now - beat_at) / 1000000));
            break;
        }
        atomic_fetch_add_explicit(&hd->grant_waiters, 1, memory_order_acq_rel);
        futex_wait((_Atomic uint32_t *)&cd->grant, g, GATE_WAIT_NS, true);
        atomic_fetch_sub_explicit(&hd->grant_waiters, 1, memory_order_acq_rel);
    }
    if (waited) {
        VGPU_STAT_ADD(slot, throttled_ns, vgpu_now_ns() - t0);
        VGPU_STAT_ADD(slot, nr_throttled, 1);
    }
    return slot;
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
    if (real_cuEventCreate(&b->ev_start, CU_EVENT_DEFAULT) != CUDA_SUCCESS) {
        b->ev_start = NULL;
        return false;
    }
    if (real_cuEventCreate(&b->ev_end, CU_EVENT_DEFAULT) != CUDA_SUCCESS) {
        real_cuEventDestroy_v2(b->ev_start);
        b->ev_start = b->ev_end = NULL;
        return false;
    }
    b->ev_ctx = ctx;
    return true;
}

/* The stream record of (ctx, s) in this thread, taking over another one if
 * needed: one whose batches are all free, else one with a free batch whose
 * open batch (if any) we close first. NULL if every record is busy. */
static struct vgpu_tstream *find_tstream(struct vgpu_thread *t, CUcontext ctx, CUstream s)
{
    for (int i = 0; i < VGPU_THREAD_STREAMS; i++)
        if (t->ts[i].ctx == ctx && t->ts[i].stream == s)
            return &t->ts[i];
    for (int pass = 0; pass < 2; pass++) {
        for (int k = 0; k < VGPU_THREAD_STREAMS; k++) {
            struct vgpu_tstream *ts = &t->ts[(t->rr + (unsigned)k) % VGPU_THREAD_STREAMS];
            int nfree = 0;
            for (int j = 0; j < VGPU_BATCH_RING; j++)
                nfree += atomic_load(&ts->b[j].state) == VGPU_B_FREE;
            if (pass == 0 ? nfree < VGPU_BATCH_RING : nfree == 0)
                continue;
            /* Batches carry their own context and stream, so the record can
             * change hands once the old stream's open batch is ended. */
            if (ts->cur >= 0)
                close_own(&ts->b[ts->cur]);
            t->rr++;
            ts->ctx = ctx;
            ts->stream = s;
            ts->cur = -1;
            return ts;
        }
    }
    return NULL;
}

/* Open the batch at ts->b[idx] (FREE, owned by us) for a launch on s. */
static struct vgpu_batch *batch_open(struct vgpu_tstream *ts, int idx, CUcontext ctx,
                                     struct vgpu_ctxinfo *ci, CUstream s)
{
    struct vgpu_batch *b = &ts->b[idx];
    if (!ensure_events(b, ctx) || real_cuEventRecord(b->ev_start, s) != CUDA_SUCCESS) {
        atomic_fetch_add_explicit(&vgpu_lost_batches, 1, memory_order_relaxed);
        vgpu_warn_once(VGPU_W_BATCH, "vgpu: cannot record timing events; some launches are not measured");
        return NULL;
    }
    b->ctx = ctx;
    b->ci = ci;
    b->stream = s;
    atomic_store_explicit(&b->n, 0, memory_order_relaxed);
    b->first_ns = vgpu_coarse_ns();
    b->seen_n = 0;
    b->seen_ns = 0; /* the accountant's clock: set at its first look */
    b->conn_gen = atomic_load_explicit(&vgpu_conn_gen, memory_order_relaxed);
    atomic_store_explicit(&b->state, VGPU_B_INUSE, memory_order_relaxed);
    ts->cur = idx;
    if (atomic_load_explicit(&vgpu_account_asleep, memory_order_relaxed))
        vgpu_account_kick();
    return b;
}

/* Take the newest batch back from the accountant to extend it (UNLIMITED,
 * pool exhausted). Only the newest: an older one's extended interval would
 * overlap the newer ones. */
static struct vgpu_batch *batch_reclaim(struct vgpu_tstream *ts)
{
    if (ts->cur < 0)
        return NULL;
    struct vgpu_batch *b = &ts->b[ts->cur];
    if (!b->ev_end)
        return NULL;
    int st = VGPU_B_PENDING;
    if (atomic_compare_exchange_strong_explicit(&b->state, &st, VGPU_B_INUSE, memory_order_acquire,
                                                memory_order_relaxed))
        return b;
    st = VGPU_B_OPEN;
    if (atomic_compare_exchange_strong_explicit(&b->state, &st, VGPU_B_INUSE, memory_order_acquire,
                                                memory_order_relaxed))
        return b;
    return NULL; /* the accountant is looking at it right now */
}

/* Find or open the batch this launch belongs to: the slow half of
 * batch_enter (new stream, batch closed by the accountant, pool empty). */
__attribute__((noinline)) static struct vgpu_batch *batch_enter_slow(CUcontext ctx, struct vgpu_ctxinfo *ci,
                                                                      CUstream s, bool gate)
{
    struct vgpu_thread *t = thread_state();
    if (!t)
        return NULL;
    uint64_t t0 = 0;
    for (;;) {
        struct vgpu_tstream *ts = find_tstream(t, ctx, s);
        if (ts) {
            tls_ts = ts;
            if (ts->cur >= 0) {
                struct vgpu_batch *b = &ts->b[ts->cur];
                int open = VGPU_B_OPEN;
                if (atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_INUSE,
                                                            memory_order_acquire, memory_order_relaxed))
                    return b;
            }
            for (int k = 1; k <= VGPU_BATCH_RING; k++) {
                int idx = (ts->cur + k + VGPU_BATCH_RING) % VGPU_BATCH_RING;
                if (atomic_load_explicit(&ts->b[idx].state, memory_order_acquire) == VGPU_B_FREE)
                    return batch_open(ts, idx, ctx, ci, s);
            }
            /* Every batch of this stream is in flight. */
            if (!gate) {
                struct vgpu_batch *b = batch_reclaim(ts);
                if (b)
                    return b;
            }
        }
        /* Wait for the accountant to free a batch. */
        uint64_t now = vgpu_now_ns();
        if (!t0)
            t0 = now;
        if (!vgpu_account_running() || now - t0 > POOL_WAIT_NS) {
            atomic_fetch_add_explicit(&vgpu_lost_batches, 1, memory_order_relaxed);
            vgpu_warn_once(VGPU_W_BATCH, "vgpu: no batch freed in time; some launches are not measured");
            return NULL;
        }
        if (gate) {
            struct timespec sl = {0, ROOM_POLL_NS};
            nanosleep(&sl, NULL);
        } else {
            sched_yield(); /* the accountant holds the newest batch for a moment */
        }
    }
}

static inline __attribute__((always_inline)) struct vgpu_batch *batch_enter(CUcontext ctx, struct vgpu_ctxinfo *ci, CUstream s, bool gate)
{
    struct vgpu_tstream *ts = tls_ts;
    if (__builtin_expect(ts && ts->ctx == ctx && ts->stream == s && ts->cur >= 0, 1)) {
        struct vgpu_batch *b = &ts->b[ts->cur];
        int open = VGPU_B_OPEN;
        if (__builtin_expect(atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_INUSE,
                                                                     memory_order_acquire,
                                                                     memory_order_relaxed),
                             1))
            return b;
    }
    return batch_enter_slow(ctx, ci, s, gate);
}

__attribute__((noinline)) static void batch_close(struct vgpu_batch *b)
{
    if (real_cuEventRecord(b->ev_end, b->stream) != CUDA_SUCCESS)
        b->ev_end = NULL; /* the accountant drops it */
    atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
}

/* After the launch: count it, close the batch when it reaches bmax. The
 * accountant closes batches that are idle or older than about 1 ms. `==`,
 * not `>=`: a batch taken back and extended past bmax (pool exhausted) is
 * left to the accountant's age rule rather than closed after every launch. */
static inline __attribute__((always_inline)) void batch_leave(struct launch *l)
{
    struct vgpu_batch *b = l->b;
    unsigned n = atomic_load_explicit(&b->n, memory_order_relaxed) + 1;
    atomic_store_explicit(&b->n, n, memory_order_relaxed);
    if (__builtin_expect(n == l->bmax, 0)) {
        batch_close(b);
        return;
    }
    atomic_store_explicit(&b->state, VGPU_B_OPEN, memory_order_release);
}

/* The calling thread's current context's record, asking the driver. */
__attribute__((noinline)) static struct vgpu_ctxinfo *current_ci(void)
{
    CUcontext ctx = NULL;
    if (real_cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx)
        return NULL;
    struct vgpu_ctxinfo *ci = vgpu_ctxinfo_get(ctx, true);
    if (!ci)
        return NULL;
    tls_ctx = ctx;
    tls_ci = ci;
    return ci;
}

/* Everything before the real launch. s is the stream as the driver will see
 * it (CU_STREAM_PER_THREAD for a _ptsz launch on stream 0). */
static inline __attribute__((always_inline)) void gate_enter(struct launch *l, CUstream s, CUstream orig, int ptsz, int graph)
{
    l->b = NULL;
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    if (!ctl)
        return;
    if (__builtin_expect(atomic_load_explicit(&vgpu_active_captures, memory_order_relaxed) > 0, 0) &&
        stream_capturing(orig, ptsz))
        return; /* recorded into a graph, not run: neither gated nor measured */
    struct vgpu_ctxinfo *ci = tls_ci;
    /* A record freed (context destroyed, maybe by another thread) no longer
     * names our context: look again. */
    if (__builtin_expect(!ci || atomic_load_explicit(&ci->ctx, memory_order_relaxed) != tls_ctx, 0)) {
        ci = current_ci();
        if (!ci)
            return;
    }
    CUcontext ctx = tls_ctx;
    struct vgpu_hdev *hd = &vgpu_hdevs[ci->hidx];
    int slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
    if (__builtin_expect(slot < 0, 0)) {
        slot = vgpu_hdev_attach(ci->hidx);
        if (slot < 0)
            return;
    }
    uint32_t flags = __atomic_load_n(&ctl->dev[slot].flags, __ATOMIC_ACQUIRE);
    bool gate = gated(flags);
    if (gate && __builtin_expect((__atomic_load_n(&ctl->dev[slot].grant, __ATOMIC_ACQUIRE) &
                                  VGPU_GRANT_STATE_MASK) != VGPU_GRANT_RUN ||
                                     !atomic_load_explicit(&hd->busy, memory_order_relaxed) ||
                                     atomic_load_explicit(&hd->inflight, memory_order_relaxed) >=
                                         atomic_load_explicit(&hd->inflight_max, memory_order_relaxed),
                                 0))
        slot = gate_wait(hd, ctx, s);
    struct vgpu_stat_dev *sd = vgpu_stat_dev(slot);
    if (__builtin_expect(sd != NULL, 1)) {
        __atomic_fetch_add(&sd->launches, 1, __ATOMIC_RELAXED);
        if (graph)
            __atomic_fetch_add(&sd->graph_launches, 1, __ATOMIC_RELAXED);
    }
    struct vgpu_batch *b = batch_enter(ctx, ci, s, gate);
    if (__builtin_expect(b != NULL, 1)) {
        atomic_fetch_add_explicit(&hd->inflight, 1, memory_order_relaxed);
        l->b = b;
        /* Small batches only where the in-flight limit needs them: each one
         * costs two event records. */
        l->bmax = gate ? atomic_load_explicit(&hd->batch_max, memory_order_relaxed) : VGPU_BATCH_MAX;
    }
}

static inline __attribute__((always_inline)) void gate_leave(struct launch *l)
{
    if (l->b)
        batch_leave(l);
}

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
 * launches pay for cuStreamIsCapturing. Each capturing stream has an entry;
 * the count is the number of entries. An entry goes when its capture ends
 * through the hooked EndCapture, when its stream is destroyed, or when the
 * accountant's sweep finds the stream no longer capturing (a capture ended
 * some way we do not see): a leaked entry would make every later launch
 * pay the query. ---- */

static void capture_add(CUstream s, int ptsz)
{
    CUcontext ctx = NULL;
    real_cuCtxGetCurrent(&ctx);
    pthread_mutex_lock(&capmu);
    for (int i = 0; i < MAX_CAPTURES; i++) {
        if (atomic_load(&captures[i].stream) == NULL) {
            captures[i].ptsz = ptsz;
            captures[i].ctx = ctx;
            atomic_store(&captures[i].stream, s);
            break;
        }
    }
    /* With the table full the capture still counts (and is found again
     * only by EndCapture): launches stay correct, just pay the query. */
    atomic_fetch_add(&vgpu_active_captures, 1);
    pthread_mutex_unlock(&capmu);
}

/* Drop the entry of stream s (all of them when s is NULL and ctx matches). */
static void capture_drop(CUstream s, CUcontext ctx, bool any_of_ctx)
{
    pthread_mutex_lock(&capmu);
    bool found = false;
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream cs = atomic_load(&captures[i].stream);
        if (cs == NULL)
            continue;
        if ((any_of_ctx && captures[i].ctx == ctx) || (!any_of_ctx && cs == s)) {
            atomic_store(&captures[i].stream, NULL);
            found = true;
            int c = atomic_load(&vgpu_active_captures);
            while (c > 0 && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
                ;
            if (!any_of_ctx)
                break;
        }
    }
    /* A capture begun while the table was full has no entry. */
    if (!found && !any_of_ctx) {
        int c = atomic_load(&vgpu_active_captures);
        int entries = 0;
        for (int i = 0; i < MAX_CAPTURES; i++)
            entries += atomic_load(&captures[i].stream) != NULL;
        while (c > entries && !atomic_compare_exchange_weak(&vgpu_active_captures, &c, c - 1))
            ;
    }
    pthread_mutex_unlock(&capmu);
}

void vgpu_capture_forget_ctx(CUcontext ctx)
{
    capture_drop(NULL, ctx, true);
}

void vgpu_capture_sweep(void)
{
    for (int i = 0; i < MAX_CAPTURES; i++) {
        CUstream s = atomic_load(&captures[i].stream);
        /* The per-thread default stream is another thread's: only that
         * thread's EndCapture (or its context's end) can tell. */
        if (s == NULL || s == CU_STREAM_PER_THREAD || captures[i].ptsz)
            continue;
        CUstreamCaptureStatus st = CU_STREAM_CAPTURE_STATUS_NONE;
        CUresult r = real_cuStreamIsCapturing ? real_cuStreamIsCapturing(s, &st) : CUDA_ERROR_UNKNOWN;
        if (r != CUDA_SUCCESS || st == CU_STREAM_CAPTURE_STATUS_NONE)
            capture_drop(s, NULL, false);
    }
}

/* Every variant the driver exports (CUDA 10.0's and _v2, each with _ptsz):
 * count the capture once it has begun. */
#define BEGIN_CAPTURE(name, ptsz)                                              \
    VGPU_EXPORT CUresult name(CUstream s, CUstreamCaptureMode mode)            \
    {                                                                          \
        ENTER(name);                                                           \
        CUresult r = real_##name(s, mode);                                     \
        if (r == CUDA_SUCCESS)                                                 \
            capture_add(s, (ptsz));                                            \
        return r;                                                              \
    }

BEGIN_CAPTURE(cuStreamBeginCapture, 0)
BEGIN_CAPTURE(cuStreamBeginCapture_ptsz, 1)
BEGIN_CAPTURE(cuStreamBeginCapture_v2, 0)
BEGIN_CAPTURE(cuStreamBeginCapture_v2_ptsz, 1)

VGPU_EXPORT CUresult cuStreamEndCapture(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture);
    CUresult r = real_cuStreamEndCapture(s, g);
    if (!stream_capturing(s, 0))
        capture_drop(s, NULL, false);
    return r;
}

VGPU_EXPORT CUresult cuStreamEndCapture_ptsz(CUstream s, CUgraph *g)
{
    ENTER(cuStreamEndCapture_ptsz);
    CUresult r = real_cuStreamEndCapture_ptsz(s, g);
    if (!stream_capturing(s, 1))
        capture_drop(s, NULL, false);
    return r;
}

VGPU_EXPORT CUresult cuStreamDestroy_v2(CUstream s)
{
    ENTER(cuStreamDestroy_v2);
    if (atomic_load_explicit(&vgpu_active_captures, memory_order_relaxed) > 0)
        capture_drop(s, NULL, false);
    return real_cuStreamDestroy_v2(s);
}
