/*
 * sim_cuda.c - a CUDA driver stand-in for machines with no GPU: the
 * process's state, the handle registry, cuInit, devices and error names.
 *
 * Process-local state (handles, allocations, contexts with their worker
 * threads) lives in this library; everything several processes must agree on
 * (memory in use, the time-slice lock, busy time) lives in sim_shm.c.
 * sim_internal.h lists the units and what they share.
 */
#include "sim_internal.h"

/* ---- the open-addressing map (sim_internal.h has its lookup) ---- */
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

bool hmap_put(struct hmap *m, uintptr_t key, uintptr_t val)
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


void hmap_del(struct hmap *m, uintptr_t key)
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

/* ---- global state ---- */
/* ---- process state (declared in sim_internal.h) ---- */
pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
int g_init;
int g_forked;
struct sim_shm *g_s;
int g_ndev;
int g_phys[SIM_MAX_DEVS];
uint64_t g_overhead, g_kernel_ns, g_slice_ns;
struct hmap g_reg;
struct hmap g_allocs;
struct hmap g_maps;
uint64_t g_next_addr = 0x7f2000000000ull;
struct sim_primary g_primary[SIM_MAX_DEVS];
int g_nctx[SIM_MAX_DEVS];
CUmemoryPool g_default_pool[SIM_MAX_DEVS];

__thread CUcontext t_stack[64];
__thread int t_depth;

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

bool reg_add(void *p, int type)
{
    return hmap_put(&g_reg, (uintptr_t)p, (uintptr_t)type);
}

void reg_del(void *p)
{
    hmap_del(&g_reg, (uintptr_t)p);
}

uint64_t new_addr(uint64_t size, uint64_t align)
{
    if (align < 512)
        align = 512;
    g_next_addr = (g_next_addr + align - 1) & ~(align - 1);
    uint64_t base = g_next_addr;
    g_next_addr += ((size ? size : 1) + 511) & ~511ull;
    g_next_addr += 512; /* guard gap so neighbours never touch */
    return base;
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
    {CUDA_ERROR_STREAM_CAPTURE_IMPLICIT, "CUDA_ERROR_STREAM_CAPTURE_IMPLICIT",
     "operation would make the legacy stream depend on a capturing blocking stream"},
    {CUDA_ERROR_CAPTURED_EVENT, "CUDA_ERROR_CAPTURED_EVENT",
     "operation not permitted on an event last recorded in a capturing stream"},
    {CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD, "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
     "attempt to terminate a thread-local capture sequence from another thread"},
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

/* One CUDA_VISIBLE_DEVICES entry: an index below ndev, or "GPU-" and a
 * prefix of exactly one device's UUID. The physical index, or -1. */
static int visible_entry(const char *e, size_t len, int ndev)
{
    if (len == 0)
        return -1;
    if (len > 4 && !strncmp(e, "GPU-", 4)) {
        int found = -1;
        for (int d = 0; d < ndev; d++) {
            char u[64];
            sim_uuid_string(sim_shm_name(), d, u, sizeof u);
            if (len <= strlen(u) && !strncmp(u, e, len)) {
                if (found >= 0)
                    return -1; /* ambiguous */
                found = d;
            }
        }
        return found;
    }
    int v = 0;
    for (size_t i = 0; i < len; i++) {
        if (e[i] < '0' || e[i] > '9' || v > SIM_MAX_DEVS)
            return -1;
        v = v * 10 + (e[i] - '0');
    }
    return v < ndev ? v : -1;
}

/* The devices CUDA_VISIBLE_DEVICES leaves this process, in its order, as
 * the real driver reads it at cuInit: unset, all of them; otherwise the
 * entries (comma-separated, blanks around them ignored) up to the first
 * that names no device or one already listed. "" (or "-1") leaves none. */
static int visible_devices(int ndev, int out[SIM_MAX_DEVS])
{
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    if (cvd == NULL) {
        for (int d = 0; d < ndev; d++)
            out[d] = d;
        return ndev;
    }
    int n = 0;
    for (const char *p = cvd; *p && n < ndev;) {
        while (*p == ' ' || *p == '\t')
            p++;
        size_t len = strcspn(p, ",");
        size_t l = len;
        while (l && (p[l - 1] == ' ' || p[l - 1] == '\t'))
            l--;
        int d = visible_entry(p, l, ndev);
        for (int k = 0; k < n && d >= 0; k++)
            if (out[k] == d)
                d = -1;
        if (d < 0)
            break;
        out[n++] = d;
        p += len;
        if (*p == ',')
            p++;
    }
    return n;
}

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
        } else if ((g_ndev = visible_devices((int)g_s->ndev, g_phys)) == 0) {
            r = CUDA_ERROR_NO_DEVICE; /* CUDA_VISIBLE_DEVICES hides every device */
        } else {
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
    sim_uuid_bytes(sim_shm_name(), phys(dev), (unsigned char *)uuid->bytes);
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
