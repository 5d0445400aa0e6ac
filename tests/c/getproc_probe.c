/*
 * getproc_probe - for every entry point the hook intercepts, what the real
 * driver's cuGetProcAddress_v2 returns (default and per-thread-stream
 * flags, a CUDA 13 runtime's version) compared with the driver's exported
 * symbols. A pointer that matches no exported symbol would slip past the
 * hook's pointer-swapping, so this is run on real drivers to check that
 * assumption. Prints one line per name; exit 1 if any miss.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vgpu_cuda.h"

typedef CUresult (*gpa_t)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

static const char *names[] = {
    "cuInit", "cuGetProcAddress", "cuDevicePrimaryCtxRetain", "cuCtxCreate", "cuCtxDestroy",
    "cuCtxSetCurrent", "cuCtxPushCurrent", "cuCtxPopCurrent", "cuMemGetInfo", "cuDeviceTotalMem",
    "cuMemAlloc", "cuMemAllocPitch", "cuMemAllocManaged", "cuMemFree", "cuArrayCreate",
    "cuArray3DCreate", "cuArrayDestroy", "cuMipmappedArrayCreate", "cuMipmappedArrayDestroy",
    "cuMemCreate", "cuMemRelease", "cuMemAllocAsync", "cuMemAllocFromPoolAsync", "cuMemFreeAsync",
    "cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel", "cuGraphLaunch",
    "cuStreamBeginCapture", "cuStreamEndCapture", NULL};
static const char *suffixes[] = {"", "_v2", "_v3", "_v4", "_ptsz", "_ptds", "_v2_ptsz", "_v2_ptds", NULL};

int main(int argc, char **argv)
{
    int version = argc > 1 ? atoi(argv[1]) : 13000;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "no libcuda.so.1\n");
        return 2;
    }
    gpa_t gpa = (gpa_t)dlsym(lib, "cuGetProcAddress_v2");
    CUresult (*init)(unsigned) = (CUresult(*)(unsigned))dlsym(lib, "cuInit");
    init(0);
    int misses = 0;
    for (int i = 0; names[i]; i++) {
        for (int f = 0; f < 2; f++) {
            cuuint64_t flags = f ? CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM : 0;
            void *p = NULL;
            CUdriverProcAddressQueryResult st;
            CUresult r = gpa(names[i], &p, version, flags, &st);
            const char *match = NULL;
            static char buf[128];
            for (int s = 0; suffixes[s] && p; s++) {
                snprintf(buf, sizeof buf, "%s%s", names[i], suffixes[s]);
                if (dlsym(lib, buf) == p) {
                    match = buf;
                    break;
                }
            }
            printf("%-28s %-5s rc=%d status=%d -> %s\n", names[i], f ? "ptds" : "dflt", (int)r,
                   (int)st, p ? (match ? match : "UNEXPORTED POINTER") : "null");
            if (p && !match)
                misses++;
        }
    }
    return misses ? 1 : 0;
}
