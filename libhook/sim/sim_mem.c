/*
 * sim_mem.c - device memory: linear allocations, pitch, managed, arrays and
 * mipmapped arrays, virtual memory management (cuMemCreate/Map), memory pools
 * and the stream-ordered allocator, copies and memsets. Every byte is
 * charged to the shared device (sim_shm.c), so NVML and other processes see it.
 */
#include "sim_internal.h"

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
    sim_mem_uncharge(g_s, phys(p->dev), rel);
    p->cached -= rel;
}

static CUresult pool_take(CUmemoryPool p, uint64_t n)
{
    if (p->cached >= n) {
        p->cached -= n;
    } else if (sim_mem_charge(g_s, phys(p->dev), n) != 0) {
        pool_trim(p, p->used); /* give back what is cached, then retry */
        if (sim_mem_charge(g_s, phys(p->dev), n) != 0)
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
void pools_sync_trim(int dev)
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
void alloc_free_locked(struct alloc *a)
{
    hmap_del(&g_allocs, (uintptr_t)a->base);
    if (a->kind == A_POOL) {
        if (reg_is(a->pool, T_POOL)) {
            CUmemoryPool p = a->pool;
            p->used -= a->size <= p->used ? a->size : p->used;
            p->cached += a->size;
        }
    } else if (a->charged) {
        sim_mem_uncharge(g_s, phys(a->dev), a->charged);
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
    } else if (charge && sim_mem_charge(g_s, phys(a->dev), charge) != 0) {
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

/* ---- memory ---- */
CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    CHECK_INIT();
    if (dptr == NULL || bytesize == 0)
        return CUDA_ERROR_INVALID_VALUE;
    WITH_CTX(c);
    CUresult r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS)
        r = alloc_new_locked(c, bytesize, bytesize, A_PLAIN, NULL, dptr);
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
    CUresult r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS)
        r = alloc_new_locked(c, pitch * Height, pitch * Height, A_PLAIN, NULL, dptr);
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
    CUresult r = capture_unsafe_locked();
    if (r == CUDA_SUCCESS)
        r = alloc_new_locked(c, bytesize, bytesize, A_PLAIN, NULL, dptr);
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
    CUresult r = capture_unsafe_locked();
    if (r != CUDA_SUCCESS)
        a = NULL;
    else
        r = CUDA_ERROR_INVALID_VALUE;
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
    uint64_t used = sim_mem_used(g_s, phys(dev));
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
    CUresult r = capture_unsafe_locked(); /* synchronous: the caller waits for the copy */
    if (r != CUDA_SUCCESS)
        a = NULL;
    else if (!a)
        r = CUDA_ERROR_INVALID_VALUE;
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
    if (a != NULL && sim_mem_charge(g_s, phys(c->dev), bytes) == 0) {
        a->h.type = type;
        a->h.ctx = c;
        a->dev = c->dev;
        a->bytes = bytes;
        if (reg_add(a, type)) {
            *out = a;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, phys(c->dev), bytes);
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
        sim_mem_uncharge(g_s, phys(a->dev), a->bytes);
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
    if (sim_mem_charge(g_s, phys(dev), size) == 0) {
        if (reg_add(m, T_MEMHANDLE)) {
            *handle = (CUmemGenericAllocationHandle)(uintptr_t)m;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, phys(dev), size);
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
        sim_mem_uncharge(g_s, phys(m->dev), m->size); /* physical memory goes when released and unmapped */
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
