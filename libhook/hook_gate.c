/*
 * hook_gate.c - the launch gate and the owner side of the batches.
 *
 * The fast path (vgpu_gate_enter/vgpu_gate_leave, inline in
 * hook_services.h and so in every launch entry point of hook_launch.c),
 * per launch: one acquire load of the ctl page pointer, loads of
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
 * Otherwise the calling thread (not the process) goes to the slow path
 * (vgpu_gate_wait, here):
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

#include "hook_services.h"

#define GATE_WAIT_NS 20000000      /* a grant wait re-checks this often */
#define ROOM_WAIT_NS 1000000       /* a room wait re-checks this often */
#define ROOM_POLL_NS 50000
#define VGPU_STALL_NS 2000000000ull /* no heartbeat this long: the daemon is stalled */
#define POOL_WAIT_NS 2000000000ull /* give up measuring after this (accountant stuck) */

_Thread_local CUcontext vgpu_tls_ctx __attribute__((tls_model("initial-exec")));  /* current context as last read */
_Thread_local struct vgpu_ctxinfo *vgpu_tls_ci __attribute__((tls_model("initial-exec"))); /* NULL: ask the driver */

void vgpu_launch_atfork_child(void)
{
    vgpu_tls_ctx = NULL;
    vgpu_tls_ci = NULL;
    vgpu_batch_atfork_child();
    vgpu_capture_atfork_child();
}

/* ---- the gate ---- */

/* Owner side: end the open batch b now (record its end event) so the
 * accountant can time it. Used before waiting, before reusing a stream
 * record for another stream and before a capture of its stream. Where the
 * record could land in a capture (another thread's, of the batch's stream
 * or, for the legacy stream, of a blocking one) the batch stays open for
 * the accountant to end once that capture is over. */
static void close_own(struct vgpu_batch *b)
{
    int open = VGPU_B_OPEN;
    if (!atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_CLOSING, memory_order_acquire,
                                                 memory_order_relaxed))
        return;
    int rec = vgpu_capture_record(b->ev_end, b->stream, b->ctx);
    if (rec == 0) {
        atomic_store_explicit(&b->state, VGPU_B_OPEN, memory_order_release);
        return;
    }
    if (rec > 0) {
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
    struct vgpu_tstream *ts = vgpu_tls_ts;
    if (ts && ts->ctx == ctx && ts->stream == s && ts->cur >= 0)
        close_own(&ts->b[ts->cur]);
}

void vgpu_batch_close_mine(void)
{
    struct vgpu_thread *t = vgpu_thread_peek();
    for (int i = 0; t && i < VGPU_THREAD_STREAMS; i++)
        if (t->ts[i].cur >= 0)
            close_own(&t->ts[i].b[t->ts[i].cur]);
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

/* HOLD (vgpu_abi.h): how long to wait before a launch fits, 0 if it fits
 * now. The queue's end is estimated from the launches admitted since the
 * hold began (each adds the measured cost per launch after the later of
 * now and the estimate) and, where that is less, from what is still in
 * flight (the accountant retires launches as their batches complete: the
 * estimate shrinks when the GPU ran ahead of it). Launches on several
 * streams are counted as if they ran one after another (conservative). */
#define HOLD_RECHECK_NS 100000
static uint64_t hold_wait(struct vgpu_hdev *hd, const struct vgpu_ctl_dev *cd, uint32_t grant, uint64_t now,
                          bool count)
{
    uint64_t end = __atomic_load_n(&cd->hold_end_ns, __ATOMIC_RELAXED);
    uint64_t until = __atomic_load_n(&cd->hold_until_ns, __ATOMIC_RELAXED);
    if (now >= until || end >= until)
        return 0; /* over: the neighbour is late (or a malformed hold) */
    uint64_t cost = __atomic_load_n(&hd->cost_ns, __ATOMIC_RELAXED);
    if (!cost)
        cost = VGPU_COST_INIT_NS;
    uint64_t fresh = now + (uint64_t)atomic_load_explicit(&hd->inflight, memory_order_relaxed) * cost;
    uint64_t q = atomic_load_explicit(&hd->hold_qend, memory_order_relaxed);
    if (atomic_load_explicit(&hd->hold_grant, memory_order_relaxed) != grant) {
        q = fresh;
        atomic_store_explicit(&hd->hold_qend, q, memory_order_relaxed);
        atomic_store_explicit(&hd->hold_grant, grant, memory_order_relaxed);
    }
    if (fresh < q)
        q = fresh;
    if (q < now)
        q = now;
    if (q + cost > end) {
        if (now + cost > end)
            return until - now; /* nothing fits any more: until the hold ends */
        uint64_t ns = until - now;
        return ns < HOLD_RECHECK_NS ? ns : HOLD_RECHECK_NS; /* the queue may shrink */
    }
    if (count)
        atomic_store_explicit(&hd->hold_qend, q + cost, memory_order_relaxed);
    return 0;
}

__attribute__((noinline)) bool vgpu_hold_admits(struct vgpu_hdev *hd, const struct vgpu_ctl_dev *cd, uint32_t grant)
{
    if (!atomic_load_explicit(&hd->busy, memory_order_relaxed) ||
        atomic_load_explicit(&hd->inflight, memory_order_relaxed) >=
            atomic_load_explicit(&hd->inflight_max, memory_order_relaxed))
        return false;
    return !hold_wait(hd, cd, grant, vgpu_now_ns(), true);
}

/* The slow path of the gate: wait until the slice owns the device (or is
 * pre-approved to take it) and there is in-flight room (or the slot is no
 * longer gated, or the daemon is gone or stalled). Returns the slot. */
__attribute__((noinline, cold)) int vgpu_gate_wait(struct vgpu_hdev *hd, CUcontext ctx, CUstream s)
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
        if (!vgpu_gated(flags))
            break;
        uint32_t g = __atomic_load_n(&cd->grant, __ATOMIC_ACQUIRE);
        uint32_t st = g & VGPU_GRANT_STATE_MASK;
        if (st == VGPU_GRANT_HOLD) {
            /* Owner, but a scheduled neighbour is due: launch only what will
             * have run by then; otherwise wait, for the queue to shrink or
             * the hold to end (or the grant to change: the neighbour came).
             * Next in line after a request: wait until its `until`. */
            uint64_t ns = hold_wait(hd, cd, g, vgpu_now_ns(), false);
            if (ns) {
                waited = true;
                say_want(hd, slot);
                if (ns > GATE_WAIT_NS)
                    ns = GATE_WAIT_NS;
                atomic_fetch_add_explicit(&hd->grant_waiters, 1, memory_order_acq_rel);
                futex_wait((_Atomic uint32_t *)&cd->grant, g, (long)ns, true);
                atomic_fetch_sub_explicit(&hd->grant_waiters, 1, memory_order_acq_rel);
                continue;
            }
        }
        if (st != VGPU_GRANT_WAIT) {
            /* RUN, TAKE or a HOLD it fits in: say so if not said, then wait
             * only for room. */
            say_want(hd, slot);
            if (atomic_load_explicit(&hd->inflight, memory_order_relaxed) <
                    atomic_load_explicit(&hd->inflight_max, memory_order_relaxed) ||
                !vgpu_account_running()) {
                if (st == VGPU_GRANT_HOLD)
                    hold_wait(hd, cd, g, vgpu_now_ns(), true); /* count this launch */
                break;
            }
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
__attribute__((noinline)) struct vgpu_batch *vgpu_batch_enter_slow(CUcontext ctx, struct vgpu_ctxinfo *ci,
                                                                      CUstream s, bool gate)
{
    struct vgpu_thread *t = vgpu_thread_state();
    if (!t)
        return NULL;
    uint64_t t0 = 0;
    for (;;) {
        struct vgpu_tstream *ts = find_tstream(t, ctx, s);
        if (ts) {
            vgpu_tls_ts = ts;
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

__attribute__((noinline)) void vgpu_batch_close(struct vgpu_batch *b)
{
    if (real_cuEventRecord(b->ev_end, b->stream) != CUDA_SUCCESS)
        b->ev_end = NULL; /* the accountant drops it */
    atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
}

/* The calling thread's current context's record, asking the driver. */
__attribute__((noinline)) struct vgpu_ctxinfo *vgpu_current_ci(void)
{
    CUcontext ctx = NULL;
    if (real_cuCtxGetCurrent(&ctx) != CUDA_SUCCESS || !ctx)
        return NULL;
    struct vgpu_ctxinfo *ci = vgpu_ctxinfo_get(ctx, true);
    if (!ci)
        return NULL;
    vgpu_tls_ctx = ctx;
    vgpu_tls_ci = ci;
    return ci;
}

