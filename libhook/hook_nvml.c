/*
 * hook_nvml.c - NVML memory info inside a slice: nvidia-smi, pynvml and
 * frameworks that ask NVML see the slice's limit as the device's memory.
 *
 * NVML may be used by a process that never touches CUDA, so the device is
 * found by UUID (the daemon's key) and attached here if needed.
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
