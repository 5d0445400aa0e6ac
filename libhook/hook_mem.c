/*
 * hook_mem.c - every allocation path: reserve with the daemon first, call the
 * driver, give the reservation back if the driver fails, remember
 * handle -> (bytes, device) so the matching free releases exactly that.
 *
 * Reserving before allocating makes admission exact under concurrency: the
 * daemon is the single writer of every slice's usage, so no interleaving of
 * processes can push a slice past its max (check-then-allocate cannot race).
 */
#include <stdlib.h>

#include "hook_internal.h"

enum { K_PTR = 1, K_ARRAY, K_MIPMAP, K_VMM };

struct alloc {
    struct alloc *next;
    uint64_t key;
    int kind;
    int hidx;
    uint64_t bytes;
};

#define NBUCKET 4096
static struct alloc *buckets[NBUCKET];
static pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER;

static unsigned bucket_of(int kind, uint64_t key)
{
    uint64_t h = (key ^ ((uint64_t)kind << 56)) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 52) & (NBUCKET - 1);
}

static bool table_put(int kind, uint64_t key, int hidx, uint64_t bytes)
{
    struct alloc *a = malloc(sizeof *a);
    if (!a) {
        vgpu_warn_once(VGPU_W_TABLE, "vgpu: out of host memory for the allocation table");
        return false;
    }
    a->key = key;
    a->kind = kind;
    a->hidx = hidx;
    a->bytes = bytes;
    unsigned b = bucket_of(kind, key);
    pthread_mutex_lock(&tmu);
    a->next = buckets[b];
    buckets[b] = a;
    pthread_mutex_unlock(&tmu);
    return true;
}

static bool table_take(int kind, uint64_t key, int *hidx, uint64_t *bytes)
{
    unsigned b = bucket_of(kind, key);
    bool found = false;
    pthread_mutex_lock(&tmu);
    for (struct alloc **pp = &buckets[b]; *pp; pp = &(*pp)->next) {
        struct alloc *a = *pp;
        if (a->kind == kind && a->key == key) {
            *pp = a->next;
            *hidx = a->hidx;
            *bytes = a->bytes;
            free(a);
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&tmu);
    return found;
}

void vgpu_mem_atfork_child(void)
{
    /* The parent's allocations are not the child's: forget them (the nodes
     * leak, by design: another parent thread may have held tmu). */
    pthread_mutex_init(&tmu, NULL);
    for (int i = 0; i < NBUCKET; i++)
        buckets[i] = NULL;
}

/* ---- the reserve / commit / rollback steps ---- */

struct resv {
    int hidx;       /* -1: not accounted (not registered, unknown device) */
    uint64_t n;
};

/* mode: the entry point's mode_ (nothing is accounted unless REGISTERED:
 * not registered, or re-entered from the driver). */
static CUresult reserve(int mode, int hidx, uint64_t n, struct resv *rv)
{
    rv->hidx = -1;
    rv->n = 0;
    if (mode != VGPU_MODE_REGISTERED || hidx < 0)
        return CUDA_SUCCESS;
    int slot = vgpu_hdev_attach(hidx);
    if (slot == -1)
        return CUDA_ERROR_INVALID_DEVICE;
    if (slot == -3)
        return CUDA_ERROR_OUT_OF_MEMORY;
    rv->hidx = hidx;
    if (n == 0)
        return CUDA_SUCCESS;
    int r = vgpu_client_reserve(hidx, n);
    if (r != VGPU_R_OK) {
        rv->hidx = -1;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    rv->n = n;
    return CUDA_SUCCESS;
}

static void rollback(struct resv *rv)
{
    if (rv->hidx >= 0 && rv->n)
        vgpu_client_release(rv->hidx, rv->n);
    rv->hidx = -1;
    rv->n = 0;
}

static void commit(struct resv *rv, int kind, uint64_t key)
{
    if (rv->hidx < 0)
        return;
    if (!table_put(kind, key, rv->hidx, rv->n)) {
        /* Cannot remember it: keep the reservation (it is really allocated)
         * and let the connection close give it back. */
        return;
    }
    atomic_fetch_add(&vgpu_hdevs[rv->hidx].held, rv->n);
    int slot = atomic_load(&vgpu_hdevs[rv->hidx].slot);
    VGPU_STAT_ADD(slot, allocs, 1);
}

static void forget(int kind, uint64_t key)
{
    int hidx;
    uint64_t n;
    if (!table_take(kind, key, &hidx, &n))
        return;
    int slot = atomic_load(&vgpu_hdevs[hidx].slot);
    VGPU_STAT_ADD(slot, frees, 1);
    vgpu_client_free(hidx, n);
}

static int cur_hdev(int mode)
{
    return mode == VGPU_MODE_REGISTERED ? vgpu_current_hdev() : -1;
}

/* ---- linear allocations ---- */

VGPU_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    ENTER(cuMemAlloc_v2);
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), bytesize, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAlloc_v2(dptr, bytesize));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_PTR, *dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    ENTER(cuMemAllocManaged);
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), bytesize, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAllocManaged(dptr, bytesize, flags));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_PTR, *dptr);
    return r;
}

/* The driver picks the pitch; reserve a likely value first, then settle the
 * difference once the real pitch is known. */
#define PITCH_ALIGN 512u

VGPU_EXPORT CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pPitch, size_t WidthInBytes, size_t Height,
                                        unsigned int ElementSizeBytes)
{
    ENTER(cuMemAllocPitch_v2);
    uint64_t pitch = ((uint64_t)WidthInBytes + PITCH_ALIGN - 1) / PITCH_ALIGN * PITCH_ALIGN, est;
    if (pitch < WidthInBytes || __builtin_mul_overflow(pitch, (uint64_t)Height, &est))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), est, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAllocPitch_v2(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes));
    if (r != CUDA_SUCCESS) {
        rollback(&rv);
        return r;
    }
    uint64_t actual;
    if (rv.hidx >= 0 && pPitch && !__builtin_mul_overflow((uint64_t)*pPitch, (uint64_t)Height, &actual)) {
        if (actual > rv.n) {
            if (vgpu_client_reserve(rv.hidx, actual - rv.n) != VGPU_R_OK) {
                if (real_cuMemFree_v2)
                    (void)VGPU_DRIVER(real_cuMemFree_v2(*dptr));
                rollback(&rv);
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            rv.n = actual;
        } else if (actual < rv.n) {
            vgpu_client_release(rv.hidx, rv.n - actual);
            rv.n = actual;
        }
    }
    commit(&rv, K_PTR, *dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    ENTER(cuMemFree_v2);
    CUresult r = VGPU_DRIVER(real_cuMemFree_v2(dptr));
    if (r == CUDA_SUCCESS && dptr)
        forget(K_PTR, dptr);
    return r;
}

/* ---- arrays ---- */

static uint64_t elem_bytes(CUarray_format f, unsigned channels)
{
    uint64_t b;
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: b = 1; break;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: b = 2; break;
    case CU_AD_FORMAT_UNSIGNED_INT32:
    case CU_AD_FORMAT_SIGNED_INT32:
    case CU_AD_FORMAT_FLOAT: b = 4; break;
    default: b = 4; break; /* unknown formats: assume the common width */
    }
    return b * (channels ? channels : 1);
}

/* Bytes of a w x h x d array of elem-byte elements; false on overflow. */
static bool array_bytes(uint64_t w, uint64_t h, uint64_t d, uint64_t elem, uint64_t *out)
{
    uint64_t v = elem;
    if (__builtin_mul_overflow(v, w ? w : 1, &v) || __builtin_mul_overflow(v, h ? h : 1, &v) ||
        __builtin_mul_overflow(v, d ? d : 1, &v))
        return false;
    *out = v;
    return true;
}

VGPU_EXPORT CUresult cuArrayCreate_v2(CUarray *pHandle, const CUDA_ARRAY_DESCRIPTOR *desc)
{
    ENTER(cuArrayCreate_v2);
    uint64_t n = 0;
    if (desc && !array_bytes(desc->Width, desc->Height, 1, elem_bytes(desc->Format, desc->NumChannels), &n))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuArrayCreate_v2(pHandle, desc));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_ARRAY, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *desc)
{
    ENTER(cuArray3DCreate_v2);
    uint64_t n = 0;
    if (desc && !array_bytes(desc->Width, desc->Height, desc->Depth,
                             elem_bytes(desc->Format, desc->NumChannels), &n))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuArray3DCreate_v2(pHandle, desc));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_ARRAY, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuArrayDestroy(CUarray hArray)
{
    ENTER(cuArrayDestroy);
    CUresult r = VGPU_DRIVER(real_cuArrayDestroy(hArray));
    if (r == CUDA_SUCCESS)
        forget(K_ARRAY, (uint64_t)(uintptr_t)hArray);
    return r;
}

VGPU_EXPORT CUresult cuMipmappedArrayCreate(CUmipmappedArray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *desc,
                                            unsigned int levels)
{
    ENTER(cuMipmappedArrayCreate);
    uint64_t n = 0;
    if (desc) {
        uint64_t w = desc->Width, h = desc->Height, d = desc->Depth;
        uint64_t e = elem_bytes(desc->Format, desc->NumChannels);
        for (unsigned l = 0; l < (levels ? levels : 1); l++) {
            uint64_t b;
            if (!array_bytes(w, h, d, e, &b) || __builtin_add_overflow(n, b, &n))
                return CUDA_ERROR_OUT_OF_MEMORY;
            w = w > 1 ? w / 2 : w;
            h = h > 1 ? h / 2 : h;
            d = d > 1 ? d / 2 : d;
        }
    }
    struct resv rv;
    CUresult r = reserve(mode_, cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMipmappedArrayCreate(pHandle, desc, levels));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_MIPMAP, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray h)
{
    ENTER(cuMipmappedArrayDestroy);
    CUresult r = VGPU_DRIVER(real_cuMipmappedArrayDestroy(h));
    if (r == CUDA_SUCCESS)
        forget(K_MIPMAP, (uint64_t)(uintptr_t)h);
    return r;
}

/* ---- virtual memory management ---- */

VGPU_EXPORT CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const CUmemAllocationProp *prop,
                                 unsigned long long flags)
{
    ENTER(cuMemCreate);
    int hidx = -1;
    if (mode_ == VGPU_MODE_REGISTERED) {
        if (prop && prop->location.type == CU_MEM_LOCATION_TYPE_DEVICE)
            hidx = vgpu_hdev_of_cudev(prop->location.id);
        else if (!prop || prop->location.type != CU_MEM_LOCATION_TYPE_HOST)
            hidx = vgpu_current_hdev();
    }
    struct resv rv;
    CUresult r = reserve(mode_, hidx, size, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemCreate(handle, size, prop, flags));
    if (r != CUDA_SUCCESS)
        rollback(&rv);
    else
        commit(&rv, K_VMM, *handle);
    return r;
}

VGPU_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    ENTER(cuMemRelease);
    CUresult r = VGPU_DRIVER(real_cuMemRelease(handle));
    if (r == CUDA_SUCCESS)
        forget(K_VMM, handle);
    return r;
}

/* ---- stream-ordered allocations ---- */

#define ASYNC_ALLOC(name, call)                                                            \
    {                                                                                      \
        ENTER(name);                                                                       \
        struct resv rv;                                                                    \
        CUresult r = reserve(mode_, cur_hdev(mode_), bytesize, &rv);                       \
        if (r != CUDA_SUCCESS)                                                             \
            return r;                                                                      \
        r = VGPU_DRIVER(call);                                                             \
        if (r != CUDA_SUCCESS)                                                             \
            rollback(&rv);                                                                 \
        else                                                                               \
            commit(&rv, K_PTR, *dptr);                                                     \
        return r;                                                                          \
    }

VGPU_EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
    ASYNC_ALLOC(cuMemAllocAsync, real_cuMemAllocAsync(dptr, bytesize, hStream))

VGPU_EXPORT CUresult cuMemAllocAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
    ASYNC_ALLOC(cuMemAllocAsync_ptsz, real_cuMemAllocAsync_ptsz(dptr, bytesize, hStream))

VGPU_EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                             CUstream hStream)
    ASYNC_ALLOC(cuMemAllocFromPoolAsync, real_cuMemAllocFromPoolAsync(dptr, bytesize, pool, hStream))

VGPU_EXPORT CUresult cuMemAllocFromPoolAsync_ptsz(CUdeviceptr *dptr, size_t bytesize, CUmemoryPool pool,
                                                  CUstream hStream)
    ASYNC_ALLOC(cuMemAllocFromPoolAsync_ptsz,
                real_cuMemAllocFromPoolAsync_ptsz(dptr, bytesize, pool, hStream))

VGPU_EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    ENTER(cuMemFreeAsync);
    CUresult r = VGPU_DRIVER(real_cuMemFreeAsync(dptr, hStream));
    if (r == CUDA_SUCCESS && dptr)
        forget(K_PTR, dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    ENTER(cuMemFreeAsync_ptsz);
    CUresult r = VGPU_DRIVER(real_cuMemFreeAsync_ptsz(dptr, hStream));
    if (r == CUDA_SUCCESS && dptr)
        forget(K_PTR, dptr);
    return r;
}
