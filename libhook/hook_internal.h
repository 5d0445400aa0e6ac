/*
 * hook_internal.h - what the units of libvgpu-hook.so share with each other.
 *
 * Nothing here is exported: the library is built with -fvisibility=hidden and
 * a version script, and only the driver entry points marked VGPU_EXPORT (plus
 * dlsym) are visible to the program.
 *
 * Units:
 *   hook_init.c     config, lazy registration, real-symbol resolution, fork
 *   hook_dlsym.c    dlsym + cuGetProcAddress interposition, the hook table
 *   hook_client.c   socket, framing, msgpack, hello/attach/reserve/release,
 *                   the monitor thread that reconnects after a daemon restart
 *   hook_msgpack.c  the minimal msgpack encoder/decoder (pure)
 *   hook_dev.c      devices, contexts, info virtualisation, cuInit
 *   hook_mem.c      every allocation path and its free
 *   hook_launch.c   the launch gate and per-thread batches
 *   hook_account.c  the accountant thread (batch timing -> stat ring)
 *   hook_nvml.c     NVML memory info
 */
#ifndef VGPU_HOOK_INTERNAL_H
#define VGPU_HOOK_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vgpu_abi.h"
#include "vgpu_cuda.h"
#include "vgpu_nvml.h"

#define VGPU_EXPORT __attribute__((visibility("default")))
#define VGPU_HIDDEN __attribute__((visibility("hidden")))

/* CUDA 10.0's stream-capture entry points, still exported by the driver and
 * what cuGetProcAddress gives a runtime that asks at version 10000 (seen
 * with PyTorch on CUDA 13). Not in vgpu_cuda.h: NVIDIA's header maps the
 * name to _v2. Declared with the _v2 arguments: the hook forwards both, which
 * is harmless if the driver's function reads only the stream. */
CUresult cuStreamBeginCapture(CUstream hStream, CUstreamCaptureMode mode);
CUresult cuStreamBeginCapture_ptsz(CUstream hStream, CUstreamCaptureMode mode);

/* ---------------------------------------------------------------------- */
/* The hooked CUDA entry points: exported under the driver's names, handed */
/* out by dlsym and cuGetProcAddress. X(name).                              */
#define VGPU_HOOKED_CUDA(X)                                                    \
    X(cuInit)                                                                  \
    X(cuGetProcAddress)                                                        \
    X(cuGetProcAddress_v2)                                                     \
    X(cuDevicePrimaryCtxRetain)                                                \
    X(cuCtxCreate_v2)                                                          \
    X(cuCtxCreate_v4)                                                          \
    X(cuCtxDestroy_v2)                                                         \
    X(cuCtxSetCurrent)                                                         \
    X(cuCtxPushCurrent_v2)                                                     \
    X(cuCtxPopCurrent_v2)                                                      \
    X(cuMemGetInfo_v2)                                                         \
    X(cuDeviceTotalMem_v2)                                                     \
    X(cuMemAlloc_v2)                                                           \
    X(cuMemAllocPitch_v2)                                                      \
    X(cuMemAllocManaged)                                                       \
    X(cuMemFree_v2)                                                            \
    X(cuArrayCreate_v2)                                                        \
    X(cuArray3DCreate_v2)                                                      \
    X(cuArrayDestroy)                                                          \
    X(cuMipmappedArrayCreate)                                                  \
    X(cuMipmappedArrayDestroy)                                                 \
    X(cuMemCreate)                                                             \
    X(cuMemRelease)                                                            \
    X(cuMemAllocAsync)                                                         \
    X(cuMemAllocAsync_ptsz)                                                    \
    X(cuMemAllocFromPoolAsync)                                                 \
    X(cuMemAllocFromPoolAsync_ptsz)                                            \
    X(cuMemFreeAsync)                                                          \
    X(cuMemFreeAsync_ptsz)                                                     \
    X(cuLaunchKernel)                                                          \
    X(cuLaunchKernel_ptsz)                                                     \
    X(cuLaunchKernelEx)                                                        \
    X(cuLaunchKernelEx_ptsz)                                                   \
    X(cuLaunchCooperativeKernel)                                               \
    X(cuLaunchCooperativeKernel_ptsz)                                          \
    X(cuGraphLaunch)                                                           \
    X(cuGraphLaunch_ptsz)                                                      \
    X(cuStreamBeginCapture)                                                    \
    X(cuStreamBeginCapture_ptsz)                                               \
    X(cuStreamBeginCapture_v2)                                                 \
    X(cuStreamBeginCapture_v2_ptsz)                                            \
    X(cuStreamEndCapture)                                                      \
    X(cuStreamEndCapture_ptsz)                                                 \
    X(cuStreamDestroy_v2)

/* Driver functions the hook calls but does not intercept. */
#define VGPU_USED_CUDA(X)                                                      \
    X(cuDeviceGetUuid)                                                         \
    X(cuDeviceGetUuid_v2)                                                      \
    X(cuDeviceGet)                                                             \
    X(cuCtxGetCurrent)                                                         \
    X(cuCtxGetDevice)                                                          \
    X(cuStreamCreate)                                                          \
    X(cuStreamIsCapturing)                                                     \
    X(cuStreamIsCapturing_ptsz)                                                \
    X(cuEventCreate)                                                           \
    X(cuEventRecord)                                                           \
    X(cuEventRecord_ptsz)                                                      \
    X(cuEventQuery)                                                            \
    X(cuEventElapsedTime)                                                      \
    X(cuEventDestroy_v2)

#define VGPU_HOOKED_NVML(X)                                                    \
    X(nvmlDeviceGetMemoryInfo)                                                 \
    X(nvmlDeviceGetMemoryInfo_v2)

#define VGPU_USED_NVML(X) X(nvmlDeviceGetUUID)

/* real_<name>: the driver's own function, resolved at init. */
#define VGPU_DECL_REAL(name) extern __typeof__(&name) real_##name;
VGPU_HOOKED_CUDA(VGPU_DECL_REAL)
VGPU_USED_CUDA(VGPU_DECL_REAL)
VGPU_HOOKED_NVML(VGPU_DECL_REAL)
VGPU_USED_NVML(VGPU_DECL_REAL)
#undef VGPU_DECL_REAL

/* ---------------------------------------------------------------------- */
/* hook_init.c                                                              */

enum vgpu_mode {
    VGPU_MODE_UNINIT = 0,   /* registration not attempted yet (or after fork) */
    VGPU_MODE_REGISTERED,   /* talking to vgpud: everything is enforced */
    VGPU_MODE_PASSTHROUGH,  /* no daemon, on_no_daemon=unlimited */
    VGPU_MODE_FAIL,         /* no daemon, on_no_daemon=fail: refuse CUDA */
    VGPU_MODE_BROKEN,       /* the real driver could not be loaded */
};

struct vgpu_config {
    char socket[108];
    bool on_no_daemon_unlimited;
    int connect_timeout_ms;
    char conf_path[256];    /* which hook.conf was read ("" if none) */
};

extern struct vgpu_config vgpu_cfg;
extern _Atomic int vgpu_mode;

/* Resolve real symbols and read config (once), then register with vgpud if
 * not yet done in this process image. Returns the mode. Cheap after the first
 * call: one atomic load. */
int vgpu_ensure(void);
/* vgpu_ensure with its common case inline (the launch path). */
static inline __attribute__((always_inline)) int vgpu_ensure_fast(void)
{
    int m = atomic_load_explicit(&vgpu_mode, memory_order_acquire);
    if (__builtin_expect(m != VGPU_MODE_UNINIT, 1))
        return m;
    return vgpu_ensure();
}
/* Resolve the real NVML symbols (NVML may be used without CUDA). */
bool vgpu_resolve_nvml(void);
/* The error code every hooked call returns in VGPU_MODE_FAIL/BROKEN. */
#define VGPU_REFUSED_ERROR CUDA_ERROR_NOT_INITIALIZED

/* One stderr line per kind of problem (kind is a small integer < 64). */
void vgpu_warn_once(int kind, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
enum {
    VGPU_W_CONNECT = 0, VGPU_W_LIBCUDA, VGPU_W_NVML, VGPU_W_PROTO, VGPU_W_LOST,
    VGPU_W_REGIONS, VGPU_W_TABLE, VGPU_W_ACCOUNT, VGPU_W_DEVICE, VGPU_W_THREAD,
    VGPU_W_CONF, VGPU_W_RELEASE, VGPU_W_BATCH, VGPU_W_CTXMEM, VGPU_W_GETPROC,
    VGPU_W_DLSYM, VGPU_W_CODE, VGPU_W_STALL,
};

uint64_t vgpu_now_ns(void);         /* CLOCK_MONOTONIC */
uint64_t vgpu_coarse_ns(void);      /* CLOCK_MONOTONIC_COARSE (vDSO) */

/* The re-entry guard, per thread: non-zero while this thread runs the
 * hook's own driver calls (VGPU_DRIVER), registration (which loads the
 * driver and runs its constructors), or is one of the hook's service
 * threads. A hooked entry point reached in that state (the driver calling
 * back into an exported name: its cuMemAllocAsync through our
 * cuMemAlloc_v2, say) passes straight to the driver: no registration, no
 * accounting, no gate, so nothing is counted twice and nothing recurses.
 * Initial-exec TLS: one instruction to read on the launch path. */
extern _Thread_local int vgpu_in_hook __attribute__((tls_model("initial-exec")));

/* The mode a hooked entry point acts in: PASSTHROUGH when re-entered. */
static inline __attribute__((always_inline)) int vgpu_enter(void)
{
    if (__builtin_expect(vgpu_in_hook != 0, 0))
        return VGPU_MODE_PASSTHROUGH;
    return vgpu_ensure_fast();
}

/* The start of every hooked CUDA entry point `name`: declares mode_ (the
 * mode to act in: REGISTERED enforces; anything else calls the driver and
 * accounts nothing), and refuses the call in FAIL/BROKEN or when the driver
 * lacks the function. */
#define ENTER(name)                                                                        \
    int mode_ = vgpu_enter();                                                              \
    if (__builtin_expect(mode_ >= VGPU_MODE_FAIL, 0) || !real_##name)                      \
        return VGPU_REFUSED_ERROR;                                                         \
    (void)mode_

/* Evaluate a driver call with the re-entry guard up (for a call that
 * returns a value). */
#define VGPU_DRIVER(call)                                                                  \
    __extension__({                                                                        \
        vgpu_in_hook++;                                                                    \
        __typeof__(call) vgpu_r_ = (call);                                                 \
        vgpu_in_hook--;                                                                    \
        vgpu_r_;                                                                           \
    })

/* ---------------------------------------------------------------------- */
/* hook_dlsym.c                                                             */

typedef void (*vgpu_fn)(void);
/* The real dlsym (never our own). */
void *vgpu_real_dlsym(void *handle, const char *name);
/* Our hook for `name`, or NULL if we do not hook it. */
void *vgpu_hook_for_name(const char *name);
/* Fill the table of the driver's addresses of every hooked name. */
void vgpu_dlsym_fill_real(void *libcuda, void *libnvml);

/* ---------------------------------------------------------------------- */
/* hook_client.c                                                            */

/* Try to register (connect + hello + welcome + mmap) within the configured
 * timeout. true on success. Called with the init mutex held. */
bool vgpu_client_register(void);
/* Current shared pages (NULL if never registered). Swapped atomically on
 * reconnect; old mappings stay mapped. */
extern _Atomic(struct vgpu_ctl_page *) vgpu_ctl;
extern _Atomic(struct vgpu_stat_page *) vgpu_stat;
extern _Atomic int vgpu_connected;    /* 1 while the daemon connection is up */
extern _Atomic uint64_t vgpu_conn_gen; /* bumped on every (re)registration */

enum vgpu_reply { VGPU_R_OK = 0, VGPU_R_DENIED, VGPU_R_REFUSED, VGPU_R_DOWN };
/* attach: slot out; mem_limit ignored (read from ctl). */
int vgpu_client_attach(const char *uuid, uint64_t total, int *slot);
/* reserve n bytes on device hidx (its current slot); waits up to 10 s for a
 * reconnect if down. */
int vgpu_client_reserve(int hidx, uint64_t n);
/* Give back n bytes reserved on device hidx and never counted in its held
 * (a reservation rolled back): no reply, and never waits behind a round trip
 * or for a socket with no room (what cannot go now goes with the next frame,
 * or the next hello's held covers it). */
void vgpu_client_release(int hidx, uint64_t n);
/* The same for n bytes counted in vgpu_hdevs[hidx].held (a free): held goes
 * down with the release, atomically with respect to a reconnect's hello. */
void vgpu_client_free(int hidx, uint64_t n);
/* Send one complete, already framed message (4-byte big-endian length, then
 * that many bytes of msgpack) that expects no reply. Callable from any
 * thread, hook service threads included (not async-signal-safe). Never
 * waits behind a pending round trip and takes bounded time (a few µs
 * normally, at most tens of ms): it writes without blocking, all of the
 * frame or nothing. false when there is no connection (or a reconnect has
 * not re-attached the devices yet), when frame is not exactly one frame, or
 * when the socket cannot take it now (counted in
 * vgpu_client_oneway_dropped). A frame naming a slot may meet a reconnect
 * that renumbered it: read the slot just before building the frame. */
bool vgpu_client_send_oneway(const uint8_t *frame, size_t len);
/* One-way frames (and attempts to flush releases) that found no room. */
uint64_t vgpu_client_oneway_dropped(void);
/* fork child: forget the connection and threads. */
void vgpu_client_atfork_child(void);

/* ---------------------------------------------------------------------- */
/* hook_dev.c                                                               */

struct vgpu_hdev {
    char uuid[48];              /* "GPU-xxxxxxxx-..." */
    uint64_t total;
    _Atomic int slot;           /* -1 not attached */
    _Atomic int refused;        /* daemon said no */
    _Atomic uint64_t held;      /* bytes this process holds here */
    /* The in-flight limit (hook_launch.c, hook_account.c). inflight counts
     * launches put into a batch and not yet completed: +1 on the launch fast
     * path, -n by the accountant when a batch of n completes or is dropped.
     * inflight_max and batch_max are published by the accountant from the
     * measured GPU time per launch (cost_ns, accountant-only) and the GPU
     * time the daemon lets an owner keep queued (ctl inflight_ns). */
    _Atomic uint32_t inflight;
    _Atomic uint32_t inflight_max;  /* a gated slot launches only below this */
    _Atomic uint32_t batch_max;     /* launches per batch before it is closed */
    /* The ownership protocol (hook_launch.c, hook_account.c): busy is 1
     * from the `want` this process sent (on connection want_conn) until the
     * `idle` it sent; grant_waiters counts threads waiting for the device
     * (the process is not idle while one does); room_word is bumped, and
     * room waiters woken, whenever the accountant retires launches. */
    _Atomic uint32_t busy;
    /* held (slow path and accountant only) while busy changes and its note
     * is sent, so the daemon gets `want` and `idle` in the order busy took */
    pthread_mutex_t note_mu;
    _Atomic uint32_t grant_waiters;
    _Atomic uint64_t want_conn;     /* vgpu_conn_gen of the last `want` */
    _Atomic uint32_t room_word;
    _Atomic uint32_t room_waiters;
    /* accountant-only: the grant state it last saw, and whether the
     * device was lost with work queued that has not been reported drained */
    uint32_t seen_grant;
    uint32_t drain_pending;
    uint64_t cost_ns;               /* moving average GPU ns per launch, 0 = none yet */
    /* accountant-only: idleness */
    uint64_t idle_launches;         /* stat launches at the last look */
    uint64_t idle_since;            /* when they last changed (coarse clock) */
};
/* How much launched-but-unfinished GPU work an owner may have queued: the
 * daemon's inflight_ns (vgpu_abi.h), so that a hand-over is quick; without
 * one, VGPU_INFLIGHT_NS. At least VGPU_INFLIGHT_MIN launches so long kernels
 * still pipeline; VGPU_COST_INIT_NS is assumed per launch until a batch was
 * measured (conservative: most kernels are shorter). */
#define VGPU_INFLIGHT_NS 5000000ull
#define VGPU_INFLIGHT_MIN 2u
#define VGPU_COST_INIT_NS 1000000ull
#define VGPU_BATCH_MAX 64u
/* Reset the in-flight state of one device to "nothing measured". */
void vgpu_hdev_inflight_init(struct vgpu_hdev *d);
#define VGPU_MAX_HDEV 16
extern struct vgpu_hdev vgpu_hdevs[VGPU_MAX_HDEV];
extern _Atomic int vgpu_nr_hdev;

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

/* ---------------------------------------------------------------------- */
/* hook_launch.c / hook_account.c                                           */

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
extern _Atomic int vgpu_active_captures;
extern _Atomic uint64_t vgpu_lost_batches;

/* Start a detached service thread with every signal blocked (the program's
 * signal handlers must never run on the hook's threads). */
bool vgpu_start_thread(void *(*fn)(void *));
void vgpu_account_start(void);
/* Wake the accountant from its idle sleep (batch opened). */
extern _Atomic int vgpu_account_asleep;
void vgpu_account_kick(void);
void vgpu_account_atfork_child(void);
/* Drop every batch of ctx (called before the context is destroyed). */
void vgpu_account_forget_ctx(CUcontext ctx);
void vgpu_launch_atfork_child(void);
/* Captures: drop what a destroyed context had; drop entries whose stream no
 * longer captures (accountant thread, while any capture is counted). */
void vgpu_capture_forget_ctx(CUcontext ctx);
void vgpu_capture_sweep(void);
/* Tell vgpud about this process's work on device slot `slot`, one-way and
 * never waiting behind a round trip: it has work (`want`); its work has
 * drained and it launches nothing (`idle`); what it had queued when it lost
 * the device has finished (`drained`). false if it could not be sent. */
enum vgpu_note { VGPU_NOTE_WANT, VGPU_NOTE_IDLE, VGPU_NOTE_DRAINED };
bool vgpu_client_notify(int slot, enum vgpu_note what);
/* The calling thread's current context may have changed (create, destroy,
 * set, push, pop): the launch path asks the driver again on its next launch. */
void vgpu_launch_ctx_changed(void);
/* The accountant thread is running (batches will complete). */
bool vgpu_account_running(void);

/* Stat page helpers. */
static inline struct vgpu_stat_dev *vgpu_stat_dev(int slot)
{
    struct vgpu_stat_page *s = atomic_load_explicit(&vgpu_stat, memory_order_acquire);
    if (!s || slot < 0 || slot >= (int)VGPU_MAX_DEVICES)
        return NULL;
    return &s->dev[slot];
}
static inline void vgpu_stat_add(int slot, size_t off, uint64_t v)
{
    struct vgpu_stat_dev *d = vgpu_stat_dev(slot);
    if (d)
        __atomic_fetch_add((uint64_t *)((char *)d + off), v, __ATOMIC_RELAXED);
}
#define VGPU_STAT_ADD(slot, field, v) \
    vgpu_stat_add((slot), offsetof(struct vgpu_stat_dev, field), (v))

/* ---------------------------------------------------------------------- */
/* hook_mem.c                                                               */

void vgpu_mem_atfork_child(void);

/* ---------------------------------------------------------------------- */
/* hook_msgpack.c: a writer into a fixed buffer and a reader over one.      */

struct mp_w {
    uint8_t *p;
    size_t len, cap;
    bool overflow;
};
void mp_map(struct mp_w *w, uint32_t n);
void mp_array(struct mp_w *w, uint32_t n);
void mp_str(struct mp_w *w, const char *s);
void mp_uint(struct mp_w *w, uint64_t v);
void mp_int(struct mp_w *w, int64_t v);
void mp_nil(struct mp_w *w);
void mp_bool(struct mp_w *w, bool b);

struct mp_r {
    const uint8_t *p;
    size_t len, pos;
    bool err;
};
enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_UINT, MP_STR, MP_ARRAY, MP_MAP, MP_OTHER, MP_ERR };
enum mp_type mp_peek(struct mp_r *r);
bool mp_read_map(struct mp_r *r, uint32_t *n);
/* str: pointer into the buffer, not NUL-terminated. */
bool mp_read_str(struct mp_r *r, const char **s, uint32_t *n);
/* any integer that fits int64 (uint > INT64_MAX fails) */
bool mp_read_int(struct mp_r *r, int64_t *v);
bool mp_read_nil(struct mp_r *r);
bool mp_skip(struct mp_r *r);

#endif /* VGPU_HOOK_INTERNAL_H */
