/*
 * sim_cuda.c - a CUDA driver stand-in for machines with no GPU.
 *
 * Process-local state (handles, allocations, contexts with their worker
 * threads) lives here; everything several processes must agree on (memory in
 * use, the time-slice lock, busy time) lives in sim_shm.c. Handles are
 * checked against a registry before use so a bad handle is an error code,
 * never a crash. Lock order: g_mu, then a context's m, then the shm locks.
 * Worker threads never take g_mu.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
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

static size_t hslot(uintptr_t key, size_t cap)
{
    uint64_t h = (uint64_t)key * 0x9e3779b97f4a7c15ull;
    return (size_t)(h >> 17) & (cap - 1);
}

static bool hmap_put(struct hmap *m, uintptr_t key, uintptr_t val);

static bool hmap_grow(struct hmap *m)
{
    struct hmap n = {0};
    n.cap = m->cap ? m->cap * 2 : 64;
    n.k = calloc(n.cap, sizeof *n.k);
    n.v = calloc(n.cap, sizeof *n.v);
    if (n.k == NULL || n.v == NULL) {
        free(n.k);
        free(n.v);
        return false;
    }
    for (size_t i = 0; i < m->cap; i++)
        if (m->k[i] > 1)
            hmap_put(&n, m->k[i], m->v[i]);
    free(m->k);
    free(m->v);
    *m = n;
    return true;
}

static bool hmap_put(struct hmap *m, uintptr_t key, uintptr_t val)
{
    if ((m->used + 1) * 2 > m->cap && !hmap_grow(m))
        return false;
    size_t i = hslot(key, m->cap);
    while (m->k[i] > 1 && m->k[i] != key)
        i = (i + 1) & (m->cap - 1);
    if (m->k[i] == 0)
        m->used++;
    m->k[i] = key;
    m->v[i] = val;
    return true;
}

static uintptr_t hmap_get(const struct hmap *m, uintptr_t key)
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

static void hmap_del(struct hmap *m, uintptr_t key)
{
    if (m->cap == 0 || key <= 1)
        return;
    size_t i = hslot(key, m->cap);
    while (m->k[i] != 0) {
        if (m->k[i] == key) {
            m->k[i] = 1;
            m->v[i] = 0;
            return;
        }
        i = (i + 1) & (m->cap - 1);
    }
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
    CUgraph capture;
    struct op q[QCAP];
};

struct CUevent_st {
    struct obj h;
    unsigned flags;
    int refs; /* the handle + pending ops naming it */
    uint64_t rec_seq, done_seq, t_ns;
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

/* ---- global state ---- */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_init;
static int g_forked;
static struct sim_shm *g_s;
static int g_ndev;
static uint64_t g_overhead, g_kernel_ns, g_slice_ns;
static struct hmap g_reg;    /* handle -> type */
static struct hmap g_allocs; /* base address -> struct alloc* (allocations and VA reservations) */
static struct hmap g_maps;   /* base address -> struct alloc* (VMM mappings, inside reservations) */
static uint64_t g_next_addr = 0x7f2000000000ull;
static struct {
    CUcontext ctx;
    int refs;
    unsigned flags;
} g_primary[SIM_MAX_DEVS];
static int g_nctx[SIM_MAX_DEVS];
static CUmemoryPool g_default_pool[SIM_MAX_DEVS];

static __thread CUcontext t_stack[64];
static __thread int t_depth;

static void atfork_child(void)
{
    /* CUDA in a forked child is undefined; fail cleanly instead of touching
     * locks or workers that did not survive the fork. */
    if (g_init)
        g_forked = 1;
}

__attribute__((constructor)) static void sim_cuda_ctor(void)
{
    pthread_atfork(NULL, NULL, atfork_child);
}

static CUresult check_init(void)
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

static bool reg_is(const void *p, int type)
{
    return p != NULL && hmap_get(&g_reg, (uintptr_t)p) == (uintptr_t)type;
}

static bool reg_add(void *p, int type)
{
    return hmap_put(&g_reg, (uintptr_t)p, (uintptr_t)type);
}

static void reg_del(void *p)
{
    hmap_del(&g_reg, (uintptr_t)p);
}

static uint64_t new_addr(uint64_t size, uint64_t align)
{
    if (align < 512)
        align = 512;
    g_next_addr = (g_next_addr + align - 1) & ~(align - 1);
    uint64_t base = g_next_addr;
    g_next_addr += ((size ? size : 1) + 511) & ~511ull;
    g_next_addr += 512; /* guard gap so neighbours never touch */
    return base;
}

static bool valid_dev(CUdevice d)
{
    return d >= 0 && d < g_ndev;
}

static CUcontext current_ctx(void)
{
    CUcontext c = t_depth > 0 ? t_stack[t_depth - 1] : NULL;
    return reg_is(c, T_CTX) ? c : NULL;
}

/* ---- CUresult names ---- */
static const struct {
    CUresult code;
    const char *name, *text;
} k_errors[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_DEINITIALIZED, "CUDA_ERROR_DEINITIALIZED", "driver shutting down"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {CUDA_ERROR_NOT_PERMITTED, "CUDA_ERROR_NOT_PERMITTED", "operation not permitted"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
     "operation not permitted when stream is capturing"},
    {CUDA_ERROR_STREAM_CAPTURE_INVALIDATED, "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
     "operation failed due to a previous error during capture"},
    {CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    if (pStr == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof k_errors / sizeof k_errors[0]; i++)
        if (k_errors[i].code == error) {
            *pStr = k_errors[i].text;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    if (pStr == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < sizeof k_errors / sizeof k_errors[0]; i++)
        if (k_errors[i].code == error) {
            *pStr = k_errors[i].name;
            return CUDA_SUCCESS;
        }
    *pStr = NULL;
    return CUDA_ERROR_INVALID_VALUE;
}

/* ---- init, devices ---- */
CUresult cuInit(unsigned int Flags)
{
    if (__atomic_load_n(&g_forked, __ATOMIC_ACQUIRE))
        return CUDA_ERROR_NOT_INITIALIZED;
    if (Flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!g_init) {
        g_s = sim_shm_attach();
        if (g_s == NULL) {
            fprintf(stderr, "vgpu-sim: cannot open the simulated device's shm\n");
            r = CUDA_ERROR_NO_DEVICE;
        } else {
            g_ndev = (int)g_s->ndev;
            g_overhead = sim_env_u64("VGPU_SIM_CTX_OVERHEAD", 300ull << 20);
            g_kernel_ns = sim_env_u64("VGPU_SIM_KERNEL_NS", 5000);
            g_slice_ns = sim_env_u64("VGPU_SIM_TIMESLICE_NS", 2000000);
            if (g_slice_ns == 0)
                g_slice_ns = 2000000;
            __atomic_store_n(&g_init, 1, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuDriverGetVersion(int *driverVersion)
{
    if (driverVersion == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *driverVersion = DRIVER_VERSION;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal)
{
    CHECK_INIT();
    if (device == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(ordinal))
        return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count)
{
    CHECK_INIT();
    if (count == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    *count = g_ndev;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev)
{
    CHECK_INIT();
    if (name == NULL || len <= 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", SIM_DEVICE_NAME);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev)
{
    CHECK_INIT();
    if (uuid == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    sim_uuid_bytes(sim_shm_name(), dev, (unsigned char *)uuid->bytes);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev)
{
    return cuDeviceGetUuid(uuid, dev);
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    CHECK_INIT();
    if (bytes == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    *bytes = (size_t)g_s->total_mem;
    return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem(unsigned int *bytes, CUdevice dev)
{
    size_t b = 0;
    if (bytes == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    CUresult r = cuDeviceTotalMem_v2(&b, dev);
    if (r == CUDA_SUCCESS)
        *bytes = b > 0xffffffffu ? 0xffffffffu : (unsigned int)b;
    return r;
}

CUresult cuDeviceGetAttribute(int *pi, CUdevice_attribute attrib, CUdevice dev)
{
    CHECK_INIT();
    if (pi == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    switch (attrib) {
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X: *pi = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *pi = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *pi = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *pi = 2147483647; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y: *pi = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *pi = 65535; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *pi = 32; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *pi = 132; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *pi = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *pi = 0; break;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

/* ---- pools (g_mu held) ---- */
static CUmemoryPool pool_new(int dev, bool is_default)
{
    CUmemoryPool p = calloc(1, sizeof *p);
    if (p == NULL)
        return NULL;
    p->h.type = T_POOL;
    p->dev = dev;
    p->is_default = is_default;
    p->reuse[0] = p->reuse[1] = p->reuse[2] = 1;
    if (!reg_add(p, T_POOL)) {
        free(p);
        return NULL;
    }
    return p;
}

static void pool_trim(CUmemoryPool p, uint64_t keep)
{
    uint64_t reserved = p->used + p->cached;
    if (reserved <= keep || p->cached == 0)
        return;
    uint64_t rel = reserved - keep;
    if (rel > p->cached)
        rel = p->cached;
    sim_mem_uncharge(g_s, p->dev, rel);
    p->cached -= rel;
}

static CUresult pool_take(CUmemoryPool p, uint64_t n)
{
    if (p->cached >= n) {
        p->cached -= n;
    } else if (sim_mem_charge(g_s, p->dev, n) != 0) {
        pool_trim(p, p->used); /* give back what is cached, then retry */
        if (sim_mem_charge(g_s, p->dev, n) != 0)
            return CUDA_ERROR_OUT_OF_MEMORY;
    }
    p->used += n;
    if (p->used > p->used_high)
        p->used_high = p->used;
    if (p->used + p->cached > p->reserved_high)
        p->reserved_high = p->used + p->cached;
    return CUDA_SUCCESS;
}

/* A synchronize lets every pool on the device release down to its threshold. */
static void pools_sync_trim(int dev)
{
    for (size_t i = 0; i < g_reg.cap; i++) {
        if (g_reg.k[i] > 1 && g_reg.v[i] == T_POOL) {
            CUmemoryPool p = (CUmemoryPool)g_reg.k[i];
            if (p->dev == dev)
                pool_trim(p, p->threshold > p->used ? p->threshold : p->used);
        }
    }
}

/* ---- allocations (g_mu held) ---- */
static void alloc_free_locked(struct alloc *a)
{
    hmap_del(&g_allocs, (uintptr_t)a->base);
    if (a->kind == A_POOL) {
        if (reg_is(a->pool, T_POOL)) {
            CUmemoryPool p = a->pool;
            p->used -= a->size <= p->used ? a->size : p->used;
            p->cached += a->size;
        }
    } else if (a->charged) {
        sim_mem_uncharge(g_s, a->dev, a->charged);
    }
    free(a->shadow);
    free(a);
}

static CUresult alloc_new_locked(CUcontext ctx, uint64_t size, uint64_t charge, int kind, CUmemoryPool pool,
                                 CUdeviceptr *out)
{
    struct alloc *a = calloc(1, sizeof *a);
    if (a == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    a->dev = pool ? pool->dev : ctx->dev;
    if (kind == A_POOL) {
        CUresult r = pool_take(pool, size);
        if (r != CUDA_SUCCESS) {
            free(a);
            return r;
        }
    } else if (charge && sim_mem_charge(g_s, a->dev, charge) != 0) {
        free(a);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    a->size = size;
    a->charged = kind == A_POOL ? 0 : charge;
    a->kind = kind;
    a->ctx = ctx;
    a->pool = pool;
    a->base = new_addr(size, 512);
    if (kind == A_PLAIN && size <= SHADOW_MAX)
        a->shadow = calloc(1, size ? size : 1);
    if (!hmap_put(&g_allocs, (uintptr_t)a->base, (uintptr_t)a)) {
        alloc_free_locked(a);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    *out = a->base;
    return CUDA_SUCCESS;
}

static struct alloc *containing_in(const struct hmap *m, uint64_t p, uint64_t n)
{
    for (size_t i = 0; i < m->cap; i++) {
        if (m->k[i] <= 1)
            continue;
        struct alloc *a = (struct alloc *)m->v[i];
        if (a->kind == A_RESERVE)
            continue;
        if (p >= a->base && p - a->base <= a->size && n <= a->size - (p - a->base))
            return a;
    }
    return NULL;
}

/* The allocation or mapping containing [p, p+n), or NULL. Linear: the slow path. */
static struct alloc *alloc_containing(uint64_t p, uint64_t n)
{
    struct alloc *a = containing_in(&g_allocs, p, n);
    return a ? a : containing_in(&g_maps, p, n);
}

/* ---- contexts ---- */
static void op_discard(struct op *op);
static void *worker_main(void *arg);

static CUstream stream_new_locked(CUcontext c, unsigned flags)
{
    CUstream s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->h.type = T_STREAM;
    s->h.ctx = c;
    s->flags = flags;
    if (!reg_add(s, T_STREAM)) {
        free(s);
        return NULL;
    }
    pthread_mutex_lock(&c->m);
    s->next = c->streams;
    c->streams = s;
    pthread_mutex_unlock(&c->m);
    return s;
}

static CUresult ctx_new_locked(int dev, bool primary, unsigned flags, CUcontext *out)
{
    if (g_nctx[dev] == 0 && g_overhead && sim_mem_charge(g_s, dev, g_overhead) != 0)
        return CUDA_ERROR_OUT_OF_MEMORY;
    CUcontext c = calloc(1, sizeof *c);
    if (c == NULL)
        goto oom;
    c->h.type = T_CTX;
    c->h.ctx = c;
    c->dev = dev;
    c->primary = primary;
    c->flags = flags;
    pthread_mutex_init(&c->m, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (!reg_add(c, T_CTX))
        goto oom_free;
    c->def = stream_new_locked(c, 0);
    if (c->def == NULL) {
        reg_del(c);
        goto oom_free;
    }
    if (pthread_create(&c->worker, NULL, worker_main, c) != 0) {
        reg_del(c->def);
        free(c->def);
        reg_del(c);
        goto oom_free;
    }
    g_nctx[dev]++;
    *out = c;
    return CUDA_SUCCESS;
oom_free:
    free(c);
oom:
    if (g_nctx[dev] == 0 && g_overhead)
        sim_mem_uncharge(g_s, dev, g_overhead);
    return CUDA_ERROR_OUT_OF_MEMORY;
}

static void event_unref(CUevent e)
{
    if (__atomic_sub_fetch(&e->refs, 1, __ATOMIC_ACQ_REL) == 0)
        free(e);
}

static void graph_free_locked(CUgraph g);
static void module_free_locked(CUmodule m);

/* Stops the worker, drops queued work, frees everything the context owns. */
static void ctx_free_locked(CUcontext c)
{
    pthread_mutex_lock(&c->m);
    __atomic_store_n(&c->stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->m);
    pthread_join(c->worker, NULL);
    reg_del(c);
    for (CUstream s = c->streams, n; s; s = n) {
        n = s->next;
        for (uint64_t i = s->head; i < s->tail; i++)
            op_discard(&s->q[i % QCAP]);
        if (s->capture)
            graph_free_locked(s->capture);
        reg_del(s);
        free(s);
    }
    /* Objects and allocations owned by the context. */
    for (size_t i = 0; i < g_reg.cap; i++) {
        if (g_reg.k[i] <= 1)
            continue;
        struct obj *o = (struct obj *)g_reg.k[i];
        if (o->ctx != c)
            continue;
        switch (g_reg.v[i]) {
        case T_EVENT: reg_del(o); event_unref((CUevent)o); break;
        case T_MODULE: module_free_locked((CUmodule)o); break;
        case T_ARRAY:
            sim_mem_uncharge(g_s, ((CUarray)o)->dev, ((CUarray)o)->bytes);
            reg_del(o);
            free(o);
            break;
        case T_MIPMAP:
            sim_mem_uncharge(g_s, ((CUmipmappedArray)o)->dev, ((CUmipmappedArray)o)->bytes);
            reg_del(o);
            free(o);
            break;
        default: break;
        }
    }
    for (size_t i = 0; i < g_allocs.cap; i++) {
        if (g_allocs.k[i] <= 1)
            continue;
        struct alloc *a = (struct alloc *)g_allocs.v[i];
        if (a->ctx == c)
            alloc_free_locked(a);
    }
    pools_sync_trim(c->dev);
    if (--g_nctx[c->dev] == 0 && g_overhead)
        sim_mem_uncharge(g_s, c->dev, g_overhead);
    /* The calling thread's stack forgets it; other threads see INVALID_CONTEXT. */
    int j = 0;
    for (int i = 0; i < t_depth; i++)
        if (t_stack[i] != c)
            t_stack[j++] = t_stack[i];
    t_depth = j;
    pthread_mutex_destroy(&c->m);
    pthread_cond_destroy(&c->cv);
    free(c);
}

static CUresult push_ctx(CUcontext c)
{
    if (t_depth >= (int)(sizeof t_stack / sizeof t_stack[0]))
        return CUDA_ERROR_INVALID_VALUE;
    t_stack[t_depth++] = c;
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].ctx == NULL)
        r = ctx_new_locked(dev, true, g_primary[dev].flags, &g_primary[dev].ctx);
    if (r == CUDA_SUCCESS) {
        g_primary[dev].refs++;
        *pctx = g_primary[dev].ctx;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice dev)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    CUresult r = CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].refs <= 0) {
        r = CUDA_ERROR_INVALID_CONTEXT;
    } else if (--g_primary[dev].refs == 0) {
        ctx_free_locked(g_primary[dev].ctx);
        g_primary[dev].ctx = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuDevicePrimaryCtxReset_v2(CUdevice dev)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    if (g_primary[dev].ctx != NULL)
        ctx_free_locked(g_primary[dev].ctx);
    g_primary[dev].ctx = NULL;
    g_primary[dev].refs = 0;
    g_primary[dev].flags = 0;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int *flags, int *active)
{
    CHECK_INIT();
    if (flags == NULL || active == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    *flags = g_primary[dev].flags;
    *active = g_primary[dev].ctx != NULL;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice dev, unsigned int flags)
{
    CHECK_INIT();
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    g_primary[dev].flags = flags;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    if (t_depth >= (int)(sizeof t_stack / sizeof t_stack[0]))
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = ctx_new_locked(dev, false, flags, pctx);
    pthread_mutex_unlock(&g_mu);
    if (r == CUDA_SUCCESS)
        push_ctx(*pctx);
    return r;
}

CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *ctxCreateParams, unsigned int flags, CUdevice dev)
{
    (void)ctxCreateParams; /* execution affinity / CIG params: nothing to simulate */
    return cuCtxCreate_v2(pctx, flags, dev);
}

CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(ctx, T_CTX) || ctx->primary)
        r = CUDA_ERROR_INVALID_CONTEXT;
    else
        ctx_free_locked(ctx);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuCtxSetCurrent(CUcontext ctx)
{
    CHECK_INIT();
    if (ctx == NULL) {
        if (t_depth > 0)
            t_depth--;
        return CUDA_SUCCESS;
    }
    pthread_mutex_lock(&g_mu);
    bool ok = reg_is(ctx, T_CTX);
    pthread_mutex_unlock(&g_mu);
    if (!ok)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (t_depth == 0)
        return push_ctx(ctx);
    t_stack[t_depth - 1] = ctx;
    return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext *pctx)
{
    CHECK_INIT();
    if (pctx == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    *pctx = current_ctx();
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    bool ok = reg_is(ctx, T_CTX);
    pthread_mutex_unlock(&g_mu);
    if (!ok)
        return CUDA_ERROR_INVALID_CONTEXT;
    return push_ctx(ctx);
}

CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    CHECK_INIT();
    if (t_depth == 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    CUcontext c = t_stack[--t_depth];
    if (pctx != NULL)
        *pctx = c;
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

CUresult cuCtxGetDevice(CUdevice *device)
{
    CHECK_INIT();
    if (device == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    *device = c->dev;
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

static void ctx_wait_idle(CUcontext c, CUstream only)
{
    pthread_mutex_lock(&c->m);
    for (;;) {
        bool busy = false;
        for (CUstream s = c->streams; s; s = s->next)
            if ((only == NULL || s == only) && s->head != s->tail)
                busy = true;
        if (!busy || c->stop)
            break;
        pthread_cond_wait(&c->cv, &c->m);
    }
    pthread_mutex_unlock(&c->m);
}

static void sync_trim(int dev)
{
    pthread_mutex_lock(&g_mu);
    pools_sync_trim(dev);
    pthread_mutex_unlock(&g_mu);
}

CUresult cuCtxSynchronize(void)
{
    CHECK_INIT();
    WITH_CTX(c);
    pthread_mutex_unlock(&g_mu);
    ctx_wait_idle(c, NULL);
    sync_trim(c->dev);
    return CUDA_SUCCESS;
}

/* ---- worker: executes queued operations, time-sliced on the shared device ---- */
static void op_discard(struct op *op)
{
    if (op->ev)
        event_unref(op->ev);
    free(op->graph_ns);
    memset(op, 0, sizeof *op);
}

static void sleep_until(uint64_t t)
{
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void release_device(CUcontext c)
{
    if (c->holding) {
        sim_dev_release(g_s, c->dev, c->token);
        c->holding = false;
    }
}

/* "Runs" a kernel: sleeps while holding the device, at most one slice at a time. */
static void run_kernel(CUcontext c, uint64_t ns)
{
    uint64_t left = ns;
    while (left > 0 && !__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
        if (!c->holding) {
            c->token = sim_dev_acquire(g_s, c->dev);
            c->holding = true;
            c->slice_end = sim_now_ns() + g_slice_ns;
        }
        uint64_t t0 = sim_now_ns();
        uint64_t until = t0 + left;
        if (c->slice_end > t0 && until > c->slice_end)
            until = c->slice_end;
        sleep_until(until);
        uint64_t t1 = sim_now_ns();
        uint64_t ran = t1 - t0;
        sim_account_busy(g_s, c->dev, ran);
        left -= ran < left ? ran : left;
        if (t1 >= c->slice_end) {
            if (sim_dev_has_waiters(g_s, c->dev))
                release_device(c); /* hand over: re-queue behind the waiters */
            else
                c->slice_end = t1 + g_slice_ns;
        }
    }
}

static bool op_ready(const struct op *op)
{
    if (op->kind != OP_WAIT)
        return true;
    return __atomic_load_n(&op->ev->done_seq, __ATOMIC_ACQUIRE) >= op->seq;
}

static void *worker_main(void *arg)
{
    CUcontext c = arg;
    pthread_mutex_lock(&c->m);
    while (!c->stop) {
        CUstream pick = NULL;
        bool blocked = false;
        CUstream start = c->rr && c->rr->next ? c->rr->next : c->streams;
        CUstream s = start;
        do {
            if (s == NULL)
                break;
            if (s->head != s->tail) {
                if (op_ready(&s->q[s->head % QCAP])) {
                    pick = s;
                    break;
                }
                blocked = true;
            }
            s = s->next ? s->next : c->streams;
        } while (s != start);
        if (pick == NULL) {
            release_device(c);
            if (blocked) {
                /* waiting on another context's event: poll */
                struct timespec ts;
                clock_gettime(CLOCK_MONOTONIC, &ts);
                ts.tv_nsec += 200000;
                if (ts.tv_nsec >= 1000000000) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000;
                }
                pthread_cond_timedwait(&c->cv, &c->m, &ts);
            } else {
                pthread_cond_wait(&c->cv, &c->m);
            }
            continue;
        }
        c->rr = pick;
        struct op op = pick->q[pick->head % QCAP];
        pthread_mutex_unlock(&c->m);
        switch (op.kind) {
        case OP_KERNEL: run_kernel(c, op.ns); break;
        case OP_GRAPH:
            for (size_t i = 0; i < op.graph_n; i++)
                run_kernel(c, op.graph_ns[i]);
            break;
        case OP_RECORD:
            __atomic_store_n(&op.ev->t_ns, sim_now_ns(), __ATOMIC_RELAXED);
            __atomic_store_n(&op.ev->done_seq, op.seq, __ATOMIC_RELEASE);
            break;
        default: break;
        }
        pthread_mutex_lock(&c->m);
        op_discard(&pick->q[pick->head % QCAP]);
        pick->head++;
        pthread_cond_broadcast(&c->cv);
    }
    release_device(c);
    pthread_mutex_unlock(&c->m);
    return NULL;
}

static CUresult enqueue(CUstream s, const struct op *op)
{
    CUcontext c = s->h.ctx;
    pthread_mutex_lock(&c->m);
    while (s->tail - s->head >= QCAP && !c->stop)
        pthread_cond_wait(&c->cv, &c->m); /* a full queue blocks, like the driver's push buffer */
    if (c->stop) {
        pthread_mutex_unlock(&c->m);
        return CUDA_ERROR_INVALID_CONTEXT;
    }
    s->q[s->tail % QCAP] = *op;
    s->tail++;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->m);
    return CUDA_SUCCESS;
}

/* Maps NULL/legacy/per-thread handles to the current context's default stream. g_mu held. */
static CUresult resolve_stream(CUstream h, CUstream *out)
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

/* ---- modules ---- */
static CUresult module_new(CUmodule *module)
{
    WITH_CTX(c);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    CUmodule m = calloc(1, sizeof *m);
    if (m != NULL && sim_mem_charge(g_s, c->dev, MODULE_OVERHEAD) == 0) {
        m->h.type = T_MODULE;
        m->h.ctx = c;
        if (reg_add(m, T_MODULE)) {
            *module = m;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, c->dev, MODULE_OVERHEAD);
        }
    }
    if (r != CUDA_SUCCESS)
        free(m);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    CHECK_INIT();
    if (module == NULL || image == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return module_new(module);
}

CUresult cuModuleLoad(CUmodule *module, const char *fname)
{
    CHECK_INIT();
    if (module == NULL || fname == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (access(fname, R_OK) != 0)
        return CUDA_ERROR_NOT_FOUND;
    return module_new(module);
}

static void module_free_locked(CUmodule m)
{
    for (size_t i = 0; i < g_reg.cap; i++) {
        if (g_reg.k[i] > 1 && g_reg.v[i] == T_FUNC && ((CUfunction)g_reg.k[i])->mod == m) {
            CUfunction f = (CUfunction)g_reg.k[i];
            reg_del(f);
            free(f);
        }
    }
    sim_mem_uncharge(g_s, m->h.ctx->dev, MODULE_OVERHEAD);
    reg_del(m);
    free(m);
}

CUresult cuModuleUnload(CUmodule hmod)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hmod, T_MODULE)) {
        module_free_locked(hmod);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    CHECK_INIT();
    if (hfunc == NULL || name == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hmod, T_MODULE)) {
        CUfunction f = calloc(1, sizeof *f);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        if (f != NULL) {
            f->h.type = T_FUNC;
            f->h.ctx = hmod->h.ctx;
            f->mod = hmod;
            snprintf(f->name, sizeof f->name, "%s", name);
            f->sleep = strcmp(name, "sim_sleep_ns") == 0;
            if (reg_add(f, T_FUNC)) {
                *hfunc = f;
                r = CUDA_SUCCESS;
            } else {
                free(f);
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* ---- memory ---- */
CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    CHECK_INIT();
    if (dptr == NULL || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUresult r = alloc_new_locked(c, bytesize, bytesize, A_PLAIN, NULL, dptr);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes, size_t Height,
                            unsigned int ElementSizeBytes)
{
    CHECK_INIT();
    if (dptr == NULL || pPitch == NULL || WidthInBytes == 0 || Height == 0)
        return CUDA_ERROR_INVALID_VALUE;
    if (ElementSizeBytes != 4 && ElementSizeBytes != 8 && ElementSizeBytes != 16)
        return CUDA_ERROR_INVALID_VALUE;
    size_t pitch = (WidthInBytes + 511) & ~(size_t)511;
    if (Height > SIZE_MAX / pitch)
        return CUDA_ERROR_OUT_OF_MEMORY;
    WITH_CTX(c);
    CUresult r = alloc_new_locked(c, pitch * Height, pitch * Height, A_PLAIN, NULL, dptr);
    pthread_mutex_unlock(&g_mu);
    if (r == CUDA_SUCCESS)
        *pPitch = pitch;
    return r;
}

CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    CHECK_INIT();
    if (dptr == NULL || bytesize == 0 || (flags != CU_MEM_ATTACH_GLOBAL && flags != CU_MEM_ATTACH_HOST))
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUresult r = alloc_new_locked(c, bytesize, bytesize, A_PLAIN, NULL, dptr);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    CHECK_INIT();
    if (dptr == 0)
        return CUDA_SUCCESS;
    pthread_mutex_lock(&g_mu);
    struct alloc *a = (struct alloc *)hmap_get(&g_allocs, (uintptr_t)dptr);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (a != NULL && (a->kind == A_PLAIN || a->kind == A_POOL)) {
        CUmemoryPool p = a->kind == A_POOL ? a->pool : NULL;
        alloc_free_locked(a);
        if (p != NULL && reg_is(p, T_POOL))
            pool_trim(p, p->threshold > p->used ? p->threshold : p->used);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemGetInfo_v2(size_t *free_, size_t *total)
{
    CHECK_INIT();
    if (free_ == NULL || total == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    int dev = c->dev;
    pthread_mutex_unlock(&g_mu);
    uint64_t used = sim_mem_used(g_s, dev);
    *total = (size_t)g_s->total_mem;
    *free_ = used >= g_s->total_mem ? 0 : (size_t)(g_s->total_mem - used);
    return CUDA_SUCCESS;
}

static CUresult copy_check(CUdeviceptr d, size_t n, const void *host, unsigned char **shadow)
{
    if (host == NULL && n > 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    struct alloc *a = alloc_containing(d, n);
    CUresult r = a ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
    *shadow = a && a->shadow ? a->shadow + (d - a->base) : NULL;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dstDevice, const void *srcHost, size_t ByteCount)
{
    CHECK_INIT();
    unsigned char *sh;
    CUresult r = copy_check(dstDevice, ByteCount, srcHost, &sh);
    if (r == CUDA_SUCCESS && sh)
        memcpy(sh, srcHost, ByteCount);
    return r;
}

CUresult cuMemcpyDtoH_v2(void *dstHost, CUdeviceptr srcDevice, size_t ByteCount)
{
    CHECK_INIT();
    unsigned char *sh;
    CUresult r = copy_check(srcDevice, ByteCount, dstHost, &sh);
    if (r == CUDA_SUCCESS && sh)
        memcpy(dstHost, sh, ByteCount);
    return r;
}

CUresult cuMemsetD8_v2(CUdeviceptr dstDevice, unsigned char uc, size_t N)
{
    CHECK_INIT();
    unsigned char *sh;
    CUresult r = copy_check(dstDevice, N, "", &sh);
    if (r == CUDA_SUCCESS && sh)
        memset(sh, uc, N);
    return r;
}

/* ---- arrays ---- */
static size_t format_size(CUarray_format f)
{
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8: case CU_AD_FORMAT_SIGNED_INT8: return 1;
    case CU_AD_FORMAT_UNSIGNED_INT16: case CU_AD_FORMAT_SIGNED_INT16: case CU_AD_FORMAT_HALF: return 2;
    case CU_AD_FORMAT_UNSIGNED_INT32: case CU_AD_FORMAT_SIGNED_INT32: case CU_AD_FORMAT_FLOAT: return 4;
    default: return 0;
    }
}

/* w*h*d*channels*format size, 0 on invalid or overflowing input. */
static uint64_t array_bytes(size_t w, size_t h, size_t d, CUarray_format f, unsigned ch)
{
    size_t fs = format_size(f);
    if (fs == 0 || w == 0 || (ch != 1 && ch != 2 && ch != 4))
        return 0;
    unsigned __int128 b = (unsigned __int128)w * (h ? h : 1) * (d ? d : 1) * ch * fs;
    return b > UINT64_MAX ? 0 : (uint64_t)b;
}

static CUresult array_new(void **out, int type, uint64_t bytes)
{
    if (bytes == 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    struct CUarray_st *a = calloc(1, sizeof *a); /* same layout as the mipmapped kind */
    if (a != NULL && sim_mem_charge(g_s, c->dev, bytes) == 0) {
        a->h.type = type;
        a->h.ctx = c;
        a->dev = c->dev;
        a->bytes = bytes;
        if (reg_add(a, type)) {
            *out = a;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, c->dev, bytes);
        }
    }
    if (r != CUDA_SUCCESS)
        free(a);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuArrayCreate_v2(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR *d)
{
    CHECK_INIT();
    if (pHandle == NULL || d == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return array_new((void **)pHandle, T_ARRAY, array_bytes(d->Width, d->Height, 1, d->Format, d->NumChannels));
}

CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *d)
{
    CHECK_INIT();
    if (pHandle == NULL || d == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return array_new((void **)pHandle, T_ARRAY, array_bytes(d->Width, d->Height, d->Depth, d->Format, d->NumChannels));
}

CUresult cuMipmappedArrayCreate(CUmipmappedArray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *d, unsigned int numMipmapLevels)
{
    CHECK_INIT();
    if (pHandle == NULL || d == NULL || numMipmapLevels == 0 || numMipmapLevels > 32)
        return CUDA_ERROR_INVALID_VALUE;
    uint64_t total = 0;
    size_t w = d->Width, h = d->Height, dp = d->Depth;
    for (unsigned i = 0; i < numMipmapLevels; i++) {
        uint64_t b = array_bytes(w, h, dp, d->Format, d->NumChannels);
        if (b == 0 || total + b < total)
            return CUDA_ERROR_INVALID_VALUE;
        total += b;
        w = w > 1 ? w / 2 : 1;
        h = h > 1 ? h / 2 : h;
        dp = dp > 1 ? dp / 2 : dp;
    }
    return array_new((void **)pHandle, T_MIPMAP, total);
}

static CUresult array_destroy(void *h, int type)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(h, type)) {
        struct CUarray_st *a = h;
        sim_mem_uncharge(g_s, a->dev, a->bytes);
        reg_del(a);
        free(a);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuArrayDestroy(CUarray hArray)
{
    return array_destroy(hArray, T_ARRAY);
}

CUresult cuMipmappedArrayDestroy(CUmipmappedArray hMipmappedArray)
{
    return array_destroy(hMipmappedArray, T_MIPMAP);
}

/* ---- virtual memory management ---- */
static int prop_dev(const CUmemAllocationProp *prop)
{
    if (prop == NULL || prop->type != CU_MEM_ALLOCATION_TYPE_PINNED ||
        prop->location.type != CU_MEM_LOCATION_TYPE_DEVICE || !valid_dev(prop->location.id))
        return -1;
    return prop->location.id;
}

CUresult cuMemGetAllocationGranularity(size_t *granularity, const CUmemAllocationProp *prop,
                                       CUmemAllocationGranularity_flags option)
{
    CHECK_INIT();
    if (granularity == NULL || prop_dev(prop) < 0 ||
        (option != CU_MEM_ALLOC_GRANULARITY_MINIMUM && option != CU_MEM_ALLOC_GRANULARITY_RECOMMENDED))
        return CUDA_ERROR_INVALID_VALUE;
    *granularity = GRANULARITY;
    return CUDA_SUCCESS;
}

CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                     unsigned long long flags)
{
    CHECK_INIT();
    int dev = prop_dev(prop);
    if (handle == NULL || dev < 0 || size == 0 || size % GRANULARITY != 0 || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    struct memhandle *m = calloc(1, sizeof *m);
    if (m == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    m->h.type = T_MEMHANDLE;
    m->dev = dev;
    m->size = size;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    if (sim_mem_charge(g_s, dev, size) == 0) {
        if (reg_add(m, T_MEMHANDLE)) {
            *handle = (CUmemGenericAllocationHandle)(uintptr_t)m;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, dev, size);
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        free(m);
    return r;
}

static void memhandle_maybe_free(struct memhandle *m)
{
    if (m->released && m->maps == 0) {
        sim_mem_uncharge(g_s, m->dev, m->size); /* physical memory goes when released and unmapped */
        reg_del(m);
        free(m);
    }
}

CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    CHECK_INIT();
    struct memhandle *m = (struct memhandle *)(uintptr_t)handle;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(m, T_MEMHANDLE) && !m->released) {
        m->released = true;
        memhandle_maybe_free(m);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemAddressReserve(CUdeviceptr *ptr, size_t size, size_t alignment, CUdeviceptr addr,
                             unsigned long long flags)
{
    CHECK_INIT();
    (void)addr; /* a hint only */
    if (ptr == NULL || size == 0 || size % GRANULARITY != 0 || flags != 0 ||
        (alignment != 0 && (alignment & (alignment - 1)) != 0))
        return CUDA_ERROR_INVALID_VALUE;
    struct alloc *a = calloc(1, sizeof *a);
    if (a == NULL)
        return CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_lock(&g_mu);
    a->kind = A_RESERVE;
    a->size = size;
    a->base = new_addr(size, alignment > GRANULARITY ? alignment : GRANULARITY);
    CUresult r = CUDA_SUCCESS;
    if (hmap_put(&g_allocs, (uintptr_t)a->base, (uintptr_t)a))
        *ptr = a->base;
    else
        r = CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        free(a);
    return r;
}

/* Mappings overlapping [p, p+n). */
static bool any_mapping_in(uint64_t p, uint64_t n)
{
    for (size_t i = 0; i < g_maps.cap; i++) {
        if (g_maps.k[i] <= 1)
            continue;
        struct alloc *a = (struct alloc *)g_maps.v[i];
        if (a->kind == A_MAP && a->base < p + n && p < a->base + a->size)
            return true;
    }
    return false;
}

CUresult cuMemAddressFree(CUdeviceptr ptr, size_t size)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    struct alloc *a = (struct alloc *)hmap_get(&g_allocs, (uintptr_t)ptr);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (a != NULL && a->kind == A_RESERVE && a->size == size && !any_mapping_in(ptr, size)) {
        hmap_del(&g_allocs, (uintptr_t)ptr);
        free(a);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

static struct alloc *reservation_of(uint64_t p, uint64_t n)
{
    for (size_t i = 0; i < g_allocs.cap; i++) {
        if (g_allocs.k[i] <= 1)
            continue;
        struct alloc *a = (struct alloc *)g_allocs.v[i];
        if (a->kind == A_RESERVE && p >= a->base && p + n <= a->base + a->size && p + n > p)
            return a;
    }
    return NULL;
}

CUresult cuMemMap(CUdeviceptr ptr, size_t size, size_t offset, CUmemGenericAllocationHandle handle,
                  unsigned long long flags)
{
    CHECK_INIT();
    struct memhandle *m = (struct memhandle *)(uintptr_t)handle;
    if (size == 0 || flags != 0 || ptr % GRANULARITY != 0 || size % GRANULARITY != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    struct alloc *a = NULL;
    if (!reg_is(m, T_MEMHANDLE) || m->released)
        r = CUDA_ERROR_INVALID_HANDLE;
    else if (offset > m->size || size > m->size - offset || reservation_of(ptr, size) == NULL ||
             any_mapping_in(ptr, size))
        r = CUDA_ERROR_INVALID_VALUE;
    else if ((a = calloc(1, sizeof *a)) == NULL)
        r = CUDA_ERROR_OUT_OF_MEMORY;
    else {
        a->kind = A_MAP;
        a->base = ptr;
        a->size = size;
        a->dev = m->dev;
        a->mh = m;
        if (hmap_put(&g_maps, (uintptr_t)ptr, (uintptr_t)a)) {
            m->maps++;
            r = CUDA_SUCCESS;
        } else {
            free(a);
            r = CUDA_ERROR_OUT_OF_MEMORY;
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemUnmap(CUdeviceptr ptr, size_t size)
{
    CHECK_INIT();
    if (size == 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reservation_of(ptr, size) != NULL) {
        for (size_t i = 0; i < g_maps.cap; i++) {
            if (g_maps.k[i] <= 1)
                continue;
            struct alloc *a = (struct alloc *)g_maps.v[i];
            if (a->kind == A_MAP && a->base >= ptr && a->base + a->size <= ptr + size) {
                struct memhandle *m = a->mh;
                hmap_del(&g_maps, (uintptr_t)a->base);
                free(a);
                m->maps--;
                memhandle_maybe_free(m);
                r = CUDA_SUCCESS;
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemSetAccess(CUdeviceptr ptr, size_t size, const CUmemAccessDesc *desc, size_t count)
{
    CHECK_INIT();
    if (desc == NULL || count == 0 || size == 0)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < count; i++)
        if (desc[i].location.type != CU_MEM_LOCATION_TYPE_DEVICE || desc[i].location.id < 0 ||
            desc[i].location.id >= g_ndev)
            return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    bool ok = reservation_of(ptr, size) != NULL && any_mapping_in(ptr, size);
    pthread_mutex_unlock(&g_mu);
    return ok ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}

/* ---- stream-ordered allocator ---- */
static CUmemoryPool default_pool_locked(int dev)
{
    if (g_default_pool[dev] == NULL)
        g_default_pool[dev] = pool_new(dev, true);
    return g_default_pool[dev];
}

CUresult cuDeviceGetDefaultMemPool(CUmemoryPool *pool_out, CUdevice dev)
{
    CHECK_INIT();
    if (pool_out == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(dev))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    *pool_out = default_pool_locked(dev);
    pthread_mutex_unlock(&g_mu);
    return *pool_out ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult alloc_async(CUdeviceptr *dptr, size_t n, CUmemoryPool pool, CUstream hs)
{
    CHECK_INIT();
    if (dptr == NULL || n == 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS) {
        CUcontext c = s->h.ctx;
        if (pool == NULL)
            pool = default_pool_locked(c->dev);
        if (!reg_is(pool, T_POOL))
            r = CUDA_ERROR_INVALID_VALUE;
        else
            r = alloc_new_locked(c, n, n, A_POOL, pool, dptr);
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    return alloc_async(dptr, bytesize, NULL, hStream);
}

CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    return alloc_async(dptr, bytesize, NULL, hStream);
}

CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool, CUstream hStream)
{
    if (pool == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return alloc_async(dptr, bytesize, pool, hStream);
}

CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool, CUstream hStream)
{
    return cuMemAllocFromPoolAsync(dptr, bytesize, pool, hStream);
}

CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hStream, &s);
    if (r == CUDA_SUCCESS) {
        struct alloc *a = (struct alloc *)hmap_get(&g_allocs, (uintptr_t)dptr);
        if (a == NULL || (a->kind != A_PLAIN && a->kind != A_POOL))
            r = CUDA_ERROR_INVALID_VALUE;
        else
            alloc_free_locked(a); /* pool memory stays reserved until a synchronize */
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    return cuMemFreeAsync(dptr, hStream);
}

CUresult cuMemPoolCreate(CUmemoryPool *pool, const CUmemPoolProps *p)
{
    CHECK_INIT();
    if (pool == NULL || p == NULL || p->allocType != CU_MEM_ALLOCATION_TYPE_PINNED ||
        p->location.type != CU_MEM_LOCATION_TYPE_DEVICE)
        return CUDA_ERROR_INVALID_VALUE;
    if (!valid_dev(p->location.id))
        return CUDA_ERROR_INVALID_DEVICE;
    pthread_mutex_lock(&g_mu);
    *pool = pool_new(p->location.id, false);
    pthread_mutex_unlock(&g_mu);
    return *pool ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuMemPoolDestroy(CUmemoryPool pool)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(pool, T_POOL) && !pool->is_default) {
        for (size_t i = 0; i < g_allocs.cap; i++) {
            if (g_allocs.k[i] <= 1)
                continue;
            struct alloc *a = (struct alloc *)g_allocs.v[i];
            if (a->kind == A_POOL && a->pool == pool)
                alloc_free_locked(a);
        }
        pool_trim(pool, 0);
        reg_del(pool);
        free(pool);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemPoolTrimTo(CUmemoryPool pool, size_t minBytesToKeep)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(pool, T_POOL)) {
        pool_trim(pool, minBytesToKeep > pool->used ? minBytesToKeep : pool->used);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemPoolSetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value)
{
    CHECK_INIT();
    if (value == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(pool, T_POOL)) {
        r = CUDA_ERROR_INVALID_VALUE;
    } else {
        switch (attr) {
        case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
            pool->reuse[attr - 1] = *(int *)value != 0;
            break;
        case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: pool->threshold = *(cuuint64_t *)value; break;
        case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH:
            if (*(cuuint64_t *)value != 0)
                r = CUDA_ERROR_INVALID_VALUE;
            else
                pool->reserved_high = pool->used + pool->cached;
            break;
        case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
            if (*(cuuint64_t *)value != 0)
                r = CUDA_ERROR_INVALID_VALUE;
            else
                pool->used_high = pool->used;
            break;
        default: r = CUDA_ERROR_INVALID_VALUE; break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuMemPoolGetAttribute(CUmemoryPool pool, CUmemPool_attribute attr, void *value)
{
    CHECK_INIT();
    if (value == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(pool, T_POOL)) {
        r = CUDA_ERROR_INVALID_VALUE;
    } else {
        switch (attr) {
        case CU_MEMPOOL_ATTR_REUSE_FOLLOW_EVENT_DEPENDENCIES:
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_OPPORTUNISTIC:
        case CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES:
            *(int *)value = pool->reuse[attr - 1];
            break;
        case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *(cuuint64_t *)value = pool->threshold; break;
        case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *(cuuint64_t *)value = pool->used + pool->cached; break;
        case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *(cuuint64_t *)value = pool->reserved_high; break;
        case CU_MEMPOOL_ATTR_USED_MEM_CURRENT: *(cuuint64_t *)value = pool->used; break;
        case CU_MEMPOOL_ATTR_USED_MEM_HIGH: *(cuuint64_t *)value = pool->used_high; break;
        default: r = CUDA_ERROR_INVALID_VALUE; break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* ---- graphs ---- */
static void graph_free_locked(CUgraph g)
{
    for (size_t i = 0; i < g->n; i++) {
        reg_del(g->nodes[i]);
        free(g->nodes[i]);
    }
    free(g->nodes);
    reg_del(g);
    free(g);
}

static CUgraph graph_new_locked(void)
{
    CUgraph g = calloc(1, sizeof *g);
    if (g == NULL)
        return NULL;
    g->h.type = T_GRAPH;
    if (!reg_add(g, T_GRAPH)) {
        free(g);
        return NULL;
    }
    return g;
}

static CUresult graph_add_locked(CUgraph g, bool kernel, uint64_t ns, CUgraphNode *out)
{
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        CUgraphNode *nn = realloc(g->nodes, cap * sizeof *nn);
        if (nn == NULL)
            return CUDA_ERROR_OUT_OF_MEMORY;
        g->nodes = nn;
        g->cap = cap;
    }
    CUgraphNode node = calloc(1, sizeof *node);
    if (node == NULL || !reg_add(node, T_NODE)) {
        free(node);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    node->h.type = T_NODE;
    node->g = g;
    node->kernel = kernel;
    node->ns = ns;
    g->nodes[g->n++] = node;
    if (out)
        *out = node;
    return CUDA_SUCCESS;
}

CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags)
{
    CHECK_INIT();
    if (phGraph == NULL || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    *phGraph = graph_new_locked();
    pthread_mutex_unlock(&g_mu);
    return *phGraph ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult check_deps(CUgraph g, const CUgraphNode *deps, size_t n)
{
    if (n > 0 && deps == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < n; i++)
        if (!reg_is(deps[i], T_NODE) || deps[i]->g != g)
            return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

static uint64_t kernel_ns(CUfunction f, void **params, void **extra)
{
    if (!f->sleep)
        return g_kernel_ns;
    uint64_t v = 0;
    if (params != NULL && params[0] != NULL) {
        memcpy(&v, params[0], sizeof v);
        return v;
    }
    /* extra = {CU_LAUNCH_PARAM_BUFFER_POINTER, buf, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, END} */
    for (int i = 0; extra != NULL && i < 16 && extra[i] != NULL; i += 2)
        if (extra[i] == (void *)1 && extra[i + 1] != NULL) {
            memcpy(&v, extra[i + 1], sizeof v);
            return v;
        }
    return g_kernel_ns;
}

CUresult cuGraphAddKernelNode_v2(CUgraphNode *phGraphNode, CUgraph hGraph, const CUgraphNode *dependencies,
                                 size_t numDependencies, const CUDA_KERNEL_NODE_PARAMS_v2 *p)
{
    CHECK_INIT();
    if (phGraphNode == NULL || p == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r;
    if (!reg_is(hGraph, T_GRAPH))
        r = CUDA_ERROR_INVALID_VALUE;
    else if ((r = check_deps(hGraph, dependencies, numDependencies)) != CUDA_SUCCESS)
        ;
    else if (!reg_is(p->func, T_FUNC))
        r = CUDA_ERROR_INVALID_VALUE;
    else
        r = graph_add_locked(hGraph, true, kernel_ns(p->func, p->kernelParams, p->extra), phGraphNode);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphAddEmptyNode(CUgraphNode *phGraphNode, CUgraph hGraph, const CUgraphNode *dependencies,
                             size_t numDependencies)
{
    CHECK_INIT();
    if (phGraphNode == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r;
    if (!reg_is(hGraph, T_GRAPH))
        r = CUDA_ERROR_INVALID_VALUE;
    else if ((r = check_deps(hGraph, dependencies, numDependencies)) == CUDA_SUCCESS)
        r = graph_add_locked(hGraph, false, 0, phGraphNode);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph, unsigned long long flags)
{
    CHECK_INIT();
    (void)flags;
    if (phGraphExec == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraph, T_GRAPH)) {
        CUgraphExec e = calloc(1, sizeof *e);
        uint64_t *ns = calloc(hGraph->n ? hGraph->n : 1, sizeof *ns);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        if (e != NULL && ns != NULL) {
            e->h.type = T_EXEC;
            e->ns = ns;
            for (size_t i = 0; i < hGraph->n; i++)
                if (hGraph->nodes[i]->kernel)
                    e->ns[e->n++] = hGraph->nodes[i]->ns;
            if (reg_add(e, T_EXEC)) {
                *phGraphExec = e;
                r = CUDA_SUCCESS;
            }
        }
        if (r != CUDA_SUCCESS) {
            free(e);
            free(ns);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraphExec, T_EXEC)) {
        reg_del(hGraphExec);
        free(hGraphExec->ns);
        free(hGraphExec);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphDestroy(CUgraph hGraph)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraph, T_GRAPH)) {
        graph_free_locked(hGraph);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

static CUresult graph_launch(CUgraphExec e, CUstream hs)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EXEC))
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS && s->capture != NULL) {
        for (size_t i = 0; i < e->n && r == CUDA_SUCCESS; i++)
            r = graph_add_locked(s->capture, true, e->ns[i], NULL);
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    struct op op = {.kind = OP_GRAPH};
    if (r == CUDA_SUCCESS) {
        op.graph_n = e->n;
        op.graph_ns = malloc((e->n ? e->n : 1) * sizeof *op.graph_ns);
        if (op.graph_ns == NULL)
            r = CUDA_ERROR_OUT_OF_MEMORY;
        else
            memcpy(op.graph_ns, e->ns, e->n * sizeof *op.graph_ns);
    }
    pthread_mutex_unlock(&g_mu);
    if (r == CUDA_SUCCESS) {
        r = enqueue(s, &op);
        if (r != CUDA_SUCCESS)
            free(op.graph_ns);
    }
    return r;
}

CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(hGraphExec, hStream);
}

CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(hGraphExec, hStream);
}

/* ---- launches ---- */
static CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                       CUstream hs, void **params, void **extra)
{
    CHECK_INIT();
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || bx * by * bz > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(f, T_FUNC))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r != CUDA_SUCCESS) {
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    uint64_t ns = kernel_ns(f, params, extra);
    if (s->capture != NULL) {
        r = graph_add_locked(s->capture, true, ns, NULL);
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    pthread_mutex_unlock(&g_mu);
    struct op op = {.kind = OP_KERNEL, .ns = ns};
    return enqueue(s, &op);
}

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                        unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                        unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, kernelParams, extra);
}

CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                             unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                             unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, kernelParams, extra);
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
    if (config == NULL || (config->numAttrs > 0 && config->attrs == NULL))
        return check_init() ? check_init() : CUDA_ERROR_INVALID_VALUE;
    return launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX, config->blockDimY,
                  config->blockDimZ, config->hStream, kernelParams, extra);
}

CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
    return cuLaunchKernelEx(config, f, kernelParams, extra);
}

CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                   unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                   unsigned int sharedMemBytes, CUstream hStream, void **kernelParams)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, kernelParams, NULL);
}

CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                        unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                                        unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                                        void **kernelParams)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, kernelParams, NULL);
}

/* ---- streams ---- */
CUresult cuStreamCreate(CUstream *phStream, unsigned int Flags)
{
    CHECK_INIT();
    if (phStream == NULL || (Flags & ~CU_STREAM_NON_BLOCKING) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    *phStream = stream_new_locked(c, Flags);
    pthread_mutex_unlock(&g_mu);
    return *phStream ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

CUresult cuStreamCreateWithPriority(CUstream *phStream, unsigned int flags, int priority)
{
    (void)priority;
    return cuStreamCreate(phStream, flags);
}

CUresult cuStreamDestroy_v2(CUstream hStream)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    if (!reg_is(hStream, T_STREAM) || hStream == hStream->h.ctx->def) {
        pthread_mutex_unlock(&g_mu);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUcontext c = hStream->h.ctx;
    reg_del(hStream);
    pthread_mutex_unlock(&g_mu);
    /* Like the driver: returns at once, queued work completes first. */
    ctx_wait_idle(c, hStream);
    pthread_mutex_lock(&g_mu);
    pthread_mutex_lock(&c->m);
    for (CUstream *pp = &c->streams; *pp; pp = &(*pp)->next)
        if (*pp == hStream) {
            *pp = hStream->next;
            break;
        }
    if (c->rr == hStream)
        c->rr = NULL;
    pthread_mutex_unlock(&c->m);
    if (hStream->capture)
        graph_free_locked(hStream->capture);
    free(hStream);
    pthread_mutex_unlock(&g_mu);
    return CUDA_SUCCESS;
}

/* CUDA 3.x's name, still exported by the driver (cuda.h maps the name to
 * _v2, so programs built against it never call this one; the hook does not
 * intercept it, and its tests use it as a path it cannot see). */
__attribute__((visibility("default"))) CUresult cuStreamDestroy(CUstream hStream);
CUresult cuStreamDestroy(CUstream hStream)
{
    return cuStreamDestroy_v2(hStream);
}

static CUresult stream_sync(CUstream hs)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && s->capture != NULL)
        r = CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        return r;
    ctx_wait_idle(s->h.ctx, s);
    sync_trim(s->h.ctx->dev);
    return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream hStream)
{
    return stream_sync(hStream);
}

CUresult cuStreamSynchronize_ptsz(CUstream hStream)
{
    return stream_sync(hStream);
}

static CUresult stream_query(CUstream hs)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS)
        return r;
    pthread_mutex_lock(&s->h.ctx->m);
    r = s->head == s->tail ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
    pthread_mutex_unlock(&s->h.ctx->m);
    return r;
}

CUresult cuStreamQuery(CUstream hStream)
{
    return stream_query(hStream);
}

CUresult cuStreamQuery_ptsz(CUstream hStream)
{
    return stream_query(hStream);
}

static CUresult stream_wait_event(CUstream hs, CUevent e, unsigned flags)
{
    CHECK_INIT();
    if (flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EVENT))
        r = CUDA_ERROR_INVALID_HANDLE;
    struct op op = {.kind = OP_WAIT};
    if (r == CUDA_SUCCESS) {
        op.seq = __atomic_load_n(&e->rec_seq, __ATOMIC_ACQUIRE);
        op.ev = e;
        __atomic_add_fetch(&e->refs, 1, __ATOMIC_ACQ_REL);
    }
    pthread_mutex_unlock(&g_mu);
    if (r != CUDA_SUCCESS || op.seq == 0 || s->capture != NULL) {
        if (op.ev)
            event_unref(op.ev);
        return r;
    }
    r = enqueue(s, &op);
    if (r != CUDA_SUCCESS)
        event_unref(e);
    return r;
}

CUresult cuStreamWaitEvent(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    return stream_wait_event(hStream, hEvent, Flags);
}

CUresult cuStreamWaitEvent_ptsz(CUstream hStream, CUevent hEvent, unsigned int Flags)
{
    return stream_wait_event(hStream, hEvent, Flags);
}

static CUresult is_capturing(CUstream hs, CUstreamCaptureStatus *st)
{
    CHECK_INIT();
    if (st == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS)
        *st = s->capture ? CU_STREAM_CAPTURE_STATUS_ACTIVE : CU_STREAM_CAPTURE_STATUS_NONE;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamIsCapturing(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    return is_capturing(hStream, captureStatus);
}

CUresult cuStreamIsCapturing_ptsz(CUstream hStream, CUstreamCaptureStatus *captureStatus)
{
    return is_capturing(hStream, captureStatus);
}

static CUresult begin_capture(CUstream hs, CUstreamCaptureMode mode)
{
    CHECK_INIT();
    if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
        mode != CU_STREAM_CAPTURE_MODE_RELAXED)
        return CUDA_ERROR_INVALID_VALUE;
    if (hs == NULL || hs == CU_STREAM_LEGACY)
        return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED; /* the legacy stream cannot be captured */
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && s->capture != NULL)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS && (s->capture = graph_new_locked()) == NULL)
        r = CUDA_ERROR_OUT_OF_MEMORY;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamBeginCapture_v2(CUstream hStream, CUstreamCaptureMode mode)
{
    return begin_capture(hStream, mode);
}

CUresult cuStreamBeginCapture_v2_ptsz(CUstream hStream, CUstreamCaptureMode mode)
{
    return begin_capture(hStream, mode);
}

static CUresult end_capture(CUstream hs, CUgraph *out)
{
    CHECK_INIT();
    if (out == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && s->capture == NULL)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS) {
        *out = s->capture;
        s->capture = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuStreamEndCapture(CUstream hStream, CUgraph *phGraph)
{
    return end_capture(hStream, phGraph);
}

CUresult cuStreamEndCapture_ptsz(CUstream hStream, CUgraph *phGraph)
{
    return end_capture(hStream, phGraph);
}

/* ---- events ---- */
CUresult cuEventCreate(CUevent *phEvent, unsigned int Flags)
{
    CHECK_INIT();
    if (phEvent == NULL || (Flags & ~(unsigned)(CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING | 0x4)) != 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUevent e = calloc(1, sizeof *e);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    if (e != NULL) {
        e->h.type = T_EVENT;
        e->h.ctx = c;
        e->flags = Flags;
        e->refs = 1;
        if (reg_add(e, T_EVENT)) {
            *phEvent = e;
            r = CUDA_SUCCESS;
        } else {
            free(e);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

static CUresult event_record(CUevent e, CUstream hs)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EVENT))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && e->h.ctx != s->h.ctx)
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r != CUDA_SUCCESS || s->capture != NULL) {
        pthread_mutex_unlock(&g_mu);
        return r; /* a record while capturing adds no timed work */
    }
    pthread_mutex_lock(&s->h.ctx->m);
    struct op op = {.kind = OP_RECORD, .ev = e, .seq = ++e->rec_seq};
    __atomic_add_fetch(&e->refs, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_unlock(&s->h.ctx->m);
    pthread_mutex_unlock(&g_mu);
    r = enqueue(s, &op);
    if (r != CUDA_SUCCESS)
        event_unref(e);
    return r;
}

CUresult cuEventRecord(CUevent hEvent, CUstream hStream)
{
    return event_record(hEvent, hStream);
}

CUresult cuEventRecord_ptsz(CUevent hEvent, CUstream hStream)
{
    return event_record(hEvent, hStream);
}

static bool event_done(CUevent e)
{
    return __atomic_load_n(&e->done_seq, __ATOMIC_ACQUIRE) >= __atomic_load_n(&e->rec_seq, __ATOMIC_ACQUIRE);
}

CUresult cuEventQuery(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = reg_is(hEvent, T_EVENT) ? (event_done(hEvent) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY)
                                        : CUDA_ERROR_INVALID_HANDLE;
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuEventSynchronize(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    if (!reg_is(hEvent, T_EVENT)) {
        pthread_mutex_unlock(&g_mu);
        return CUDA_ERROR_INVALID_HANDLE;
    }
    CUcontext c = hEvent->h.ctx;
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_lock(&c->m);
    while (!event_done(hEvent) && !c->stop)
        pthread_cond_wait(&c->cv, &c->m);
    pthread_mutex_unlock(&c->m);
    sync_trim(c->dev);
    return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime(float *pMilliseconds, CUevent hStart, CUevent hEnd)
{
    CHECK_INIT();
    if (pMilliseconds == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_SUCCESS;
    if (!reg_is(hStart, T_EVENT) || !reg_is(hEnd, T_EVENT) || (hStart->flags & CU_EVENT_DISABLE_TIMING) ||
        (hEnd->flags & CU_EVENT_DISABLE_TIMING) || hStart->rec_seq == 0 || hEnd->rec_seq == 0)
        r = CUDA_ERROR_INVALID_HANDLE;
    else if (!event_done(hStart) || !event_done(hEnd))
        r = CUDA_ERROR_NOT_READY;
    else
        *pMilliseconds = (float)(((double)hEnd->t_ns - (double)hStart->t_ns) / 1e6);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuEventElapsedTime_v2(float *pMilliseconds, CUevent hStart, CUevent hEnd)
{
    return cuEventElapsedTime(pMilliseconds, hStart, hEnd);
}

CUresult cuEventDestroy_v2(CUevent hEvent)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hEvent, T_EVENT)) {
        reg_del(hEvent);
        event_unref(hEvent); /* freed once queued ops naming it are done */
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* ---- cuGetProcAddress ---- */
struct proc_entry {
    const char *name;
    int min_version;
    void *fn;
    void *ptsz;
};

#define E(n, v, f) {n, v, (void *)(f), NULL}
#define P(n, v, f, p) {n, v, (void *)(f), (void *)(p)}

/* For one base name, several rows by rising min_version: the highest one the
 * caller's cudaVersion reaches wins, as in the real driver. */
static const struct proc_entry k_procs[] = {
    E("cuInit", 2000, cuInit),
    E("cuDriverGetVersion", 2020, cuDriverGetVersion),
    E("cuGetErrorString", 6000, cuGetErrorString),
    E("cuGetErrorName", 6000, cuGetErrorName),
    E("cuGetProcAddress", 11030, cuGetProcAddress),
    E("cuGetProcAddress", 12000, cuGetProcAddress_v2),
    E("cuDeviceGet", 2000, cuDeviceGet),
    E("cuDeviceGetCount", 2000, cuDeviceGetCount),
    E("cuDeviceGetName", 2000, cuDeviceGetName),
    E("cuDeviceGetUuid", 9020, cuDeviceGetUuid),
    E("cuDeviceGetUuid", 11040, cuDeviceGetUuid_v2),
    E("cuDeviceTotalMem", 2000, cuDeviceTotalMem),
    E("cuDeviceTotalMem", 3020, cuDeviceTotalMem_v2),
    E("cuDeviceGetAttribute", 2000, cuDeviceGetAttribute),
    E("cuDeviceGetDefaultMemPool", 11020, cuDeviceGetDefaultMemPool),
    E("cuDevicePrimaryCtxRetain", 7000, cuDevicePrimaryCtxRetain),
    E("cuDevicePrimaryCtxRelease", 11000, cuDevicePrimaryCtxRelease_v2),
    E("cuDevicePrimaryCtxReset", 11000, cuDevicePrimaryCtxReset_v2),
    E("cuDevicePrimaryCtxGetState", 7000, cuDevicePrimaryCtxGetState),
    E("cuDevicePrimaryCtxSetFlags", 11000, cuDevicePrimaryCtxSetFlags_v2),
    E("cuCtxCreate", 3020, cuCtxCreate_v2),
    E("cuCtxCreate", 12050, cuCtxCreate_v4),
    E("cuCtxDestroy", 4000, cuCtxDestroy_v2),
    E("cuCtxSetCurrent", 4000, cuCtxSetCurrent),
    E("cuCtxGetCurrent", 4000, cuCtxGetCurrent),
    E("cuCtxPushCurrent", 4000, cuCtxPushCurrent_v2),
    E("cuCtxPopCurrent", 4000, cuCtxPopCurrent_v2),
    E("cuCtxGetDevice", 2000, cuCtxGetDevice),
    E("cuCtxSynchronize", 2000, cuCtxSynchronize),
    E("cuModuleLoad", 2000, cuModuleLoad),
    E("cuModuleLoadData", 2000, cuModuleLoadData),
    E("cuModuleGetFunction", 2000, cuModuleGetFunction),
    E("cuModuleUnload", 2000, cuModuleUnload),
    E("cuMemAlloc", 3020, cuMemAlloc_v2),
    E("cuMemAllocPitch", 3020, cuMemAllocPitch_v2),
    E("cuMemAllocManaged", 6000, cuMemAllocManaged),
    E("cuMemFree", 3020, cuMemFree_v2),
    E("cuMemGetInfo", 3020, cuMemGetInfo_v2),
    E("cuMemcpyHtoD", 3020, cuMemcpyHtoD_v2),
    E("cuMemcpyDtoH", 3020, cuMemcpyDtoH_v2),
    E("cuMemsetD8", 3020, cuMemsetD8_v2),
    E("cuArrayCreate", 3020, cuArrayCreate_v2),
    E("cuArray3DCreate", 3020, cuArray3DCreate_v2),
    E("cuArrayDestroy", 2000, cuArrayDestroy),
    E("cuMipmappedArrayCreate", 5000, cuMipmappedArrayCreate),
    E("cuMipmappedArrayDestroy", 5000, cuMipmappedArrayDestroy),
    E("cuMemCreate", 10020, cuMemCreate),
    E("cuMemRelease", 10020, cuMemRelease),
    E("cuMemAddressReserve", 10020, cuMemAddressReserve),
    E("cuMemAddressFree", 10020, cuMemAddressFree),
    E("cuMemMap", 10020, cuMemMap),
    E("cuMemUnmap", 10020, cuMemUnmap),
    E("cuMemSetAccess", 10020, cuMemSetAccess),
    E("cuMemGetAllocationGranularity", 10020, cuMemGetAllocationGranularity),
    P("cuMemAllocAsync", 11020, cuMemAllocAsync, cuMemAllocAsync_ptsz),
    P("cuMemAllocFromPoolAsync", 11020, cuMemAllocFromPoolAsync, cuMemAllocFromPoolAsync_ptsz),
    P("cuMemFreeAsync", 11020, cuMemFreeAsync, cuMemFreeAsync_ptsz),
    E("cuMemPoolCreate", 11020, cuMemPoolCreate),
    E("cuMemPoolDestroy", 11020, cuMemPoolDestroy),
    E("cuMemPoolTrimTo", 11020, cuMemPoolTrimTo),
    E("cuMemPoolSetAttribute", 11020, cuMemPoolSetAttribute),
    E("cuMemPoolGetAttribute", 11020, cuMemPoolGetAttribute),
    P("cuLaunchKernel", 4000, cuLaunchKernel, cuLaunchKernel_ptsz),
    P("cuLaunchKernelEx", 11060, cuLaunchKernelEx, cuLaunchKernelEx_ptsz),
    P("cuLaunchCooperativeKernel", 9000, cuLaunchCooperativeKernel, cuLaunchCooperativeKernel_ptsz),
    E("cuStreamCreate", 2000, cuStreamCreate),
    E("cuStreamCreateWithPriority", 5050, cuStreamCreateWithPriority),
    E("cuStreamDestroy", 4000, cuStreamDestroy_v2),
    P("cuStreamSynchronize", 2000, cuStreamSynchronize, cuStreamSynchronize_ptsz),
    P("cuStreamQuery", 2000, cuStreamQuery, cuStreamQuery_ptsz),
    P("cuStreamWaitEvent", 3020, cuStreamWaitEvent, cuStreamWaitEvent_ptsz),
    P("cuStreamIsCapturing", 10000, cuStreamIsCapturing, cuStreamIsCapturing_ptsz),
    P("cuStreamBeginCapture", 10010, cuStreamBeginCapture_v2, cuStreamBeginCapture_v2_ptsz),
    P("cuStreamEndCapture", 10000, cuStreamEndCapture, cuStreamEndCapture_ptsz),
    E("cuEventCreate", 2000, cuEventCreate),
    P("cuEventRecord", 2000, cuEventRecord, cuEventRecord_ptsz),
    E("cuEventQuery", 2000, cuEventQuery),
    E("cuEventSynchronize", 2000, cuEventSynchronize),
    E("cuEventElapsedTime", 2000, cuEventElapsedTime),
    E("cuEventElapsedTime", 12080, cuEventElapsedTime_v2),
    E("cuEventDestroy", 4000, cuEventDestroy_v2),
    E("cuGraphCreate", 10000, cuGraphCreate),
    E("cuGraphAddKernelNode", 12000, cuGraphAddKernelNode_v2),
    E("cuGraphAddEmptyNode", 10000, cuGraphAddEmptyNode),
    E("cuGraphInstantiateWithFlags", 11040, cuGraphInstantiateWithFlags),
    P("cuGraphLaunch", 10000, cuGraphLaunch, cuGraphLaunch_ptsz),
    E("cuGraphExecDestroy", 10000, cuGraphExecDestroy),
    E("cuGraphDestroy", 10000, cuGraphDestroy),
};

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                             CUdriverProcAddressQueryResult *symbolStatus)
{
    if (symbol == NULL || pfn == NULL ||
        (flags & ~(cuuint64_t)(CU_GET_PROC_ADDRESS_LEGACY_STREAM | CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM)))
        return CUDA_ERROR_INVALID_VALUE;
    const struct proc_entry *best = NULL;
    bool known = false;
    for (size_t i = 0; i < sizeof k_procs / sizeof k_procs[0]; i++) {
        if (strcmp(k_procs[i].name, symbol) != 0)
            continue;
        known = true;
        if (k_procs[i].min_version <= cudaVersion && (best == NULL || k_procs[i].min_version > best->min_version))
            best = &k_procs[i];
    }
    *pfn = NULL;
    if (best == NULL) {
        if (symbolStatus)
            *symbolStatus = known ? CU_GET_PROC_ADDRESS_VERSION_NOT_SUFFICIENT : CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        return CUDA_ERROR_NOT_FOUND;
    }
    *pfn = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) && best->ptsz ? best->ptsz : best->fn;
    if (symbolStatus)
        *symbolStatus = CU_GET_PROC_ADDRESS_SUCCESS;
    return CUDA_SUCCESS;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    return cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, NULL);
}

/* ---- control surface for tests ---- */
static struct sim_shm *ctl_map(void)
{
    const char *name = getenv("VGPU_SIM_SHM");
    return sim_shm_map_existing(name && *name ? name : "vgpu-sim");
}

int vgpuSimMemorySum(const int *pids, int n, uint64_t *mem_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL || n < 0 || (n > 0 && !pids) || !mem_bytes)
        return -1;
    uint64_t total = 0;
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    for (int k = 0; k < n; k++) {
        int slot = sim_proc_slot_locked(s, pids[k], false);
        if (slot >= 0)
            for (int d = 0; d < SIM_MAX_DEVS; d++)
                total += s->proc[slot].mem[d];
    }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    *mem_bytes = total;
    return 0;
}

int vgpuSimProcessStats(int pid, uint64_t *busy_ns, uint64_t *mem_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    if (pid <= 0)
        pid = getpid();
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    int slot = sim_proc_slot_locked(s, pid, false);
    if (slot < 0) /* a dead process keeps its busy time */
        for (int i = 0; i < SIM_MAX_PROCS; i++)
            if (s->proc[i].pid == pid)
                slot = i;
    uint64_t busy = 0, mem = 0;
    if (slot >= 0)
        for (int d = 0; d < SIM_MAX_DEVS; d++) {
            busy += __atomic_load_n(&s->proc[slot].busy[d], __ATOMIC_RELAXED);
            mem += s->proc[slot].mem[d];
        }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    if (slot < 0)
        return -1;
    if (busy_ns)
        *busy_ns = busy;
    if (mem_bytes)
        *mem_bytes = mem;
    return 0;
}

int vgpuSimDeviceStats(int dev, uint64_t *busy_ns, uint64_t *used_bytes, uint64_t *total_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    int rc = -1;
    if (dev >= 0 && (uint32_t)dev < s->ndev) {
        if (busy_ns)
            *busy_ns = __atomic_load_n(&s->dev[dev].busy_total, __ATOMIC_RELAXED);
        if (used_bytes)
            *used_bytes = sim_mem_used(s, dev);
        if (total_bytes)
            *total_bytes = s->total_mem;
        rc = 0;
    }
    sim_shm_detach(s);
    return rc;
}

int vgpuSimReset(void)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    sim_lock(&s->table_mu);
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *p = &s->proc[i];
        for (int d = 0; d < SIM_MAX_DEVS; d++)
            __atomic_store_n(&p->busy[d], 0, __ATOMIC_RELAXED);
        memset(p->hist, 0, sizeof p->hist);
        memset(p->hist_pos, 0, sizeof p->hist_pos);
    }
    for (int d = 0; d < SIM_MAX_DEVS; d++) {
        __atomic_store_n(&s->dev[d].busy_total, 0, __ATOMIC_RELAXED);
        memset(s->dev[d].hist, 0, sizeof s->dev[d].hist);
        s->dev[d].hist_pos = 0;
    }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    return 0;
}
