/*
 * hook_ctx.c - the entry points about devices and contexts: cuInit, making,
 * destroying and switching contexts, and what the program is told about its
 * memory (cuMemGetInfo, cuDeviceTotalMem: the slice's limit, clamped to the
 * device). A slice that gpu.devices restricts sees only its devices from
 * cuInit on (hook_view.c); a device the slice may not use fails at context
 * creation all the same, with nothing allocated (hook_dev.c attaches it
 * first).
 */
#include "hook_interpose.h"

VGPU_EXPORT CUresult cuInit(unsigned int Flags)
{
    ENTER(cuInit);
    if (mode_ != VGPU_MODE_REGISTERED)
        return VGPU_DRIVER(real_cuInit(Flags));
    return vgpu_view_cuinit(Flags); /* a slice's devices only (hook_view.c) */
}

/* Attach before the context exists: a device the slice may not use must
 * fail here, with nothing allocated. */
static CUresult admit_device(int mode, CUdevice dev, int *hidx)
{
    *hidx = -1;
    if (mode != VGPU_MODE_REGISTERED)
        return CUDA_SUCCESS;
    *hidx = vgpu_hdev_of_cudev(dev);
    if (*hidx < 0)
        return CUDA_SUCCESS; /* let the driver report the bad device */
    int slot = vgpu_hdev_attach(*hidx);
    if (slot == -1)
        return CUDA_ERROR_INVALID_DEVICE;
    if (slot == -3)
        return CUDA_ERROR_OUT_OF_MEMORY;
    return CUDA_SUCCESS;
}

VGPU_EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev)
{
    ENTER(cuDevicePrimaryCtxRetain);
    int hidx;
    CUresult a = admit_device(mode_, dev, &hidx);
    if (a != CUDA_SUCCESS)
        return a;
    CUresult r = VGPU_DRIVER(real_cuDevicePrimaryCtxRetain(pctx, dev));
    if (r == CUDA_SUCCESS && pctx)
        vgpu_ctxinfo_note(*pctx, hidx);
    return r;
}

VGPU_EXPORT CUresult cuCtxCreate_v2(CUcontext *pctx, unsigned int flags, CUdevice dev)
{
    ENTER(cuCtxCreate_v2);
    int hidx;
    CUresult a = admit_device(mode_, dev, &hidx);
    if (a != CUDA_SUCCESS)
        return a;
    CUresult r = VGPU_DRIVER(real_cuCtxCreate_v2(pctx, flags, dev));
    vgpu_launch_ctx_changed(); /* the new context is current now */
    if (r == CUDA_SUCCESS && pctx)
        vgpu_ctxinfo_note(*pctx, hidx);
    return r;
}

VGPU_EXPORT CUresult cuCtxCreate_v4(CUcontext *pctx, CUctxCreateParams *params, unsigned int flags, CUdevice dev)
{
    ENTER(cuCtxCreate_v4);
    int hidx;
    CUresult a = admit_device(mode_, dev, &hidx);
    if (a != CUDA_SUCCESS)
        return a;
    CUresult r = VGPU_DRIVER(real_cuCtxCreate_v4(pctx, params, flags, dev));
    vgpu_launch_ctx_changed(); /* the new context is current now */
    if (r == CUDA_SUCCESS && pctx)
        vgpu_ctxinfo_note(*pctx, hidx);
    return r;
}

VGPU_EXPORT CUresult cuCtxDestroy_v2(CUcontext ctx)
{
    ENTER(cuCtxDestroy_v2);
    struct vgpu_ctxinfo *ci = vgpu_ctxinfo_get(ctx, false);
    if (ci) {
        /* Our events and stream die with the context: stop using them first
         * (the accountant's driver calls, made from this thread). */
        vgpu_in_hook++;
        vgpu_account_forget_ctx(ctx);
        vgpu_capture_forget_ctx(ctx);
        vgpu_in_hook--;
        atomic_store(&ci->ctx, NULL);
    }
    vgpu_launch_ctx_changed();
    return VGPU_DRIVER(real_cuCtxDestroy_v2(ctx));
}

VGPU_EXPORT CUresult cuMemGetInfo_v2(size_t *free_b, size_t *total_b)
{
    ENTER(cuMemGetInfo_v2);
    CUresult r = VGPU_DRIVER(real_cuMemGetInfo_v2(free_b, total_b));
    if (r != CUDA_SUCCESS || mode_ != VGPU_MODE_REGISTERED || !free_b || !total_b)
        return r;
    int hidx = vgpu_current_hdev();
    if (hidx < 0)
        return r;
    uint64_t f = *free_b, t = *total_b;
    vgpu_clamp_mem(hidx, &f, &t);
    *free_b = (size_t)f;
    *total_b = (size_t)t;
    return r;
}

VGPU_EXPORT CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev)
{
    ENTER(cuDeviceTotalMem_v2);
    CUresult r = VGPU_DRIVER(real_cuDeviceTotalMem_v2(bytes, dev));
    if (r != CUDA_SUCCESS || mode_ != VGPU_MODE_REGISTERED || !bytes)
        return r;
    int hidx = vgpu_hdev_of_cudev(dev);
    if (hidx < 0)
        return r;
    uint64_t f = *bytes, t = *bytes;
    vgpu_clamp_mem(hidx, &f, &t);
    *bytes = (size_t)t;
    return r;
}

/* ---- context tracking: the driver's current context only changes through
 * these and cuCtxCreate/cuCtxDestroy above. ---- */

VGPU_EXPORT CUresult cuCtxSetCurrent(CUcontext ctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxSetCurrent)
        return VGPU_REFUSED_ERROR;
    vgpu_launch_ctx_changed();
    return real_cuCtxSetCurrent(ctx);
}

VGPU_EXPORT CUresult cuCtxPushCurrent_v2(CUcontext ctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxPushCurrent_v2)
        return VGPU_REFUSED_ERROR;
    vgpu_launch_ctx_changed();
    return real_cuCtxPushCurrent_v2(ctx);
}

VGPU_EXPORT CUresult cuCtxPopCurrent_v2(CUcontext *pctx)
{
    int m = vgpu_ensure();
    if (__builtin_expect(m == VGPU_MODE_BROKEN, 0) || !real_cuCtxPopCurrent_v2)
        return VGPU_REFUSED_ERROR;
    vgpu_launch_ctx_changed();
    return real_cuCtxPopCurrent_v2(pctx);
}

