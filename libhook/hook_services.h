/*
 * hook_services.h - layer 2 of libvgpu-hook.so: what the hook does for an
 * entry point (see hook_base.h for the layers). Uses layers 0 and 1.
 *
 *   hook_dev.c      devices (by UUID, attached lazily) and contexts
 *   hook_view.c     the devices a slice restricted by gpu.devices shows:
 *                   CUDA's (through the driver's CUDA_VISIBLE_DEVICES) and
 *                   NVML's lists
 *   hook_mem.c      the reserve / commit / rollback steps of an allocation
 *                   and the table of what each handle holds
 *   hook_capture.c  which streams are being captured into a CUDA graph
 *   hook_batch.c    the batch records launching threads fill and the
 *                   accountant times, and the accountant's wake-up
 *   hook_gate.c     the launch gate's slow paths and the batches' owner side;
 *                   its fast path is inline below, compiled into each
 *                   launch entry point
 *   hook_account.c  the accountant thread: batch timings -> the stat ring,
 *                   idleness and drain notes to the daemon
 */
#ifndef VGPU_HOOK_SERVICES_H
#define VGPU_HOOK_SERVICES_H

#include "hook_client.h"

#pragma GCC visibility push(hidden)

/* ---------------------------------------------------------------------- */
/* hook_dev.c: devices and contexts.                                        */

/* Reset the in-flight state of one device to "nothing measured". */
void vgpu_hdev_inflight_init(struct vgpu_hdev *d);
/* hdev index for CUdevice ordinal (resolves uuid/total on first use), -1 on
 * failure. Does not attach. */
int vgpu_hdev_of_cudev(CUdevice dev);
/* hdev index for a uuid string with the given total (NVML path). */
int vgpu_hdev_of_uuid(const char *uuid, uint64_t total);
/* Ensure attached: returns slot >= 0, -1 if refused, -2 if not registered
 * or daemon down, -3 if the slice has no memory left for a context. */
int vgpu_hdev_attach(int hidx);
/* hdev index of the calling thread's current context, -1 if none. */
int vgpu_current_hdev(void);
void vgpu_dev_atfork_child(void);
/* Clamp (free,total) to the slot's limit. */
void vgpu_clamp_mem(int hidx, uint64_t *free_b, uint64_t *total_b);

/* ---------------------------------------------------------------------- */
/* hook_view.c: the device list of a slice that gpu.devices restricts.      */

/* The slice's devices in the order the program sees them (NVML's indices
 * inside the slice; CUDA's ordinals unless CUDA_VISIBLE_DEVICES narrows
 * them further), fixed the first time it is asked for in a process image.
 * NULL when nothing is restricted: the slice may use every device, or the
 * hook is not registered. */
struct vgpu_view {
    int n;
    char uuid[VGPU_MAX_HDEV][VGPU_UUID_MAX];
};
const struct vgpu_view *vgpu_view(void);
/* The position of a device's UUID in the view, -1 if it is not there. */
int vgpu_view_index(const struct vgpu_view *v, const char *uuid);
/* A CUDA_VISIBLE_DEVICES value (NULL: unset) read on a node that has just
 * the view's devices: the positions in the view of the devices it leaves,
 * in its order, into out (at most cap); how many. Pure. */
int vgpu_view_compose(const struct vgpu_view *v, const char *cvd, int *out, int cap);
/* The driver's cuInit, with CUDA_VISIBLE_DEVICES set to what the view and
 * the program's own value leave (CUDA_ERROR_NO_DEVICE, without the driver,
 * when that is nothing). */
CUresult vgpu_view_cuinit(unsigned int flags);
void vgpu_view_atfork_child(void);

/* Per-context record: the device and the accountant's timing anchor. */
struct vgpu_ctxinfo {
    _Atomic(CUcontext) ctx;     /* NULL = free record */
    int hidx;
    _Atomic int dead;
    /* accountant-only: */
    CUstream priv_stream;
    CUevent anchor_ev;
    CUevent anchor_cand[3];
    uint64_t anchor_ns;         /* host CLOCK_MONOTONIC of anchor_ev */
    uint64_t anchor_err;        /* half-width of the bracket */
    uint64_t anchor_taken;      /* when it was taken */
};
#define VGPU_MAX_CTX 64
extern struct vgpu_ctxinfo vgpu_ctxs[VGPU_MAX_CTX];
struct vgpu_ctxinfo *vgpu_ctxinfo_get(CUcontext ctx, bool create);

/* Record a context the program just made (or retained) on device hidx. */
void vgpu_ctxinfo_note(CUcontext ctx, int hidx);

/* ---------------------------------------------------------------------- */
/* hook_mem.c: reserve with the daemon first, call the driver, give the     */
/* reservation back if the driver fails, remember what each handle holds.  */

enum vgpu_alloc_kind { VGPU_K_PTR = 1, VGPU_K_ARRAY, VGPU_K_MIPMAP, VGPU_K_VMM };
struct vgpu_resv {
    int hidx;       /* -1: not accounted (not registered, unknown device) */
    uint64_t n;
};
/* Reserve n bytes on device hidx before the driver allocates. mode: the
 * entry point's mode_ (nothing is accounted unless REGISTERED: not
 * registered, or re-entered from the driver). CUDA_SUCCESS, or the error the
 * entry point returns without calling the driver. */
CUresult vgpu_mem_reserve(int mode, int hidx, uint64_t n, struct vgpu_resv *rv);
/* The driver failed: give the reservation back. */
void vgpu_mem_rollback(struct vgpu_resv *rv);
/* The driver allocated: remember handle (kind, key) -> what rv reserved. */
void vgpu_mem_commit(struct vgpu_resv *rv, int kind, uint64_t key);
/* The driver freed handle (kind, key): release exactly what it held. */
void vgpu_mem_forget(int kind, uint64_t key);
/* The device of the calling thread's current context, when accounting. */
int vgpu_mem_cur_hdev(int mode);
void vgpu_mem_atfork_child(void);

/* ---------------------------------------------------------------------- */
/* hook_batch.c, hook_capture.c, hook_gate.c, hook_account.c: GPU time.     */

enum vgpu_batch_state {
    VGPU_B_FREE = 0,    /* may be (re)used by the owning thread */
    VGPU_B_OPEN,        /* owned by its thread between launches; accountant may close */
    VGPU_B_INUSE,       /* its thread is launching into it right now */
    VGPU_B_CLOSING,     /* accountant is recording the end event */
    VGPU_B_PENDING,     /* end recorded; accountant waits for completion (it
                           takes PENDING -> CLOSING while it queries) */
};

struct vgpu_batch {
    _Atomic int state;
    CUcontext ctx;
    struct vgpu_ctxinfo *ci;
    CUstream stream;
    int ptsz;
    CUevent ev_start, ev_end;   /* created lazily in ctx, reused */
    CUcontext ev_ctx;           /* context the events belong to */
    _Atomic unsigned n;         /* launches in the batch (owner writes) */
    uint64_t first_ns;          /* when it was opened (coarse clock) */
    /* accountant-only: idle detection without a clock read per launch */
    unsigned seen_n;
    uint64_t seen_ns;           /* CLOCK_MONOTONIC of the last change seen, 0 = not looked yet */
    uint64_t conn_gen;
};

#define VGPU_BATCH_RING 16
#define VGPU_THREAD_STREAMS 8
struct vgpu_tstream {
    CUcontext ctx;
    CUstream stream;
    int ptsz;
    int cur;                    /* index of the current batch, -1 none */
    struct vgpu_batch b[VGPU_BATCH_RING];
};

struct vgpu_thread {
    struct vgpu_thread *next;   /* global list, push-only */
    _Atomic int alive;
    _Atomic int claimed;
    unsigned rr;                /* round robin victim for tstreams */
    struct vgpu_tstream ts[VGPU_THREAD_STREAMS];
};
extern _Atomic(struct vgpu_thread *) vgpu_threads;
extern _Atomic uint64_t vgpu_lost_batches;
/* The calling thread's batch records (made on its first launch). */
struct vgpu_thread *vgpu_thread_state(void);
/* The same, NULL if it has none (never made here). */
struct vgpu_thread *vgpu_thread_peek(void);
/* The accountant: started by registration (hook_account.c), asleep while the
 * process launches nothing; a launching thread that opens a batch kicks it. */
extern _Atomic int vgpu_account_started;
extern _Atomic int vgpu_account_asleep;
extern _Atomic uint32_t vgpu_account_wake_word;
void vgpu_account_kick(void);
/* The accountant thread is running (batches will complete). */
bool vgpu_account_running(void);
void vgpu_batch_atfork_child(void);

/* Stream captures (hook_capture.c): only while one is active anywhere do
 * launches pay for cuStreamIsCapturing. */
extern _Atomic int vgpu_active_captures;
bool vgpu_stream_capturing(CUstream s, int ptsz);
/* A capture of s (as a _ptsz entry point saw it when ptsz) is about to
 * begin: list and count it before the driver is called, so that no record
 * of the hook's lands in it. Returns a ticket for vgpu_capture_begun, which
 * says whether the driver began it. */
int vgpu_capture_begin(CUstream s, int ptsz);
void vgpu_capture_begun(int ticket, bool ok);
/* The capture of s (as vgpu_capture_begin named it) has ended. */
void vgpu_capture_end(CUstream s, int ptsz);
/* Drop the entry of stream s (all of ctx's when any_of_ctx). */
void vgpu_capture_drop(CUstream s, CUcontext ctx, bool any_of_ctx);
/* Record the hook's event ev onto stream s of context ctx, unless it could
 * land in a capture (s capturing or beginning to; s the legacy stream while
 * a blocking stream of ctx captures): 1 recorded, 0 not now, -1 the
 * driver's error. A BeginCapture waits for a record in progress. */
int vgpu_capture_record(CUevent ev, CUstream s, CUcontext ctx);
/* Captures: drop what a destroyed context had; drop entries whose stream no
 * longer captures (accountant thread, while any capture is counted). */
void vgpu_capture_forget_ctx(CUcontext ctx);
void vgpu_capture_sweep(void);
void vgpu_capture_atfork_child(void);

void vgpu_account_start(void);
void vgpu_account_atfork_child(void);
/* Drop every batch of ctx (called before the context is destroyed). */
void vgpu_account_forget_ctx(CUcontext ctx);

/* The gate (hook_gate.c). Initial-exec TLS: the hook is loaded by
 * LD_PRELOAD, so its TLS is static and a thread-local read is one
 * instruction instead of a __tls_get_addr call. */
extern _Thread_local CUcontext vgpu_tls_ctx __attribute__((tls_model("initial-exec")));
extern _Thread_local struct vgpu_ctxinfo *vgpu_tls_ci __attribute__((tls_model("initial-exec")));
extern _Thread_local struct vgpu_tstream *vgpu_tls_ts __attribute__((tls_model("initial-exec")));
/* The calling thread's current context may have changed (create, destroy,
 * set, push, pop): the launch path asks the driver again on its next launch. */
static inline void vgpu_launch_ctx_changed(void)
{
    vgpu_tls_ci = NULL;
}
void vgpu_launch_atfork_child(void);
/* The slow halves of the fast path below (noinline, out of its way). */
__attribute__((noinline, cold)) int vgpu_gate_wait(struct vgpu_hdev *hd, CUcontext ctx, CUstream s);
__attribute__((noinline)) struct vgpu_batch *vgpu_batch_enter_slow(CUcontext ctx, struct vgpu_ctxinfo *ci,
                                                                    CUstream s, bool gate);
__attribute__((noinline)) void vgpu_batch_close(struct vgpu_batch *b);
/* End the calling thread's open batches (before it begins a capture: their
 * end events stay out of it, and the accountant need not wait for its end
 * to end them). */
void vgpu_batch_close_mine(void);
__attribute__((noinline)) struct vgpu_ctxinfo *vgpu_current_ci(void);
/* Under a HOLD grant: whether one more launch fits before the hold's end
 * (by the hook's estimate of when what it queued will have run), counting
 * it in the estimate if so. One clock read; no syscall, no lock. */
__attribute__((noinline)) bool vgpu_hold_admits(struct vgpu_hdev *hd, const struct vgpu_ctl_dev *cd, uint32_t grant);

/* ---- the launch fast path, inline in every launch entry point ----
 *
 * Per launch: one acquire load of the ctl page pointer, loads of the slot's
 * flags (and, for a gated slot, of its grant word, of whether this process
 * has told the daemon it is busy, and of the device's in-flight count and
 * limit), relaxed adds to the stat page and the in-flight count, and
 * thread-local batch bookkeeping whose only shared step is one CAS on the
 * batch's state (the hand-off with the accountant). No syscall, no lock, no
 * allocation, no clock read, and no driver call. */

static inline bool vgpu_gated(uint32_t flags)
{
    return (flags & (VGPU_DEV_ACTIVE | VGPU_DEV_UNLIMITED)) == VGPU_DEV_ACTIVE;
}

struct vgpu_launch {
    struct vgpu_batch *b;   /* batch to account into, NULL if unmeasured */
    unsigned bmax;          /* close the batch at this many launches */
};

static inline __attribute__((always_inline)) struct vgpu_batch *vgpu_batch_enter(CUcontext ctx, struct vgpu_ctxinfo *ci, CUstream s, bool gate)
{
    struct vgpu_tstream *ts = vgpu_tls_ts;
    if (__builtin_expect(ts && ts->ctx == ctx && ts->stream == s && ts->cur >= 0, 1)) {
        struct vgpu_batch *b = &ts->b[ts->cur];
        int open = VGPU_B_OPEN;
        if (__builtin_expect(atomic_compare_exchange_strong_explicit(&b->state, &open, VGPU_B_INUSE,
                                                                     memory_order_acquire,
                                                                     memory_order_relaxed),
                             1))
            return b;
    }
    return vgpu_batch_enter_slow(ctx, ci, s, gate);
}

/* After the launch: count it, close the batch when it reaches bmax. The
 * accountant closes batches that are idle or older than about 1 ms. `==`,
 * not `>=`: a batch taken back and extended past bmax (pool exhausted) is
 * left to the accountant's age rule rather than closed after every launch. */
static inline __attribute__((always_inline)) void vgpu_batch_leave(struct vgpu_launch *l)
{
    struct vgpu_batch *b = l->b;
    unsigned n = atomic_load_explicit(&b->n, memory_order_relaxed) + 1;
    atomic_store_explicit(&b->n, n, memory_order_relaxed);
    if (__builtin_expect(n == l->bmax, 0)) {
        vgpu_batch_close(b);
        return;
    }
    atomic_store_explicit(&b->state, VGPU_B_OPEN, memory_order_release);
}

/* Everything before the real launch. s is the stream as the driver will see
 * it (CU_STREAM_PER_THREAD for a _ptsz launch on stream 0). */
static inline __attribute__((always_inline)) void vgpu_gate_enter(struct vgpu_launch *l, CUstream s, CUstream orig, int ptsz, int graph)
{
    l->b = NULL;
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    if (!ctl)
        return;
    if (__builtin_expect(atomic_load_explicit(&vgpu_active_captures, memory_order_relaxed) > 0, 0) &&
        vgpu_stream_capturing(orig, ptsz))
        return; /* recorded into a graph, not run: neither gated nor measured */
    struct vgpu_ctxinfo *ci = vgpu_tls_ci;
    /* A record freed (context destroyed, maybe by another thread) no longer
     * names our context: look again. */
    if (__builtin_expect(!ci || atomic_load_explicit(&ci->ctx, memory_order_relaxed) != vgpu_tls_ctx, 0)) {
        ci = vgpu_current_ci();
        if (!ci)
            return;
    }
    CUcontext ctx = vgpu_tls_ctx;
    struct vgpu_hdev *hd = &vgpu_hdevs[ci->hidx];
    int slot = atomic_load_explicit(&hd->slot, memory_order_relaxed);
    if (__builtin_expect(slot < 0, 0)) {
        slot = vgpu_hdev_attach(ci->hidx);
        if (slot < 0)
            return;
    }
    uint32_t flags = __atomic_load_n(&ctl->dev[slot].flags, __ATOMIC_ACQUIRE);
    bool gate = vgpu_gated(flags);
    if (gate) {
        uint32_t grant = __atomic_load_n(&ctl->dev[slot].grant, __ATOMIC_ACQUIRE);
        if (__builtin_expect((grant & VGPU_GRANT_STATE_MASK) != VGPU_GRANT_RUN ||
                                 !atomic_load_explicit(&hd->busy, memory_order_relaxed) ||
                                 atomic_load_explicit(&hd->inflight, memory_order_relaxed) >=
                                     atomic_load_explicit(&hd->inflight_max, memory_order_relaxed),
                             0) &&
            ((grant & VGPU_GRANT_STATE_MASK) != VGPU_GRANT_HOLD || !vgpu_hold_admits(hd, &ctl->dev[slot], grant)))
            slot = vgpu_gate_wait(hd, ctx, s);
    }
    struct vgpu_stat_dev *sd = vgpu_stat_dev(slot);
    if (__builtin_expect(sd != NULL, 1)) {
        __atomic_fetch_add(&sd->launches, 1, __ATOMIC_RELAXED);
        if (graph)
            __atomic_fetch_add(&sd->graph_launches, 1, __ATOMIC_RELAXED);
    }
    struct vgpu_batch *b = vgpu_batch_enter(ctx, ci, s, gate);
    if (__builtin_expect(b != NULL, 1)) {
        atomic_fetch_add_explicit(&hd->inflight, 1, memory_order_relaxed);
        l->b = b;
        /* Small batches only where the in-flight limit needs them: each one
         * costs two event records. */
        l->bmax = gate ? atomic_load_explicit(&hd->batch_max, memory_order_relaxed) : VGPU_BATCH_MAX;
    }
}

static inline __attribute__((always_inline)) void vgpu_gate_leave(struct vgpu_launch *l)
{
    if (l->b)
        vgpu_batch_leave(l);
}

#pragma GCC visibility pop

#endif /* VGPU_HOOK_SERVICES_H */
