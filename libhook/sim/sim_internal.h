/*
 * sim_internal.h - what the units of the simulated driver (libcuda.so.1)
 * share: the handle objects, the process-wide state, the handle registry
 * and the few helpers every entry point uses. Private: nothing here is
 * exported (-fvisibility=hidden and libcuda.map export only cu* and
 * vgpuSim*; the driver's own entry points get default visibility from the
 * pragma around vgpu_cuda.h).
 *
 * Units, by the CUDA API areas they fake:
 *   sim_cuda.c      process state, handle registry, cuInit, devices, error names
 *   sim_ctx.c       contexts (primary and created), the per-thread context
 *                   stack, streams (capture included), events
 *   sim_worker.c    the per-context worker that executes queued operations,
 *                   time-sliced on the shared device (the hardware's
 *                   round-robin between contexts), and the queues it drains
 *   sim_mem.c       allocations, arrays, VMM, memory pools and the
 *                   stream-ordered allocator, copies
 *   sim_exec.c      modules, functions, kernel launches, graphs
 *   sim_procaddr.c  cuGetProcAddress's table
 *   sim_control.c   the test control surface (vgpuSim*, vgpu_sim.h)
 *   sim_shm.c       (shared with libnvidia-ml.so.1, sim_shm.h) the state
 *                   several processes agree on: memory in use, the
 *                   time-slice lock, busy time
 *
 * Handles are checked against the registry before use so a bad handle is an
 * error code, never a crash. Lock order: g_mu, then a context's m, then the
 * shm locks. Worker threads never take g_mu.
 */
#ifndef VGPU_SIM_INTERNAL_H
#define VGPU_SIM_INTERNAL_H

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "sim_shm.h"

#pragma GCC visibility push(default)
#include "vgpu_cuda.h"
#include "vgpu_sim.h"
#pragma GCC visibility pop

#define QCAP 1024
#define GRANULARITY (2ull << 20)
#define MODULE_OVERHEAD (2ull << 20)
#define SHADOW_MAX (1ull << 20)
#define DRIVER_VERSION 13000

enum obj_type { T_CTX = 1, T_STREAM, T_EVENT, T_MODULE, T_FUNC, T_ARRAY, T_MIPMAP, T_POOL, T_GRAPH, T_NODE, T_EXEC, T_MEMHANDLE };

/* Common head of every handle object: its type and owning context (NULL if process-wide). */
struct obj {
    int type;
    CUcontext ctx;
};


/* ---- a small open-addressing map: uintptr key (0 empty, 1 tombstone) -> uintptr value ---- */
struct hmap {
    uintptr_t *k, *v;
    size_t cap, used;
};

static inline size_t hslot(uintptr_t key, size_t cap)
{
    uint64_t h = (uint64_t)key * 0x9e3779b97f4a7c15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

static inline uintptr_t hmap_get(const struct hmap *m, uintptr_t key)
{
    if (m->cap == 0 || key <= 1)
        return 0;
    size_t i = hslot(key, m->cap);
    while (m->k[i] != 0) {
        if (m->k[i] == key)
            return m->v[i];
        i = (i + 1) & (m->cap - 1);
    }
    return 0;
}

/* ---- objects ---- */
enum op_kind { OP_KERNEL = 1, OP_RECORD, OP_WAIT, OP_GRAPH };

struct op {
    int kind;
    uint64_t ns;
    CUevent ev;
    uint64_t seq;
    uint64_t *graph_ns;
    size_t graph_n;
};

struct CUctx_st {
    struct obj h;
    int dev;
    bool primary;
    unsigned flags;
    pthread_mutex_t m;
    pthread_cond_t cv; /* broadcast on enqueue, completion and stop */
    pthread_t worker;
    int stop;
    struct CUstream_st *streams;
    struct CUstream_st *def;
    struct CUstream_st *rr; /* round-robin cursor */
    /* worker-only */
    bool holding;
    uint64_t token, slice_end;
};

struct CUstream_st {
    struct obj h;
    struct CUstream_st *next;
    unsigned flags;
    uint64_t head, tail;
    CUgraph capture; /* non-NULL while capturing; the rest of the capture's state: */
    CUstreamCaptureMode cap_mode; /* the mode it was begun with */
    const void *cap_thread;       /* the thread that began it (&t_self) */
    bool cap_invalid;             /* an illegal call invalidated it */
    uint64_t cap_id;
    struct CUstream_st *cap_next; /* g_capturing */
    struct op q[QCAP];
};

struct CUevent_st {
    struct obj h;
    unsigned flags;
    int refs; /* the handle + pending ops naming it */
    uint64_t rec_seq, done_seq, t_ns;
    uint64_t cap_id; /* non-zero: last recorded into that capture (a captured event) */
};

struct CUmod_st {
    struct obj h;
};

struct CUfunc_st {
    struct obj h;
    CUmodule mod;
    bool sleep;
    char name[128];
};

struct CUarray_st {
    struct obj h;
    int dev;
    uint64_t bytes;
};

struct CUmipmappedArray_st {
    struct obj h;
    int dev;
    uint64_t bytes;
};

struct CUmemPoolHandle_st {
    struct obj h;
    int dev;
    bool is_default;
    uint64_t threshold, used, cached, used_high, reserved_high;
    int reuse[3];
};

struct CUgraph_st {
    struct obj h;
    size_t n, cap;
    CUgraphNode *nodes;
};

struct CUgraphNode_st {
    struct obj h;
    CUgraph g;
    bool kernel;
    uint64_t ns;
};

struct CUgraphExec_st {
    struct obj h;
    size_t n;
    uint64_t *ns;
};

struct memhandle {
    struct obj h;
    int dev;
    uint64_t size;
    int maps;
    bool released;
};

enum alloc_kind { A_PLAIN = 1, A_POOL, A_RESERVE, A_MAP };

struct alloc {
    uint64_t base, size, charged;
    int kind;
    int dev;
    CUcontext ctx;
    CUmemoryPool pool;
    struct memhandle *mh; /* A_MAP */
    unsigned char *shadow;
};

/* ---- process state (sim_cuda.c) ---- */
extern pthread_mutex_t g_mu;
extern int g_init;
extern int g_forked;
extern struct sim_shm *g_s;
extern int g_ndev;
/* CUDA_VISIBLE_DEVICES, read at cuInit as the real driver does: the
 * process's ordinal i is the shared device g_phys[i]. Everything process-local
 * (contexts, primary contexts, pools) is by ordinal; everything in the shm
 * (memory, the time-slice lock, busy time, UUIDs) by physical index. */
extern int g_phys[SIM_MAX_DEVS];
extern uint64_t g_overhead, g_kernel_ns, g_slice_ns;
extern struct hmap g_reg;    /* handle -> type */
extern struct hmap g_allocs; /* base address -> struct alloc* (allocations and VA reservations) */
extern struct hmap g_maps;   /* base address -> struct alloc* (VMM mappings, inside reservations) */
extern uint64_t g_next_addr;
struct sim_primary {
    CUcontext ctx;
    int refs;
    unsigned flags;
};
extern struct sim_primary g_primary[SIM_MAX_DEVS];
extern int g_nctx[SIM_MAX_DEVS];
extern CUmemoryPool g_default_pool[SIM_MAX_DEVS];

/* The calling thread's context stack (sim_ctx.c pushes and pops it). */
extern __thread CUcontext t_stack[64];
extern __thread int t_depth;

/* Stream capture (sim_ctx.c): the calling thread's capture interaction mode
 * (cuThreadExchangeStreamCaptureMode; GLOBAL by default), its identity, and
 * every stream now capturing (linked through cap_next, under g_mu). */
extern __thread CUstreamCaptureMode t_capmode;
extern __thread char t_self;
extern CUstream g_capturing;

/* ---- what every entry point uses, inline as it was in one file ---- */
static inline CUresult check_init(void)
{
    if (__atomic_load_n(&g_forked, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (!__atomic_load_n(&g_init, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    return CUDA_SUCCESS;
}

#define CHECK_INIT()                     \
    do {                                 \
        CUresult r_ = check_init();      \
        if (r_ != CUDA_SUCCESS)          \
            return r_;                   \
    } while (0)

static inline bool reg_is(const void *p, int type)
{
    return p != NULL && hmap_get(&g_reg, (uintptr_t)p) == (uintptr_t)type;
}

static inline bool valid_dev(CUdevice d)
{
    return d >= 0 && d < g_ndev;
}

/* The shared device behind a valid ordinal. */
static inline int phys(int ordinal)
{
    return g_phys[ordinal];
}

static inline CUcontext current_ctx(void)
{
    CUcontext c = t_depth > 0 ? t_stack[t_depth - 1] : NULL;
    return reg_is(c, T_CTX) ? c : NULL;
}

/* Whether handle h names the legacy default stream, as passed to an entry
 * point (its _ptsz variant when ptsz): NULL is the per-thread stream there. */
static inline bool is_legacy(CUstream h, bool ptsz)
{
    return h == CU_STREAM_LEGACY || (h == NULL && !ptsz);
}

/* Maps NULL/legacy/per-thread handles to the current context's default stream. g_mu held. */
static inline CUresult resolve_stream(CUstream h, CUstream *out)
{
    if (h == NULL || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        CUcontext c = current_ctx();
        if (c == NULL)
            return CUDA_ERROR_INVALID_CONTEXT;
        *out = c->def;
        return CUDA_SUCCESS;
    }
    if (!reg_is(h, T_STREAM))
        return CUDA_ERROR_INVALID_HANDLE;
    *out = h;
    return CUDA_SUCCESS;
}

/* Resolves the current context under g_mu. */
#define WITH_CTX(c)                                  \
    pthread_mutex_lock(&g_mu);                       \
    CUcontext c = current_ctx();                     \
    if (c == NULL) {                                 \
        pthread_mutex_unlock(&g_mu);                 \
        return CUDA_ERROR_INVALID_CONTEXT;           \
    }

/* sim_cuda.c */
bool hmap_put(struct hmap *m, uintptr_t key, uintptr_t val);
void hmap_del(struct hmap *m, uintptr_t key);
bool reg_add(void *p, int type);
void reg_del(void *p);
uint64_t new_addr(uint64_t size, uint64_t align);
/* sim_mem.c */
void pools_sync_trim(int dev);
void alloc_free_locked(struct alloc *a);
/* sim_ctx.c */
void event_unref(CUevent e);
/* Stream capture's rules (see sim_ctx.c), g_mu held. The calling thread is
 * making a potentially unsafe call: SUCCESS, or STREAM_CAPTURE_UNSUPPORTED
 * having invalidated every capture that forbids it. */
CUresult capture_unsafe_locked(void);
/* An operation on c's legacy stream: SUCCESS, or STREAM_CAPTURE_IMPLICIT
 * having invalidated the captures of c's blocking streams (it would wait
 * for them); `invalidate` false only asks. */
CUresult capture_legacy_locked(CUcontext c, bool invalidate);
/* Work for capturing stream s: SUCCESS (it joins the capture) or
 * STREAM_CAPTURE_INVALIDATED. */
static inline CUresult capture_join_locked(CUstream s)
{
    return s->cap_invalid ? CUDA_ERROR_STREAM_CAPTURE_INVALIDATED : CUDA_SUCCESS;
}
/* sim_worker.c */
void op_discard(struct op *op);
void *worker_main(void *arg);
CUresult enqueue(CUstream s, const struct op *op);
/* sim_exec.c */
void module_free_locked(CUmodule m);
void graph_free_locked(CUgraph g);
CUgraph graph_new_locked(void);

#endif /* VGPU_SIM_INTERNAL_H */
