/*
 * hook_base.h - layer 0 of libvgpu-hook.so: what every other layer uses.
 *
 * The hook is four layers; each includes the header of the one below and
 * uses only what that header and the ones below it declare (tests/test_layers.py
 * checks it, from the objects' symbol tables):
 *
 *   3 interposition  hook_interpose.h  the exported entry points, dlsym and
 *                                      cuGetProcAddress, registration on first
 *                                      use, fork (hook_init.c, hook_dlsym.c,
 *                                      hook_ctx.c, hook_alloc.c, hook_launch.c,
 *                                      hook_nvml.c)
 *   2 services       hook_services.h   devices and contexts, memory
 *                                      reservations, the launch gate and its
 *                                      batches, stream captures, the
 *                                      accountant (hook_dev.c, hook_view.c,
 *                                      hook_mem.c, hook_gate.c, hook_batch.c,
 *                                      hook_capture.c, hook_account.c)
 *   1 transport      hook_client.h     the connection to vgpud: msgpack,
 *                                      framing, handshake, requests, the
 *                                      reconnecting monitor (hook_msgpack.c,
 *                                      hook_wire.c, hook_client.c)
 *   0 base           hook_base.h       the driver's functions, the mode and
 *                                      configuration, the device table, the
 *                                      re-entry guard, warnings, clocks,
 *                                      service threads (hook_base.c)
 *
 * libhook/include/vgpu_abi.h is the one header of structs shared with the
 * daemon; every layer sees it through this one.
 *
 * Nothing here is exported: the library is built with -fvisibility=hidden and
 * a version script, and only the driver entry points marked VGPU_EXPORT (plus
 * dlsym) are visible to the program.
 */
#ifndef VGPU_HOOK_BASE_H
#define VGPU_HOOK_BASE_H

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

/* Everything the hook's own headers declare is internal: hidden, as its
 * definitions are (-fvisibility=hidden), and said so here so that the
 * compiler addresses it directly rather than through the GOT. */
#pragma GCC visibility push(hidden)

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
    X(cuStreamGetFlags)                                                        \
    X(cuStreamIsCapturing)                                                     \
    X(cuStreamIsCapturing_ptsz)                                                \
    X(cuThreadExchangeStreamCaptureMode)                                       \
    X(cuEventCreate)                                                           \
    X(cuEventRecord)                                                           \
    X(cuEventRecord_ptsz)                                                      \
    X(cuEventQuery)                                                            \
    X(cuEventElapsedTime)                                                      \
    X(cuEventDestroy_v2)

#define VGPU_HOOKED_NVML(X)                                                    \
    X(nvmlDeviceGetMemoryInfo)                                                 \
    X(nvmlDeviceGetMemoryInfo_v2)                                              \
    X(nvmlDeviceGetCount)                                                      \
    X(nvmlDeviceGetCount_v2)                                                   \
    X(nvmlDeviceGetHandleByIndex)                                              \
    X(nvmlDeviceGetHandleByIndex_v2)                                           \
    X(nvmlDeviceGetHandleByUUID)                                               \
    X(nvmlDeviceGetIndex)

#define VGPU_USED_NVML(X) X(nvmlDeviceGetUUID)

/* real_<name>: the driver's own function, resolved at init. */
#define VGPU_DECL_REAL(name) extern __typeof__(&name) real_##name;
VGPU_HOOKED_CUDA(VGPU_DECL_REAL)
VGPU_USED_CUDA(VGPU_DECL_REAL)
VGPU_HOOKED_NVML(VGPU_DECL_REAL)
VGPU_USED_NVML(VGPU_DECL_REAL)
#undef VGPU_DECL_REAL

/* ---------------------------------------------------------------------- */
/* Mode and configuration: written by registration (hook_init.c), read by  */
/* every layer.                                                             */

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

/* The error code every hooked call returns in VGPU_MODE_FAIL/BROKEN. */
#define VGPU_REFUSED_ERROR CUDA_ERROR_NOT_INITIALIZED

/* ---------------------------------------------------------------------- */
/* Diagnostics, clocks, the re-entry guard, service threads (hook_base.c). */

/* One stderr line per kind of problem (kind is a small integer < 64). */
void vgpu_warn_once(int kind, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
enum {
    VGPU_W_CONNECT = 0, VGPU_W_LIBCUDA, VGPU_W_NVML, VGPU_W_PROTO, VGPU_W_LOST,
    VGPU_W_REGIONS, VGPU_W_TABLE, VGPU_W_ACCOUNT, VGPU_W_DEVICE, VGPU_W_THREAD,
    VGPU_W_CONF, VGPU_W_RELEASE, VGPU_W_BATCH, VGPU_W_CTXMEM, VGPU_W_GETPROC,
    VGPU_W_DLSYM, VGPU_W_CODE, VGPU_W_STALL, VGPU_W_NOGPU, VGPU_W_VIEW,
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

/* Evaluate a driver call with the re-entry guard up (for a call that
 * returns a value). */
#define VGPU_DRIVER(call)                                                                  \
    __extension__({                                                                        \
        vgpu_in_hook++;                                                                    \
        __typeof__(call) vgpu_r_ = (call);                                                 \
        vgpu_in_hook--;                                                                    \
        vgpu_r_;                                                                           \
    })

/* Start a detached service thread with every signal blocked (the program's
 * signal handlers must never run on the hook's threads). */
bool vgpu_start_thread(void *(*fn)(void *));

/* ---------------------------------------------------------------------- */
/* The device table: every physical GPU this process has used, by UUID.    */
/* Entries are made by the services (hook_dev.c); the transport reads them */
/* to declare what is held in a hello and to attach them again after a     */
/* reconnect (slots are per connection). Defined in hook_base.c.           */

/* Room for a device's UUID ("GPU-" and 36 characters) and its NUL. */
#define VGPU_UUID_MAX 48

struct vgpu_hdev {
    char uuid[VGPU_UUID_MAX];   /* "GPU-xxxxxxxx-..." */
    uint64_t total;
    _Atomic int slot;           /* -1 not attached */
    _Atomic int refused;        /* daemon said no */
    _Atomic uint64_t held;      /* bytes this process holds here */
    /* The in-flight limit (hook_gate.c, hook_account.c). inflight counts
     * launches put into a batch and not yet completed: +1 on the launch fast
     * path, -n by the accountant when a batch of n completes or is dropped.
     * inflight_max and batch_max are published by the accountant from the
     * measured GPU time per launch (cost_ns, accountant-only) and the GPU
     * time the daemon lets an owner keep queued (ctl inflight_ns). */
    _Atomic uint32_t inflight;
    _Atomic uint32_t inflight_max;  /* a gated slot launches only below this */
    _Atomic uint32_t batch_max;     /* launches per batch before it is closed */
    /* The ownership protocol (hook_gate.c, hook_account.c): busy is 1
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
    /* A HOLD grant (hook_gate.c): the estimated end of what this process
     * has queued (CLOCK_MONOTONIC ns), and the grant word that estimate
     * started under (a new hold starts it afresh). */
    _Atomic uint64_t hold_qend;
    _Atomic uint32_t hold_grant;
    /* accountant-only: the grant state it last saw, and whether the
     * device was lost with work queued that has not been reported drained */
    uint32_t seen_grant;
    uint32_t drain_pending;
    uint64_t cost_ns;               /* moving average GPU ns per launch, 0 = none yet
                                       (written by the accountant only; launching threads
                                       read it with relaxed atomic loads under HOLD) */
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
#define VGPU_MAX_HDEV 16
extern struct vgpu_hdev vgpu_hdevs[VGPU_MAX_HDEV];
extern _Atomic int vgpu_nr_hdev;

#pragma GCC visibility pop

#endif /* VGPU_HOOK_BASE_H */
