/*
 * hook_account.c - the accountant thread: turns completed batches into
 * CLOCK_MONOTONIC busy intervals in the stat ring.
 *
 * Every ~500 us it walks every thread's batches: an open batch idle for 1 ms
 * (its launch count unchanged over two looks 1 ms apart, so the launch path
 * reads no clock) or open for more than 1 ms is closed here (CAS OPEN ->
 * CLOSING, so the launching thread never waits), and a pending batch whose
 * end event has completed is timed (CAS PENDING -> CLOSING while it looks, so
 * a launching thread that found its pool empty can take the batch back and
 * extend it instead).
 *
 * Each completed (or dropped) batch of n launches gives n back to its
 * device's in-flight count, and its GPU time per launch feeds the device's
 * moving average, from which inflight_max and batch_max are published. GPU event times
 * are converted to host time through a per-context anchor: an event recorded
 * on a private stream and polled to completion, bracketed by host clock reads;
 * the tightest of a few tries is kept and refreshed every few seconds.
 *
 * Programs capture CUDA graphs meanwhile: the thread runs in relaxed capture
 * mode, and an open batch whose end event would land in a capture stays
 * open until the capture is over (ensure_relaxed, vgpu_capture_record).
 */
#include <limits.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "hook_services.h"

#define POLL_NS 500000
#define POLL_FAST_NS 100000        /* while others wait for a device we own */
#define IDLE_CLOSE_NS 1000000ull
#define IDLE_CLOSE_FAST_NS 100000ull
#define AGE_CLOSE_NS 1000000ull
#define IDLE_REPORT_NS 1000000ull  /* drained and quiet this long: say `idle` */
#define IDLE_REPORT_FAST_NS 150000ull
#define SWEEP_NS 100000000ull      /* capture table sweep period */
#define ANCHOR_REFRESH_NS 2000000000ull

static pthread_mutex_t amu = PTHREAD_MUTEX_INITIALIZER;
static CUcontext cur_ctx; /* accountant thread only */

/* While any thread captures a graph in global mode (PyTorch's default),
 * CUDA forbids every other thread still in the default (global) capture
 * mode the calls the accountant makes (event queries, the anchor's wait),
 * and one of them invalidates the capture: seen with PyTorch's CUDA graphs
 * on the H200, as with PyTorch's own NCCL watchdog. So the accountant's
 * thread puts itself in relaxed mode, once, before its first pass. 1: done;
 * 0: not yet (the driver is not initialized yet); -1: the driver cannot (no
 * cuThreadExchangeStreamCaptureMode): passes then pause during captures, a
 * race with every capture's beginning. Relaxed mode does not allow what
 * conflicts with a capture whatever the modes (recording into it, the legacy
 * stream beside a capturing blocking stream): vgpu_capture_record keeps the
 * hook's records out of captures. */
static int relaxed; /* accountant thread only */

static bool ensure_relaxed(void)
{
    if (relaxed == 0) {
        CUstreamCaptureMode m = CU_STREAM_CAPTURE_MODE_RELAXED;
        CUresult r = real_cuThreadExchangeStreamCaptureMode ? real_cuThreadExchangeStreamCaptureMode(&m)
                                                            : CUDA_ERROR_NOT_FOUND;
        if (r == CUDA_SUCCESS)
            relaxed = 1;
        else if (r != CUDA_ERROR_NOT_INITIALIZED)
            relaxed = -1;
    }
    return relaxed > 0;
}

static bool set_ctx(CUcontext ctx)
{
    if (cur_ctx == ctx)
        return true;
    if (real_cuCtxSetCurrent(ctx) != CUDA_SUCCESS)
        return false;
    cur_ctx = ctx;
    return true;
}

/* Host time of one event on the private stream; false on driver error. */
static bool anchor_sample(struct vgpu_ctxinfo *ci, CUevent ev, uint64_t *mid, uint64_t *err)
{
    uint64_t t0 = vgpu_now_ns();
    if (real_cuEventRecord(ev, ci->priv_stream) != CUDA_SUCCESS)
        return false;
    for (;;) {
        CUresult q = real_cuEventQuery(ev);
        if (q == CUDA_SUCCESS)
            break;
        if (q != CUDA_ERROR_NOT_READY)
            return false;
        if (vgpu_now_ns() - t0 > 100000000ull)
            return false; /* device too busy to anchor now; try later */
        struct timespec ts = {0, 10000};
        nanosleep(&ts, NULL);
    }
    uint64_t t1 = vgpu_now_ns();
    *err = (t1 - t0) / 2;
    *mid = t0 + *err;
    return true;
}

static bool ensure_anchor(struct vgpu_ctxinfo *ci)
{
    uint64_t now = vgpu_now_ns();
    if (ci->anchor_ev && now - ci->anchor_taken < ANCHOR_REFRESH_NS)
        return true;
    if (!ci->priv_stream && real_cuStreamCreate(&ci->priv_stream, CU_STREAM_NON_BLOCKING) != CUDA_SUCCESS) {
        ci->priv_stream = NULL;
        return ci->anchor_ev != NULL;
    }
    int best = -1;
    uint64_t best_mid = 0, best_err = UINT64_MAX;
    for (int k = 0; k < 3; k++) {
        CUevent *ev = &ci->anchor_cand[k];
        if (*ev == ci->anchor_ev && *ev)
            continue; /* in use as the current anchor */
        if (!*ev && real_cuEventCreate(ev, CU_EVENT_DEFAULT) != CUDA_SUCCESS) {
            *ev = NULL;
            continue;
        }
        uint64_t mid, err;
        if (anchor_sample(ci, *ev, &mid, &err) && err < best_err) {
            best = k;
            best_mid = mid;
            best_err = err;
        }
    }
    if (best < 0)
        return ci->anchor_ev != NULL;
    /* A fresh anchor wins unless much looser than the one we have: clocks
     * drift, so an old tight anchor is worth less than a new loose one. */
    if (!ci->anchor_ev || best_err <= ci->anchor_err * 4 + 20000 || now - ci->anchor_taken > 5 * ANCHOR_REFRESH_NS) {
        ci->anchor_ev = ci->anchor_cand[best];
        ci->anchor_ns = best_mid;
        ci->anchor_err = best_err;
    }
    ci->anchor_taken = now;
    return true;
}

static bool event_host_ns(struct vgpu_ctxinfo *ci, CUevent ev, uint64_t *out)
{
    float ms = 0;
    if (real_cuEventElapsedTime(&ms, ci->anchor_ev, ev) != CUDA_SUCCESS)
        return false;
    double ns = (double)ci->anchor_ns + (double)ms * 1e6;
    *out = ns < 0 ? 0 : (uint64_t)ns;
    return true;
}

static void publish(int hidx, uint64_t s, uint64_t e)
{
    int slot = atomic_load(&vgpu_hdevs[hidx].slot);
    struct vgpu_stat_dev *d = vgpu_stat_dev(slot);
    if (!d)
        return;
    if (e < s)
        e = s;
    uint64_t head = __atomic_load_n(&d->ring_head, __ATOMIC_RELAXED);
    struct vgpu_interval *iv = &d->ring[head % VGPU_RING_SLOTS];
    __atomic_store_n(&iv->start_ns, s, __ATOMIC_RELAXED);
    __atomic_store_n(&iv->end_ns, e, __ATOMIC_RELAXED);
    __atomic_store_n(&d->ring_head, head + 1, __ATOMIC_RELEASE);
    __atomic_fetch_add(&d->busy_ns, e - s, __ATOMIC_RELAXED);
}

/* The batch's launches are no longer in flight. */
static void retire(struct vgpu_batch *b)
{
    unsigned n = atomic_load_explicit(&b->n, memory_order_relaxed);
    if (b->ci && n) {
        _Atomic uint32_t *inf = &vgpu_hdevs[b->ci->hidx].inflight;
        uint32_t cur = atomic_load_explicit(inf, memory_order_relaxed);
        /* never below zero, even after a fork reset raced a late batch */
        while (!atomic_compare_exchange_weak_explicit(inf, &cur, cur > n ? cur - n : 0, memory_order_relaxed,
                                                      memory_order_relaxed))
            ;
        struct vgpu_hdev *hd = &vgpu_hdevs[b->ci->hidx];
        atomic_fetch_add_explicit(&hd->room_word, 1, memory_order_release);
        if (atomic_load_explicit(&hd->room_waiters, memory_order_acquire))
            syscall(SYS_futex, &hd->room_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
    atomic_store_explicit(&b->n, 0, memory_order_relaxed);
}

/* The GPU time an owner of this device may keep queued: the daemon's
 * bound, or VGPU_INFLIGHT_NS when it sets none (0). */
static uint64_t inflight_bound(struct vgpu_hdev *hd)
{
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    int slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
    if (!ctl || slot < 0 || slot >= (int)VGPU_MAX_DEVICES)
        return VGPU_INFLIGHT_NS;
    uint64_t ns = __atomic_load_n(&ctl->dev[slot].inflight_ns, __ATOMIC_RELAXED);
    return ns ? ns : VGPU_INFLIGHT_NS;
}

/* Publish inflight_max and batch_max from the bound and the cost per launch. */
static void publish_limits(struct vgpu_hdev *hd)
{
    uint64_t c = hd->cost_ns ? hd->cost_ns : VGPU_COST_INIT_NS;
    uint64_t m = inflight_bound(hd) / c;
    if (m < VGPU_INFLIGHT_MIN)
        m = VGPU_INFLIGHT_MIN;
    if (m > 65536)
        m = 65536;
    uint64_t bm = m / 2;
    if (bm < 1)
        bm = 1;
    if (bm > VGPU_BATCH_MAX)
        bm = VGPU_BATCH_MAX;
    uint32_t old = atomic_load_explicit(&hd->inflight_max, memory_order_relaxed);
    atomic_store_explicit(&hd->inflight_max, (uint32_t)m, memory_order_relaxed);
    atomic_store_explicit(&hd->batch_max, (uint32_t)bm, memory_order_relaxed);
    if (m > old && atomic_load_explicit(&hd->room_waiters, memory_order_acquire)) {
        atomic_fetch_add_explicit(&hd->room_word, 1, memory_order_release);
        syscall(SYS_futex, &hd->room_word, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    }
}

/* A completed batch of n launches took busy ns: update the device's cost per
 * launch (published for the daemon, which sizes windows by it) and the
 * limits derived from it. */
static void learn_cost(struct vgpu_hdev *hd, uint64_t busy, unsigned n)
{
    if (!n)
        return;
    uint64_t sample = busy / n;
    hd->cost_ns = hd->cost_ns ? (hd->cost_ns * 7 + sample) / 8 : sample;
    struct vgpu_stat_dev *sd = vgpu_stat_dev(atomic_load_explicit(&hd->slot, memory_order_relaxed));
    if (sd)
        __atomic_store_n(&sd->cost_ns, hd->cost_ns, __ATOMIC_RELAXED);
    publish_limits(hd);
}

static void drop(struct vgpu_batch *b)
{
    atomic_fetch_add(&vgpu_lost_batches, 1);
    retire(b);
    atomic_store_explicit(&b->state, VGPU_B_FREE, memory_order_release);
}

static void finish(struct vgpu_batch *b)
{
    int pending = VGPU_B_PENDING;
    if (!atomic_compare_exchange_strong_explicit(&b->state, &pending, VGPU_B_CLOSING, memory_order_acquire,
                                                 memory_order_relaxed))
        return; /* its thread took it back to extend it */
    struct vgpu_ctxinfo *ci = b->ci;
    if (!ci || !b->ev_end || atomic_load(&ci->ctx) != b->ctx || !set_ctx(b->ctx)) {
        drop(b);
        return;
    }
    CUresult q = real_cuEventQuery(b->ev_end);
    if (q == CUDA_ERROR_NOT_READY) {
        atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
        return;
    }
    if (q != CUDA_SUCCESS || !ensure_anchor(ci)) {
        drop(b);
        return;
    }
    uint64_t s, e;
    if (!event_host_ns(ci, b->ev_start, &s) || !event_host_ns(ci, b->ev_end, &e)) {
        drop(b);
        return;
    }
    /* A batch that began on the previous connection's slot numbering still
     * belongs to this device: publish it into the current page. */
    publish(ci->hidx, s, e);
    learn_cost(&vgpu_hdevs[ci->hidx], e > s ? e - s : 0, atomic_load_explicit(&b->n, memory_order_relaxed));
    retire(b);
    atomic_store_explicit(&b->state, VGPU_B_FREE, memory_order_release);
}

/* The slot's ctl flags (0 when not attached or not registered). */
static uint32_t dev_flags(const struct vgpu_hdev *hd)
{
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    int slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
    if (!ctl || slot < 0 || slot >= (int)VGPU_MAX_DEVICES)
        return 0;
    return __atomic_load_n(&ctl->dev[slot].flags, __ATOMIC_ACQUIRE);
}

static uint32_t grant_state(int slot)
{
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    if (!ctl || slot < 0 || slot >= (int)VGPU_MAX_DEVICES)
        return VGPU_GRANT_WAIT;
    return __atomic_load_n(&ctl->dev[slot].grant, __ATOMIC_ACQUIRE) & VGPU_GRANT_STATE_MASK;
}

static bool fast_device(const struct vgpu_hdev *hd)
{
    uint32_t f = dev_flags(hd);
    return (f & (VGPU_DEV_ACTIVE | VGPU_DEV_UNLIMITED | VGPU_DEV_CONTENDED)) ==
           (VGPU_DEV_ACTIVE | VGPU_DEV_CONTENDED);
}

/* now: CLOCK_MONOTONIC (the quiet rule, which must resolve 100 µs: the
 * coarse clock ticks every 1-4 ms); coarse: the clock first_ns was read on;
 * force: the exit flush (nothing waits for a capture to end). */
static void close_idle(struct vgpu_batch *b, uint64_t now, uint64_t coarse, bool force)
{
    /* Fields the owner wrote before publishing OPEN (release). */
    unsigned n = atomic_load_explicit(&b->n, memory_order_relaxed);
    if (n != b->seen_n || !b->seen_ns) {
        b->seen_n = n;
        b->seen_ns = now;
    }
    /* Where other slices wait for the device, a quiet batch is ended
     * sooner: its end tells the owner's idleness (and its tail) sooner. */
    uint64_t quiet = b->ci && fast_device(&vgpu_hdevs[b->ci->hidx]) ? IDLE_CLOSE_FAST_NS : IDLE_CLOSE_NS;
    bool idle = now >= b->seen_ns && now - b->seen_ns >= quiet;
    bool old = coarse >= b->first_ns && coarse - b->first_ns >= AGE_CLOSE_NS;
    if (!idle && !old)
        return;
    int open = VGPU_B_OPEN;
    if (!atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_CLOSING, memory_order_acquire,
                                                 memory_order_relaxed))
        return;
    /* The per-thread default stream is the launching thread's: from here we
     * can only reach it through the legacy stream, which waits for it. */
    CUstream s = b->stream == CU_STREAM_PER_THREAD ? CU_STREAM_LEGACY : b->stream;
    if (!b->ci || atomic_load(&b->ci->ctx) != b->ctx || !set_ctx(b->ctx)) {
        drop(b);
        return;
    }
    /* Never into a capture (the stream's own, or a blocking stream's that
     * the legacy stream would wait for): the batch stays open until the
     * capture is over, and a later pass ends it. */
    int rec = vgpu_capture_record(b->ev_end, s, b->ctx);
    if (rec == 0 && !force) {
        atomic_store_explicit(&b->state, VGPU_B_OPEN, memory_order_release);
        return;
    }
    if (rec <= 0) {
        drop(b);
        return;
    }
    atomic_store_explicit(&b->state, VGPU_B_PENDING, memory_order_release);
}

/* What the last pass saw (accountant thread only): batches still open, and
 * batches it finished; per device, batches not yet free. */
static int pass_open, pass_done;
static int pass_live[VGPU_MAX_HDEV];

/* One walk over every batch; returns how many are still open or pending.
 * `force` closes open batches regardless of idleness (exit flush). */
static int pass_ex(bool force)
{
    int left = 0;
    pass_open = pass_done = 0;
    memset(pass_live, 0, sizeof pass_live);
    uint64_t now = force ? UINT64_MAX / 2 : vgpu_now_ns();
    uint64_t coarse = force ? UINT64_MAX / 2 : vgpu_coarse_ns();
    for (struct vgpu_thread *t = atomic_load(&vgpu_threads); t; t = t->next) {
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++) {
            for (int j = 0; j < VGPU_BATCH_RING; j++) {
                struct vgpu_batch *b = &t->ts[i].b[j];
                int st = atomic_load_explicit(&b->state, memory_order_acquire);
                if (st == VGPU_B_OPEN)
                    close_idle(b, now, coarse, force);
                st = atomic_load_explicit(&b->state, memory_order_acquire);
                if (st == VGPU_B_PENDING) {
                    finish(b);
                    pass_done += atomic_load_explicit(&b->state, memory_order_acquire) != VGPU_B_PENDING;
                }
                st = atomic_load_explicit(&b->state, memory_order_acquire);
                left += st == VGPU_B_OPEN || st == VGPU_B_PENDING;
                pass_open += st == VGPU_B_OPEN;
                if (st != VGPU_B_FREE && b->ci && b->ci->hidx >= 0 && b->ci->hidx < VGPU_MAX_HDEV)
                    pass_live[b->ci->hidx]++;
            }
        }
    }
    return left;
}

/* After a pass: a gated device whose process said `want` and has since
 * drained (no launch in flight, no batch open) and launched nothing for a
 * while gets an `idle`, so the daemon can hand it to someone else. Returns
 * 2 if some device is owned while others wait for it (poll fast), 1 if
 * some gated device is still busy (poll at least every IDLE_REPORT_NS). */
static int report_idle(void)
{
    int fast = 0;
    uint64_t now = vgpu_now_ns();
    int n = atomic_load(&vgpu_nr_hdev);
    for (int i = 0; i < n && i < VGPU_MAX_HDEV; i++) {
        struct vgpu_hdev *hd = &vgpu_hdevs[i];
        int slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
        struct vgpu_stat_dev *sd = vgpu_stat_dev(slot);
        if (!sd)
            continue;
        uint32_t f = dev_flags(hd);
        if ((f & (VGPU_DEV_ACTIVE | VGPU_DEV_UNLIMITED)) != VGPU_DEV_ACTIVE)
            continue;
        /* Lost the device (RUN or TAKE, then WAIT): once what was queued
         * has run, say `drained`, so the next owner starts on an empty
         * device instead of sharing its time-slices with our tail. */
        uint32_t st = grant_state(slot);
        if (st == VGPU_GRANT_WAIT && hd->seen_grant != VGPU_GRANT_WAIT)
            hd->drain_pending = 1;
        hd->seen_grant = st;
        if (hd->drain_pending && st == VGPU_GRANT_WAIT && !pass_live[i] &&
            !atomic_load_explicit(&hd->inflight, memory_order_relaxed)) {
            if (vgpu_client_notify(slot, VGPU_NOTE_DRAINED))
                hd->drain_pending = 0;
        }
        if (hd->drain_pending)
            fast = 2;
        if (!atomic_load_explicit(&hd->busy, memory_order_acquire))
            continue;
        bool contended = f & VGPU_DEV_CONTENDED;
        fast = contended ? 2 : fast > 1 ? fast : 1;
        uint64_t launches = __atomic_load_n(&sd->launches, __ATOMIC_RELAXED);
        if (launches != hd->idle_launches || pass_live[i] ||
            atomic_load_explicit(&hd->inflight, memory_order_relaxed) ||
            atomic_load_explicit(&hd->grant_waiters, memory_order_relaxed) ||
            atomic_load_explicit(&hd->room_waiters, memory_order_relaxed)) {
            hd->idle_launches = launches;
            hd->idle_since = now;
            continue;
        }
        if (now - hd->idle_since < (contended ? IDLE_REPORT_FAST_NS : IDLE_REPORT_NS))
            continue;
        /* Under the note lock, and only if nothing was launched meanwhile: a
         * `want` sent by a launching thread since then is not undone. */
        pthread_mutex_lock(&hd->note_mu);
        if (atomic_load_explicit(&hd->busy, memory_order_relaxed) &&
            __atomic_load_n(&sd->launches, __ATOMIC_RELAXED) == hd->idle_launches &&
            !atomic_load_explicit(&hd->grant_waiters, memory_order_relaxed) &&
            vgpu_client_notify(slot, VGPU_NOTE_IDLE))
            atomic_store_explicit(&hd->busy, 0, memory_order_release);
        pthread_mutex_unlock(&hd->note_mu);
    }
    return fast;
}

/* At exit() the last batches are still open or in flight: publish them, or
 * the GPU time of a short program's tail would never be charged. Runs from
 * atexit (before library destructors), so the driver is still alive. */
static void account_flush(void)
{
    if (!atomic_load(&vgpu_account_started) || atomic_load(&vgpu_mode) != VGPU_MODE_REGISTERED)
        return;
    uint64_t deadline = vgpu_now_ns() + 500000000ull;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_nsec += 500000000;
    if (dl.tv_nsec >= 1000000000) {
        dl.tv_sec++;
        dl.tv_nsec -= 1000000000;
    }
    if (pthread_mutex_timedlock(&amu, &dl) != 0)
        return;
    cur_ctx = NULL; /* this thread's current context is not the accountant's */
    /* Nor its capture mode: relaxed for the flush too, then back. */
    CUstreamCaptureMode mode = CU_STREAM_CAPTURE_MODE_RELAXED;
    bool swapped = real_cuThreadExchangeStreamCaptureMode &&
                   real_cuThreadExchangeStreamCaptureMode(&mode) == CUDA_SUCCESS;
    while (pass_ex(true) > 0 && vgpu_now_ns() < deadline) {
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
    if (swapped)
        real_cuThreadExchangeStreamCaptureMode(&mode);
    cur_ctx = NULL;
    pthread_mutex_unlock(&amu);
}

#define CAPTURE_PAUSE_MAX_NS 5000000000ull

/* The accountant's deep sleep when the process launches nothing: it waits on
 * vgpu_account_wake_word, which vgpu_account_kick (hook_batch.c) bumps. */
#define IDLE_POLL_MAX_NS 8000000ull
#define PENDING_POLL_MAX_NS 2000000ull
#define STALLED_POLLS 8 /* 4 ms of waiting on other processes' work before backing off */

static void *account_main(void *arg)
{
    (void)arg;
    vgpu_in_hook = 1;
    uint64_t idle_ns = POLL_NS;
    unsigned stalled = 0; /* passes in a row that found only unfinished batches */
    for (;;) {
        /* In relaxed capture mode, passes go on during captures (batches on
         * a capturing stream, or on the legacy stream beside a capturing
         * blocking one, wait for the capture's end). Without it, a pass
         * would invalidate a global-mode capture: passes pause while any
         * capture is counted (captures are short; measurement resumes, late
         * but complete, when they end). */
        static uint64_t capture_since, last_sweep;
        bool relaxed_ok = ensure_relaxed();
        bool capturing = atomic_load_explicit(&vgpu_active_captures, memory_order_acquire) > 0;
        uint64_t now = vgpu_coarse_ns();
        if (!capturing)
            capture_since = 0;
        else if (!capture_since)
            capture_since = now;
        /* A capture that never ends as far as we can see (ended through a
         * path we do not intercept) must not stop measurement for good. */
        int busy = 1;
        int fast = 0;
        if (capturing && now - last_sweep > SWEEP_NS) {
            last_sweep = now;
            vgpu_capture_sweep();
        }
        if (!capturing || relaxed_ok || now - capture_since > CAPTURE_PAUSE_MAX_NS) {
            pthread_mutex_lock(&amu);
            busy = pass_ex(false);
            fast = report_idle();
            pthread_mutex_unlock(&amu);
        }
        for (int i = 0; i < atomic_load(&vgpu_nr_hdev) && i < VGPU_MAX_HDEV; i++)
            if (atomic_load_explicit(&vgpu_hdevs[i].room_waiters, memory_order_relaxed) > 0)
                fast = 2;
        /* Poll every 500 µs while batches are open or finishing; back off to
         * 8 ms while the process launches nothing, so that idle CUDA
         * processes cost nothing (200 of them polling at 2 kHz kept a 2-core
         * machine's load average past 200), and to 2 ms once its batches
         * have only waited for 4 ms for a device busy with other processes'
         * work (nothing open, nothing finished: 200 contending processes
         * polling at 2 kHz kept it past 100; backing off at once cost a
         * hard-capped 70 % tenant 4 % of its share). Either sleep ends at once when a launching
         * thread opens a batch (vgpu_account_kick): an open batch must be
         * closed on time, or its measured span takes in idle time. */
        stalled = busy && !pass_open && !pass_done ? stalled + 1 : 0;
        if (fast == 2)
            idle_ns = POLL_FAST_NS;
        else if (fast == 1)
            idle_ns = POLL_NS;
        else if (!busy)
            idle_ns = idle_ns * 2 > IDLE_POLL_MAX_NS ? IDLE_POLL_MAX_NS : idle_ns * 2;
        else if (stalled > STALLED_POLLS)
            idle_ns = idle_ns * 2 > PENDING_POLL_MAX_NS ? PENDING_POLL_MAX_NS : idle_ns * 2;
        else
            idle_ns = POLL_NS;
        struct timespec ts = {0, (long)idle_ns};
        if (idle_ns > POLL_NS) {
            uint32_t w = atomic_load_explicit(&vgpu_account_wake_word, memory_order_acquire);
            atomic_store_explicit(&vgpu_account_asleep, 1, memory_order_release);
            syscall(SYS_futex, &vgpu_account_wake_word, FUTEX_WAIT_PRIVATE, w, &ts, NULL, 0);
            if (!atomic_exchange_explicit(&vgpu_account_asleep, 0, memory_order_acq_rel))
                idle_ns = POLL_NS; /* kicked: work has started */
        } else {
            nanosleep(&ts, NULL);
        }
    }
    return NULL;
}

void vgpu_account_start(void)
{
    if (atomic_exchange(&vgpu_account_started, 1))
        return;
    static _Atomic int flush_registered;
    if (!atomic_exchange(&flush_registered, 1))
        atexit(account_flush);
    if (!vgpu_start_thread(account_main)) {
        atomic_store(&vgpu_account_started, 0);
        vgpu_warn_once(VGPU_W_THREAD, "vgpu: cannot start the accountant thread; GPU time is not measured");
    }
}

void vgpu_account_forget_ctx(CUcontext ctx)
{
    pthread_mutex_lock(&amu);
    for (struct vgpu_thread *t = atomic_load(&vgpu_threads); t; t = t->next) {
        for (int i = 0; i < VGPU_THREAD_STREAMS; i++) {
            for (int j = 0; j < VGPU_BATCH_RING; j++) {
                struct vgpu_batch *b = &t->ts[i].b[j];
                if (b->ev_ctx != ctx && b->ctx != ctx)
                    continue;
                int st = atomic_load(&b->state);
                if (st == VGPU_B_INUSE)
                    continue; /* a launch racing the destroy: the program's bug */
                /* The events die with the context. */
                if (b->ev_ctx == ctx) {
                    b->ev_start = b->ev_end = NULL;
                    b->ev_ctx = NULL;
                }
                if (b->ctx == ctx && st != VGPU_B_FREE) {
                    int want = st;
                    if (atomic_compare_exchange_strong(&b->state, &want, VGPU_B_CLOSING))
                        drop(b);
                }
            }
        }
    }
    struct vgpu_ctxinfo *ci = vgpu_ctxinfo_get(ctx, false);
    if (ci) {
        ci->priv_stream = NULL;
        ci->anchor_ev = NULL;
        for (int k = 0; k < 3; k++)
            ci->anchor_cand[k] = NULL;
        ci->anchor_taken = 0;
    }
    if (cur_ctx == ctx)
        cur_ctx = NULL;
    pthread_mutex_unlock(&amu);
}

void vgpu_account_atfork_child(void)
{
    pthread_mutex_init(&amu, NULL);
    atomic_store(&vgpu_account_started, 0);
    cur_ctx = NULL;
    relaxed = 0; /* the child's accountant is a new thread */
}
