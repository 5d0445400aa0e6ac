/*
 * sim_nvml.c - an NVML stand-in that reads the simulated device's shm.
 *
 * Enough of NVML for pynvml and monitoring tools: device identity, memory in
 * use (summed over live processes), running processes, and utilization
 * computed from the busy-time snapshots the simulated driver's workers write.
 * nvmlInit maps the shm named by VGPU_SIM_SHM at that moment, so a process
 * can shut NVML down and re-initialise it against another simulated device.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "sim_shm.h"

#pragma GCC visibility push(default)
#include "vgpu_nvml.h"
#pragma GCC visibility pop

#define DRIVER_VERSION_STR "580.95.05"
#define NVML_VERSION_STR "13.580.95.05"
#define CUDA_DRIVER_VERSION 13000
#define NOT_AVAILABLE 0xffffffffu
#define UTIL_WINDOW_NS 1000000000ull

struct nvmlDevice_st {
    unsigned index;
};

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_refs;
static struct sim_shm *g_s;
static char g_name[256];
static struct nvmlDevice_st g_devs[SIM_MAX_DEVS];

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags; /* NO_GPUS / NO_ATTACH: nothing differs on the simulated device */
    nvmlReturn_t r = NVML_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_refs == 0) {
        const char *name = getenv("VGPU_SIM_SHM");
        snprintf(g_name, sizeof g_name, "%s", name && *name ? name : "vgpu-sim");
        g_s = sim_shm_open_named(g_name);
        if (g_s == NULL)
            r = NVML_ERROR_DRIVER_NOT_LOADED;
        for (unsigned i = 0; i < SIM_MAX_DEVS; i++)
            g_devs[i].index = i;
    }
    if (r == NVML_SUCCESS)
        g_refs++;
    pthread_mutex_unlock(&g_mu);
    return r;
}

nvmlReturn_t nvmlInit_v2(void)
{
    return nvmlInitWithFlags(0);
}

nvmlReturn_t nvmlShutdown(void)
{
    nvmlReturn_t r = NVML_SUCCESS;
    pthread_mutex_lock(&g_mu);
    if (g_refs == 0) {
        r = NVML_ERROR_UNINITIALIZED;
    } else if (--g_refs == 0) {
        sim_shm_detach(g_s);
        g_s = NULL;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument Version Mismatch";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_str(char *dst, unsigned int len, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

static struct sim_shm *shm(void)
{
    return __atomic_load_n(&g_s, __ATOMIC_ACQUIRE);
}

/* The device index, or -1 for a bad handle. */
static int dev_of(nvmlDevice_t d)
{
    struct sim_shm *s = shm();
    if (s == NULL || d == NULL || d < &g_devs[0] || d >= &g_devs[SIM_MAX_DEVS] || d->index >= s->ndev)
        return -1;
    return (int)d->index;
}

#define CHECK_INIT()                       \
    do {                                   \
        if (shm() == NULL)                 \
            return NVML_ERROR_UNINITIALIZED; \
    } while (0)

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    CHECK_INIT();
    return copy_str(version, length, DRIVER_VERSION_STR);
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    return copy_str(version, length, NVML_VERSION_STR);
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *cudaDriverVersion)
{
    if (cudaDriverVersion == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *cudaDriverVersion = CUDA_DRIVER_VERSION;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *cudaDriverVersion)
{
    return nvmlSystemGetCudaDriverVersion(cudaDriverVersion);
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *deviceCount)
{
    CHECK_INIT();
    if (deviceCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *deviceCount = shm()->ndev;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    CHECK_INIT();
    if (device == NULL || index >= shm()->ndev)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &g_devs[index];
    return NVML_SUCCESS;
}

/* NVML's first versions, still exported: the same on the simulated device. */
nvmlReturn_t nvmlDeviceGetCount(unsigned int *deviceCount)
{
    return nvmlDeviceGetCount_v2(deviceCount);
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device)
{
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    CHECK_INIT();
    if (uuid == NULL || device == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (unsigned i = 0; i < shm()->ndev; i++) {
        char buf[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
        sim_uuid_string(g_name, (int)i, buf, sizeof buf);
        if (strcmp(buf, uuid) == 0) {
            *device = &g_devs[i];
            return NVML_SUCCESS;
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *index)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0 || index == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    *index = (unsigned)d;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    CHECK_INIT();
    if (dev_of(device) < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    return copy_str(name, length, SIM_DEVICE_NAME);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    char buf[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    sim_uuid_string(g_name, d, buf, sizeof buf);
    return copy_str(uuid, length, buf);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0 || memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sim_shm *s = shm();
    uint64_t used = sim_mem_used(s, d);
    memory->total = s->total_mem;
    memory->used = used;
    memory->free = used >= s->total_mem ? 0 : s->total_mem - used;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory)
{
    CHECK_INIT();
    if (memory == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    nvmlMemory_t m;
    nvmlReturn_t r = nvmlDeviceGetMemoryInfo(device, &m);
    if (r == NVML_SUCCESS) {
        memory->total = m.total;
        memory->reserved = 0;
        memory->free = m.free;
        memory->used = m.used;
    }
    return r;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device, unsigned int *infoCount,
                                                     nvmlProcessInfo_t *infos)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0 || infoCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sim_shm *s = shm();
    nvmlProcessInfo_t found[SIM_MAX_PROCS];
    unsigned n = 0;
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    for (int i = 0; i < SIM_MAX_PROCS; i++)
        if (s->proc[i].alive && s->proc[i].mem[d] > 0)
            found[n++] = (nvmlProcessInfo_t){.pid = (unsigned)s->proc[i].pid,
                                             .usedGpuMemory = s->proc[i].mem[d],
                                             .gpuInstanceId = NOT_AVAILABLE,
                                             .computeInstanceId = NOT_AVAILABLE};
    sim_unlock(&s->table_mu);
    if (n == 0) {
        *infoCount = 0;
        return NVML_SUCCESS;
    }
    if (infos == NULL || *infoCount < n) {
        *infoCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(infos, found, n * sizeof *infos);
    *infoCount = n;
    return NVML_SUCCESS;
}

/*
 * Busy share since `since` (CLOCK_REALTIME ns) from a snapshot history:
 * the reference is the newest snapshot at or before `since`, else the oldest
 * one kept. Returns false when there was no activity after the reference.
 */
static bool util_since(const struct sim_snap *hist, unsigned pos, uint64_t busy_now, uint64_t now, uint64_t since,
                       unsigned *pct)
{
    const struct sim_snap *ref = NULL, *oldest = NULL;
    for (unsigned k = 0; k < SIM_HIST; k++) {
        const struct sim_snap *sn = &hist[(pos + k) % SIM_HIST]; /* oldest first */
        if (sn->t_ns == 0)
            continue;
        if (oldest == NULL)
            oldest = sn;
        if (sn->t_ns <= since)
            ref = sn;
    }
    if (ref == NULL)
        ref = oldest;
    if (ref == NULL || busy_now <= ref->busy_ns || now <= ref->t_ns)
        return false;
    uint64_t p = (busy_now - ref->busy_ns) * 100 / (now - ref->t_ns);
    *pct = p > 100 ? 100 : (unsigned)p;
    return true;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t device, nvmlProcessUtilizationSample_t *utilization,
                                             unsigned int *processSamplesCount,
                                             unsigned long long lastSeenTimeStamp)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0 || processSamplesCount == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sim_shm *s = shm();
    uint64_t now = sim_realtime_ns();
    uint64_t since = lastSeenTimeStamp ? lastSeenTimeStamp * 1000ull : now - UTIL_WINDOW_NS;
    nvmlProcessUtilizationSample_t found[SIM_MAX_PROCS];
    unsigned n = 0;
    sim_lock(&s->table_mu);
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *p = &s->proc[i];
        unsigned pct;
        if (p->pid == 0)
            continue;
        uint64_t busy = __atomic_load_n(&p->busy[d], __ATOMIC_RELAXED);
        if (util_since(p->hist[d], p->hist_pos[d], busy, now, since, &pct))
            found[n++] = (nvmlProcessUtilizationSample_t){
                .pid = (unsigned)p->pid, .timeStamp = now / 1000, .smUtil = pct};
    }
    sim_unlock(&s->table_mu);
    if (n == 0)
        return NVML_ERROR_NOT_FOUND;
    if (utilization == NULL || *processSamplesCount < n) {
        *processSamplesCount = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(utilization, found, n * sizeof *utilization);
    *processSamplesCount = n;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *utilization)
{
    CHECK_INIT();
    int d = dev_of(device);
    if (d < 0 || utilization == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    struct sim_shm *s = shm();
    uint64_t now = sim_realtime_ns();
    unsigned pct = 0;
    sim_lock(&s->table_mu);
    uint64_t busy = __atomic_load_n(&s->dev[d].busy_total, __ATOMIC_RELAXED);
    if (!util_since(s->dev[d].hist, s->dev[d].hist_pos, busy, now, now - UTIL_WINDOW_NS, &pct))
        pct = 0;
    sim_unlock(&s->table_mu);
    utilization->gpu = pct;
    utilization->memory = 0;
    return NVML_SUCCESS;
}
