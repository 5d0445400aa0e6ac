/*
 * reenter_driver - a CUDA driver that calls back into exported names, for
 * the hook's tests (VGPU_REAL_LIBCUDA points the hook at it). It depends on
 * the simulated libcuda.so.1, so every lookup in it finds the simulated
 * driver's functions, except these, which the way a layered driver can do
 * are built on other public entry points called by name: through the global
 * scope, where the preloaded hook comes first.
 *
 * The hook must account for each call once (its re-entry guard), never for
 * the inner call as well.
 */
#include "vgpu_cuda.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT CUresult cuMemAllocManaged(CUdeviceptr *dptr, size_t bytesize, unsigned int flags)
{
    (void)flags;
    return cuMemAlloc_v2(dptr, bytesize); /* the hook's, when preloaded */
}

EXPORT CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t bytesize, CUstream hStream)
{
    CUresult r = cuStreamSynchronize(hStream);
    return r != CUDA_SUCCESS ? r : cuMemAlloc_v2(dptr, bytesize);
}

EXPORT CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream hStream)
{
    CUresult r = cuStreamSynchronize(hStream);
    return r != CUDA_SUCCESS ? r : cuMemFree_v2(dptr);
}
