/*
 * hook_alloc.c - the allocation entry points: linear, pitch and managed
 * memory, arrays and mipmapped arrays, virtual memory (cuMemCreate), and the
 * stream-ordered allocator, each with its free. Each reserves before the
 * driver allocates and releases after it frees (hook_mem.c); how many bytes
 * an array or a pitch takes is estimated here from its shape.
 */
#include <stdlib.h>

#include "hook_interpose.h"

/* ---- linear allocations ---- */

VGPU_EXPORT CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t bytesize)
{
    ENTER(cuMemAlloc_v2);
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), bytesize, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAlloc_v2(dptr, bytesize));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_PTR, *dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    ENTER(cuMemAllocManaged);
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), bytesize, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAllocManaged(dptr, bytesize, flags));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_PTR, *dptr);
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
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), est, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemAllocPitch_v2(dptr, pPitch, WidthInBytes, Height, ElementSizeBytes));
    if (r != CUDA_SUCCESS) {
        vgpu_mem_rollback(&rv);
        return r;
    }
    uint64_t actual;
    if (rv.hidx >= 0 && pPitch && !__builtin_mul_overflow((uint64_t)*pPitch, (uint64_t)Height, &actual)) {
        if (actual > rv.n) {
            if (vgpu_client_reserve(rv.hidx, actual - rv.n) != VGPU_R_OK) {
                if (real_cuMemFree_v2)
                    (void)VGPU_DRIVER(real_cuMemFree_v2(*dptr));
                vgpu_mem_rollback(&rv);
                return CUDA_ERROR_OUT_OF_MEMORY;
            }
            rv.n = actual;
        } else if (actual < rv.n) {
            vgpu_client_release(rv.hidx, rv.n - actual);
            rv.n = actual;
        }
    }
    vgpu_mem_commit(&rv, VGPU_K_PTR, *dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemFree_v2(CUdeviceptr dptr)
{
    ENTER(cuMemFree_v2);
    CUresult r = VGPU_DRIVER(real_cuMemFree_v2(dptr));
    if (r == CUDA_SUCCESS && dptr)
        vgpu_mem_forget(VGPU_K_PTR, dptr);
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
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuArrayCreate_v2(pHandle, desc));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_ARRAY, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuArray3DCreate_v2(CUarray *pHandle, const CUDA_ARRAY3D_DESCRIPTOR *desc)
{
    ENTER(cuArray3DCreate_v2);
    uint64_t n = 0;
    if (desc && !array_bytes(desc->Width, desc->Height, desc->Depth,
                             elem_bytes(desc->Format, desc->NumChannels), &n))
        return CUDA_ERROR_OUT_OF_MEMORY;
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuArray3DCreate_v2(pHandle, desc));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_ARRAY, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuArrayDestroy(CUarray hArray)
{
    ENTER(cuArrayDestroy);
    CUresult r = VGPU_DRIVER(real_cuArrayDestroy(hArray));
    if (r == CUDA_SUCCESS)
        vgpu_mem_forget(VGPU_K_ARRAY, (uint64_t)(uintptr_t)hArray);
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
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), n, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMipmappedArrayCreate(pHandle, desc, levels));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_MIPMAP, (uint64_t)(uintptr_t)*pHandle);
    return r;
}

VGPU_EXPORT CUresult cuMipmappedArrayDestroy(CUmipmappedArray h)
{
    ENTER(cuMipmappedArrayDestroy);
    CUresult r = VGPU_DRIVER(real_cuMipmappedArrayDestroy(h));
    if (r == CUDA_SUCCESS)
        vgpu_mem_forget(VGPU_K_MIPMAP, (uint64_t)(uintptr_t)h);
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
    struct vgpu_resv rv;
    CUresult r = vgpu_mem_reserve(mode_, hidx, size, &rv);
    if (r != CUDA_SUCCESS)
        return r;
    r = VGPU_DRIVER(real_cuMemCreate(handle, size, prop, flags));
    if (r != CUDA_SUCCESS)
        vgpu_mem_rollback(&rv);
    else
        vgpu_mem_commit(&rv, VGPU_K_VMM, *handle);
    return r;
}

VGPU_EXPORT CUresult cuMemRelease(CUmemGenericAllocationHandle handle)
{
    ENTER(cuMemRelease);
    CUresult r = VGPU_DRIVER(real_cuMemRelease(handle));
    if (r == CUDA_SUCCESS)
        vgpu_mem_forget(VGPU_K_VMM, handle);
    return r;
}

/* ---- stream-ordered allocations ---- */

#define ASYNC_ALLOC(name, call)                                                            \
    {                                                                                      \
        ENTER(name);                                                                       \
        struct vgpu_resv rv;                                                               \
        CUresult r = vgpu_mem_reserve(mode_, vgpu_mem_cur_hdev(mode_), bytesize, &rv);     \
        if (r != CUDA_SUCCESS)                                                             \
            return r;                                                                      \
        r = VGPU_DRIVER(call);                                                             \
        if (r != CUDA_SUCCESS)                                                             \
            vgpu_mem_rollback(&rv);                                                        \
        else                                                                               \
            vgpu_mem_commit(&rv, VGPU_K_PTR, *dptr);                                       \
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
        vgpu_mem_forget(VGPU_K_PTR, dptr);
    return r;
}

VGPU_EXPORT CUresult cuMemFreeAsync_ptsz(CUdeviceptr dptr, CUstream hStream)
{
    ENTER(cuMemFreeAsync_ptsz);
    CUresult r = VGPU_DRIVER(real_cuMemFreeAsync_ptsz(dptr, hStream));
    if (r == CUDA_SUCCESS && dptr)
        vgpu_mem_forget(VGPU_K_PTR, dptr);
    return r;
}
