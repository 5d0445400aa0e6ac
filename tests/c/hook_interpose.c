/*
 * hook_interpose - checks, from inside a program, that every way of reaching
 * a driver function lands on libvgpu-hook.so: dlopen + dlsym, and
 * cuGetProcAddress(_v2) with and without the per-thread-stream flag. Prints
 * one JSON object: name -> "library:symbol" of what each lookup returned.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "vgpu_cuda.h"

static void show(const char *key, void *p, int *first)
{
    Dl_info info;
    const char *lib = "?", *sym = "?";
    if (p && dladdr(p, &info)) {
        lib = info.dli_fname ? strrchr(info.dli_fname, '/') ? strrchr(info.dli_fname, '/') + 1 : info.dli_fname : "?";
        sym = info.dli_sname ? info.dli_sname : "?";
    }
    printf("%s\"%s\": \"%s:%s\"", *first ? "" : ", ", key, p ? lib : "null", p ? sym : "null");
    *first = 0;
}

typedef CUresult (*gpa2_t)(const char *, void **, int, cuuint64_t, CUdriverProcAddressQueryResult *);

int main(void)
{
    int first = 1;
    printf("{");
    void *h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    show("dlsym:cuMemAlloc_v2", h ? dlsym(h, "cuMemAlloc_v2") : NULL, &first);
    show("dlsym:cuLaunchKernel", h ? dlsym(h, "cuLaunchKernel") : NULL, &first);
    show("dlsym:cuDeviceGetCount", h ? dlsym(h, "cuDeviceGetCount") : NULL, &first);
    gpa2_t gpa2 = h ? (gpa2_t)dlsym(h, "cuGetProcAddress_v2") : NULL;
    show("dlsym:cuGetProcAddress_v2", (void *)gpa2, &first);
    if (gpa2) {
        void *p = NULL;
        CUdriverProcAddressQueryResult st;
        /* as the CUDA runtime does: fetch cuGetProcAddress itself first */
        gpa2("cuGetProcAddress", &p, 12000, 0, &st);
        show("gpa:cuGetProcAddress", p, &first);
        gpa2_t g = p ? (gpa2_t)p : gpa2;
        const char *names[] = {"cuLaunchKernel", "cuMemAlloc", "cuMemFree", "cuGraphLaunch", "cuMemAllocAsync",
                               "cuMemGetInfo", "cuDeviceGetCount", "cuLaunchKernelEx", "cuStreamBeginCapture"};
        for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
            char key[96];
            p = NULL;
            g(names[i], &p, 12000, CU_GET_PROC_ADDRESS_DEFAULT, &st);
            snprintf(key, sizeof key, "gpa:%s", names[i]);
            show(key, p, &first);
            p = NULL;
            g(names[i], &p, 12000, CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM, &st);
            snprintf(key, sizeof key, "gpa_ptsz:%s", names[i]);
            show(key, p, &first);
        }
    }
    /* CUDA 11's cuGetProcAddress: the simulated driver's calls its _v2 by
     * name, which is the hook's: answered once, without a false warning. */
    typedef CUresult (*gpa1_t)(const char *, void **, int, cuuint64_t);
    gpa1_t gpa1 = h ? (gpa1_t)dlsym(h, "cuGetProcAddress") : NULL;
    if (gpa1) {
        void *p = NULL;
        gpa1("cuMemAlloc", &p, 11030, CU_GET_PROC_ADDRESS_DEFAULT);
        show("gpa1:cuMemAlloc", p, &first);
    }
    printf("}\n");
    return 0;
}
