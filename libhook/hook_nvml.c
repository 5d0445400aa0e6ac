/*
 * hook_nvml.c - NVML inside a slice: nvidia-smi, pynvml and frameworks that
 * ask NVML see the slice's limit as the device's memory and, where
 * gpu.devices restricts the slice, only its devices, numbered from 0 in the
 * node's order as CUDA numbers them (hook_view.c).
 *
 * NVML may be used by a process that never touches CUDA, so the device is
 * found by UUID (the daemon's key) and attached here if needed. Handles
 * stay the driver's own: a restricted view hands out the handles of its
 * devices, found by UUID.
 */
#include <string.h>

#include "hook_interpose.h"

static int nvml_hdev(nvmlDevice_t device, uint64_t total)
{
    if (!real_nvmlDeviceGetUUID)
        return -1;
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    if (VGPU_DRIVER(real_nvmlDeviceGetUUID(device, uuid, sizeof uuid)) != NVML_SUCCESS)
        return -1;
    return vgpu_hdev_of_uuid(uuid, total);
}

/* Registration happens through the CUDA side (it owns the real-driver
 * resolution); NVML without a reachable daemon is reported unclamped, and so
 * is a call the drivers make back into us (the re-entry guard). */
static bool registered(void)
{
    return vgpu_enter() == VGPU_MODE_REGISTERED;
}

/* The slice's view of a device's memory: total and free clamped to its
 * limit. False (nothing changed) when we are not registered or do not know
 * the device. */
static bool clamp(nvmlDevice_t device, unsigned long long *total, unsigned long long *free)
{
    if (!registered())
        return false;
    int h = nvml_hdev(device, *total);
    if (h < 0)
        return false;
    uint64_t f = *free, t = *total;
    vgpu_clamp_mem(h, &f, &t);
    *total = t;
    *free = f;
    return true;
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetMemoryInfo)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    nvmlReturn_t r = VGPU_DRIVER(real_nvmlDeviceGetMemoryInfo(device, memory));
    if (r == NVML_SUCCESS && memory && clamp(device, &memory->total, &memory->free))
        memory->used = memory->total - memory->free;
    return r;
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetMemoryInfo_v2)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    nvmlReturn_t r = VGPU_DRIVER(real_nvmlDeviceGetMemoryInfo_v2(device, memory));
    if (r != NVML_SUCCESS || !memory || !clamp(device, &memory->total, &memory->free))
        return r;
    /* used excludes the driver's reserved part, as NVML reports it */
    uint64_t t = memory->total, f = memory->free;
    memory->used = t - f > memory->reserved ? t - f - memory->reserved : 0;
    return r;
}

/* ---- the device list of a restricted slice ---- */

/* The view to answer from: NULL (ask the driver as it is) when the slice is
 * not restricted, NVML or the hook is not usable, or the driver called us. */
static const struct vgpu_view *nvml_view(void)
{
    return registered() ? vgpu_view() : NULL;
}

static nvmlReturn_t view_count(const struct vgpu_view *v, nvmlReturn_t (*real)(unsigned int *),
                               unsigned int *count)
{
    unsigned int all;
    nvmlReturn_t r = VGPU_DRIVER(real(&all)); /* NVML's own errors: not initialised... */
    if (r == NVML_SUCCESS) {
        if (!count)
            return NVML_ERROR_INVALID_ARGUMENT;
        *count = (unsigned int)v->n;
    }
    return r;
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetCount_v2)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    const struct vgpu_view *v = nvml_view();
    if (!v)
        return VGPU_DRIVER(real_nvmlDeviceGetCount_v2(count));
    return view_count(v, real_nvmlDeviceGetCount_v2, count);
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetCount)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    const struct vgpu_view *v = nvml_view();
    if (!v)
        return VGPU_DRIVER(real_nvmlDeviceGetCount(count));
    return view_count(v, real_nvmlDeviceGetCount, count);
}

static nvmlReturn_t view_handle(const struct vgpu_view *v, unsigned int index, nvmlDevice_t *device)
{
    if (!real_nvmlDeviceGetHandleByUUID)
        return NVML_ERROR_FUNCTION_NOT_FOUND;
    if (index >= (unsigned int)v->n) {
        unsigned int all; /* NVML's own error first: not initialised... */
        nvmlReturn_t r = real_nvmlDeviceGetCount_v2 ? VGPU_DRIVER(real_nvmlDeviceGetCount_v2(&all))
                         : real_nvmlDeviceGetCount  ? VGPU_DRIVER(real_nvmlDeviceGetCount(&all))
                                                    : NVML_SUCCESS;
        return r != NVML_SUCCESS ? r : NVML_ERROR_INVALID_ARGUMENT;
    }
    return VGPU_DRIVER(real_nvmlDeviceGetHandleByUUID(v->uuid[index], device));
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetHandleByIndex_v2)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    const struct vgpu_view *v = nvml_view();
    if (!v)
        return VGPU_DRIVER(real_nvmlDeviceGetHandleByIndex_v2(index, device));
    return view_handle(v, index, device);
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetHandleByIndex)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    const struct vgpu_view *v = nvml_view();
    if (!v)
        return VGPU_DRIVER(real_nvmlDeviceGetHandleByIndex(index, device));
    return view_handle(v, index, device);
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetHandleByUUID)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    nvmlReturn_t r = VGPU_DRIVER(real_nvmlDeviceGetHandleByUUID(uuid, device));
    const struct vgpu_view *v = nvml_view();
    if (r == NVML_SUCCESS && v && vgpu_view_index(v, uuid) < 0)
        return NVML_ERROR_NOT_FOUND; /* a GPU of the node, not of the slice */
    return r;
}

VGPU_EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    if (!vgpu_resolve_nvml() || !real_nvmlDeviceGetIndex)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    nvmlReturn_t r = VGPU_DRIVER(real_nvmlDeviceGetIndex(device, index));
    const struct vgpu_view *v = nvml_view();
    if (r != NVML_SUCCESS || !v || !real_nvmlDeviceGetUUID)
        return r;
    char uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    r = VGPU_DRIVER(real_nvmlDeviceGetUUID(device, uuid, sizeof uuid));
    if (r != NVML_SUCCESS)
        return r;
    int k = vgpu_view_index(v, uuid);
    if (k < 0)
        return NVML_ERROR_INVALID_ARGUMENT; /* not a device of this slice */
    *index = (unsigned int)k;
    return NVML_SUCCESS;
}
