/*
 * devices - what a CUDA program sees of the node's GPUs, and work on
 * several of them, for the multi-GPU tests on the simulated GPU.
 *
 *   devices [KEY=VALUE...]
 *
 *   ctx=0,1         ordinals to make a context on: for each, its primary
 *                   context is retained (and a second context created, then
 *                   destroyed, to see that creation is refused alike)
 *   alloc=BYTES     cuMemAlloc_v2 in each of those contexts
 *   kernels=N       N launches of sim_sleep_ns(kernel_ns) in each context,
 *                   each context from a thread of its own (so the devices
 *                   run side by side and a wait on one never holds up the
 *                   other), then a synchronize
 *   kernel_ns=1000000
 *   wait=1          read a line from stdin before making any context
 *   hold=1          after the JSON line, read a line from stdin before
 *                   freeing and exiting
 *
 * Env VGPU_TEST_UUIDS=uuid,uuid... (the node's GPUs, as NVML numbers them):
 * NVML is asked for a handle of each (nvml.by_uuid: the return codes).
 *
 * Prints one JSON line: cuInit's result; the device count and each
 * ordinal's UUID; cuDeviceGet of the ordinal past the last; the
 * CUDA_VISIBLE_DEVICES the program has after cuInit; NVML's count, each
 * index's UUID and what nvmlDeviceGetIndex says of it; per context asked
 * for, the results of retain, create, alloc and cuMemGetInfo, and of the
 * launches (the first error, and the seconds from the first launch to the
 * end of the synchronize); and per
 * physical device the simulated device's own busy time and memory of this
 * process (vgpuSimProcessDeviceStats).
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vgpu_cuda.h"
#include "vgpu_nvml.h"
#include "../../libhook/sim/vgpu_sim.h"

#define MAXD 8

static const char *arg(int argc, char **argv, const char *key, const char *dflt)
{
    size_t n = strlen(key);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], key, n) && argv[i][n] == '=')
            return argv[i] + n + 1;
    return dflt;
}

static void uuid_text(const CUuuid *u, char *out, size_t cap)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, cap, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2],
             b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

static void wait_line(void)
{
    char line[64];
    if (!fgets(line, sizeof line, stdin))
        exit(3);
}

/* NVML through dlopen and dlsym, as pynvml reaches it. */
static void nvml_view(void)
{
    void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW);
    if (!h) {
        printf(",\"nvml\":null");
        return;
    }
    nvmlReturn_t (*init)(void) = (nvmlReturn_t(*)(void))dlsym(h, "nvmlInit_v2");
    nvmlReturn_t (*count)(unsigned *) = (nvmlReturn_t(*)(unsigned *))dlsym(h, "nvmlDeviceGetCount_v2");
    nvmlReturn_t (*count1)(unsigned *) = (nvmlReturn_t(*)(unsigned *))dlsym(h, "nvmlDeviceGetCount");
    nvmlReturn_t (*by_index)(unsigned, nvmlDevice_t *) =
        (nvmlReturn_t(*)(unsigned, nvmlDevice_t *))dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
    nvmlReturn_t (*by_index1)(unsigned, nvmlDevice_t *) =
        (nvmlReturn_t(*)(unsigned, nvmlDevice_t *))dlsym(h, "nvmlDeviceGetHandleByIndex");
    nvmlReturn_t (*by_uuid)(const char *, nvmlDevice_t *) =
        (nvmlReturn_t(*)(const char *, nvmlDevice_t *))dlsym(h, "nvmlDeviceGetHandleByUUID");
    nvmlReturn_t (*get_uuid)(nvmlDevice_t, char *, unsigned) =
        (nvmlReturn_t(*)(nvmlDevice_t, char *, unsigned))dlsym(h, "nvmlDeviceGetUUID");
    nvmlReturn_t (*get_index)(nvmlDevice_t, unsigned *) =
        (nvmlReturn_t(*)(nvmlDevice_t, unsigned *))dlsym(h, "nvmlDeviceGetIndex");
    unsigned n = 0, n1 = 0;
    int irc = init(), crc = count(&n), c1rc = count1(&n1);
    printf(",\"nvml\":{\"init\":%d,\"count_rc\":%d,\"count\":%u,\"count_v1\":%u,\"devices\":[", irc, crc, n,
           c1rc == 0 ? n1 : 0);
    for (unsigned i = 0; crc == 0 && i < n; i++) {
        nvmlDevice_t d = NULL, d1 = NULL;
        char u[NVML_DEVICE_UUID_V2_BUFFER_SIZE] = "";
        unsigned idx = 99;
        int hrc = by_index(i, &d);
        if (hrc == 0)
            get_uuid(d, u, sizeof u);
        int xrc = hrc == 0 ? (int)get_index(d, &idx) : -1;
        by_index1(i, &d1);
        printf("%s{\"uuid\":\"%s\",\"index_rc\":%d,\"index\":%u,\"v1_same\":%s}", i ? "," : "", u, xrc, idx,
               d1 == d ? "true" : "false");
    }
    nvmlDevice_t past = NULL;
    printf("],\"past_end\":%d,\"by_uuid\":[", by_index(n, &past));
    const char *all = getenv("VGPU_TEST_UUIDS");
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", all ? all : "");
    int k = 0;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        nvmlDevice_t d = NULL;
        printf("%s%d", k++ ? "," : "", by_uuid(t, &d));
    }
    printf("]}");
}

struct runner {
    CUcontext ctx;
    CUfunction fn;
    long kernels;
    uint64_t kernel_ns;
    int rc;
    double seconds;
};

static double mono_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *run_kernels(void *arg)
{
    struct runner *r = arg;
    cuCtxSetCurrent(r->ctx);
    double t0 = mono_s();
    for (long k = 0; k < r->kernels && !r->rc; k++) {
        void *params[] = {&r->kernel_ns};
        r->rc = cuLaunchKernel(r->fn, 1, 1, 1, 1, 1, 1, 0, NULL, params, NULL);
    }
    int s = cuCtxSynchronize();
    if (!r->rc)
        r->rc = s;
    r->seconds = mono_s() - t0;
    return NULL;
}

int main(int argc, char **argv)
{
    int ords[MAXD], nords = 0;
    char ctxs[64];
    snprintf(ctxs, sizeof ctxs, "%s", arg(argc, argv, "ctx", ""));
    for (char *save = NULL, *t = strtok_r(ctxs, ",", &save); t && nords < MAXD; t = strtok_r(NULL, ",", &save))
        ords[nords++] = atoi(t);
    size_t alloc = strtoull(arg(argc, argv, "alloc", "0"), NULL, 10);
    long kernels = strtol(arg(argc, argv, "kernels", "0"), NULL, 10);
    uint64_t kernel_ns = strtoull(arg(argc, argv, "kernel_ns", "1000000"), NULL, 10);

    int init = cuInit(0);
    printf("{\"init\":%d", init);
    const char *cvd = getenv("CUDA_VISIBLE_DEVICES");
    printf(",\"cvd\":%s%s%s", cvd ? "\"" : "", cvd ? cvd : "null", cvd ? "\"" : "");
    int count = 0;
    if (init == 0) {
        cuDeviceGetCount(&count);
        printf(",\"count\":%d,\"uuids\":[", count);
        for (int i = 0; i < count; i++) {
            CUuuid u;
            char s[64] = "";
            if (cuDeviceGetUuid_v2(&u, i) == 0)
                uuid_text(&u, s, sizeof s);
            printf("%s\"%s\"", i ? "," : "", s);
        }
        CUdevice past;
        printf("],\"past_end\":%d", cuDeviceGet(&past, count));
    }
    nvml_view();
    if (!strcmp(arg(argc, argv, "wait", "0"), "1"))
        wait_line();

    CUcontext prim[MAXD] = {0};
    CUfunction fn[MAXD] = {0};
    CUdeviceptr ptr[MAXD] = {0};
    printf(",\"ctx\":[");
    for (int i = 0; i < nords; i++) {
        int o = ords[i];
        int retain = cuDevicePrimaryCtxRetain(&prim[i], o);
        CUcontext other = NULL;
        int create = cuCtxCreate_v2(&other, 0, o);
        if (create == 0)
            cuCtxDestroy_v2(other);
        int arc = -1;
        size_t mfree = 0, mtotal = 0;
        if (retain == 0) {
            cuCtxSetCurrent(prim[i]);
            if (alloc)
                arc = cuMemAlloc_v2(&ptr[i], alloc);
            cuMemGetInfo_v2(&mfree, &mtotal);
            CUmodule mod;
            if (kernels && cuModuleLoadData(&mod, "vgpu-sim") == 0)
                cuModuleGetFunction(&fn[i], mod, "sim_sleep_ns");
        }
        printf("%s{\"ord\":%d,\"retain\":%d,\"create\":%d,\"alloc\":%d,\"free\":%zu,\"total\":%zu}", i ? "," : "", o,
               retain, create, arc, mfree, mtotal);
    }
    printf("]");
    struct runner run[MAXD];
    pthread_t th[MAXD];
    for (int i = 0; i < nords; i++) {
        run[i] = (struct runner){.ctx = prim[i], .fn = fn[i], .kernels = fn[i] ? kernels : 0,
                                 .kernel_ns = kernel_ns};
        if (prim[i] && pthread_create(&th[i], NULL, run_kernels, &run[i]) != 0)
            run[i].rc = -1;
    }
    printf(",\"run\":[");
    for (int i = 0; i < nords; i++) {
        if (prim[i] && run[i].rc != -1)
            pthread_join(th[i], NULL);
        printf("%s{\"ord\":%d,\"launch\":%d,\"seconds\":%.6f}", i ? "," : "", ords[i], run[i].rc,
               run[i].seconds);
    }
    printf("],\"sim\":[");
    for (int d = 0; d < MAXD; d++) {
        uint64_t busy = 0, mem = 0;
        if (vgpuSimDeviceStats(d, NULL, NULL, NULL) != 0)
            break;
        vgpuSimProcessDeviceStats(0, d, &busy, &mem);
        printf("%s[%llu,%llu]", d ? "," : "", (unsigned long long)busy, (unsigned long long)mem);
    }
    printf("]}\n");
    fflush(stdout);
    if (!strcmp(arg(argc, argv, "hold", "0"), "1"))
        wait_line();
    for (int i = 0; i < nords; i++)
        if (ptr[i]) {
            cuCtxSetCurrent(prim[i]);
            cuMemFree_v2(ptr[i]);
        }
    return 0;
}
