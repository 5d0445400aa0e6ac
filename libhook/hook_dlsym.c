/*
 * hook_dlsym.c - the three ways a program reaches a driver function, and how
 * each lands on the hook:
 *
 *   1. linked against libcuda: our exported names win (LD_PRELOAD order);
 *   2. dlopen + dlsym: our exported dlsym returns our function for any name
 *      we hook, whatever the handle;
 *   3. cuGetProcAddress(_v2): we call the driver's, then swap any pointer
 *      that equals the driver's address of a function we hook for our hook.
 *      Comparing addresses rather than names honours versioned names and the
 *      per-thread-default-stream flag without a hand-written version table.
 */
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hook_internal.h"

static int debug_getproc(void);

struct hook_entry {
    const char *name;
    void *hook;
    _Atomic(void *) real;
};

#define VGPU_ENTRY(name) {#name, (void *)&name, NULL},
static struct hook_entry table[] = {
    VGPU_HOOKED_CUDA(VGPU_ENTRY)
    VGPU_HOOKED_NVML(VGPU_ENTRY)
};
#undef VGPU_ENTRY
#define NENTRIES (sizeof table / sizeof table[0])

typedef void *(*dlsym_fn)(void *, const char *);
static _Atomic(dlsym_fn) real_dlsym_p;

static dlsym_fn get_real_dlsym(void)
{
    dlsym_fn f = atomic_load_explicit(&real_dlsym_p, memory_order_acquire);
    if (f)
        return f;
    f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!f)
        f = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    atomic_store_explicit(&real_dlsym_p, f, memory_order_release);
    return f;
}

void *vgpu_real_dlsym(void *handle, const char *name)
{
    dlsym_fn f = get_real_dlsym();
    return f ? f(handle, name) : NULL;
}

void *vgpu_hook_for_name(const char *name)
{
    if (!name || (name[0] != 'c' && name[0] != 'n'))
        return NULL;
    for (size_t i = 0; i < NENTRIES; i++)
        if (!strcmp(table[i].name, name))
            return table[i].hook;
    return NULL;
}

void vgpu_dlsym_fill_real(void *libcuda, void *libnvml)
{
    for (size_t i = 0; i < NENTRIES; i++) {
        void *h = table[i].name[0] == 'c' ? libcuda : libnvml;
        if (h)
            atomic_store(&table[i].real, vgpu_real_dlsym(h, table[i].name));
    }
}

/* RTLD_NEXT means "after the caller". Forwarding it from here would mean
 * "after the hook", which can find the caller's own symbol and recurse, so
 * walk the link map from the caller's object instead. */
static void *dlsym_next(const void *caller, const char *name)
{
    Dl_info info;
    struct link_map *lm = NULL;
    if (!dladdr1(caller, &info, (void **)&lm, RTLD_DL_LINKMAP) || !lm)
        return vgpu_real_dlsym(RTLD_NEXT, name);
    for (struct link_map *l = lm->l_next; l; l = l->l_next) {
        void *r = vgpu_real_dlsym(l, name);
        if (!r)
            continue;
        Dl_info ri;
        struct link_map *rl = NULL;
        if (dladdr1(r, &ri, (void **)&rl, RTLD_DL_LINKMAP) && rl == lm)
            continue; /* found through l's dependencies: the caller itself */
        return r;
    }
    return NULL;
}

VGPU_EXPORT void *dlsym(void *handle, const char *name)
{
    void *r;
    if (handle == RTLD_NEXT)
        r = dlsym_next(__builtin_return_address(0), name);
    else
        r = vgpu_real_dlsym(handle, name);
    if (r) {
        void *h = vgpu_hook_for_name(name);
        if (debug_getproc() && name[0] == 'c' && name[1] == 'u')
            fprintf(stderr, "vgpu-debug: dlsym(%s) -> %p%s\n", name, h ? h : r, h ? " (hooked)" : "");
        if (h)
            return h;
    }
    return r;
}

/* Swap a driver pointer for our hook if it is one we intercept. */
static void *swap_for_hook(void *p)
{
    if (!p)
        return p;
    for (size_t i = 0; i < NENTRIES; i++)
        if (atomic_load_explicit(&table[i].real, memory_order_relaxed) == p)
            return table[i].hook;
    return p;
}

/* Does `name` (an entry of our table) belong to the base name `base`, i.e.
 * is it base itself or base plus a version / stream suffix? */
static bool variant_of(const char *name, const char *base)
{
    size_t n = strlen(base);
    if (strncmp(name, base, n))
        return false;
    const char *rest = name + n;
    return !*rest || !strcmp(rest, "_v2") || !strcmp(rest, "_v3") || !strcmp(rest, "_v4") ||
           !strcmp(rest, "_ptsz") || !strcmp(rest, "_ptds") || !strcmp(rest, "_v2_ptsz");
}

/* VGPU_DEBUG=getproc: log every entry point handed out, for finding a
 * library that reaches the driver some way the hook does not cover. */
static int debug_getproc(void)
{
    static int v = -1;
    if (v < 0) {
        const char *e = getenv("VGPU_DEBUG");
        v = e && strstr(e, "getproc") ? 1 : 0;
    }
    return v;
}

static void fixup(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    if (!pfn)
        return;
    void *s = swap_for_hook(*pfn);
    if (debug_getproc())
        fprintf(stderr, "vgpu-debug: cuGetProcAddress(%s, %d, %llu) -> %p%s\n", symbol ? symbol : "?",
                cudaVersion, (unsigned long long)flags, *pfn, s != *pfn ? " (hooked)" : "");
    if (s == *pfn && symbol && !strcmp(symbol, "cuGetProcAddress"))
        s = cudaVersion >= 12000 ? (void *)&cuGetProcAddress_v2 : (void *)&cuGetProcAddress;
    if (s == *pfn && *pfn && symbol) {
        /* The driver handed out an entry point for a function we intercept
         * that is none of its exported symbols: calls through it would not
         * be counted. Say so once (it is a driver the hook does not know). */
        for (size_t i = 0; i < NENTRIES; i++)
            if (variant_of(table[i].name, symbol)) {
                vgpu_warn_once(VGPU_W_GETPROC,
                               "vgpu: cuGetProcAddress(%s, %d) returned an entry point the hook "
                               "does not know; calls through it are not intercepted",
                               symbol, cudaVersion);
                break;
            }
    }
    *pfn = s;
}

VGPU_EXPORT CUresult cuGetProcAddress(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags)
{
    int m = vgpu_ensure();
    if (m == VGPU_MODE_BROKEN || !real_cuGetProcAddress)
        return VGPU_REFUSED_ERROR;
    CUresult r = real_cuGetProcAddress(symbol, pfn, cudaVersion, flags);
    if (r == CUDA_SUCCESS)
        fixup(symbol, pfn, cudaVersion, flags);
    return r;
}

VGPU_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                                         CUdriverProcAddressQueryResult *symbolStatus)
{
    int m = vgpu_ensure();
    if (m == VGPU_MODE_BROKEN || !real_cuGetProcAddress_v2)
        return VGPU_REFUSED_ERROR;
    CUresult r = real_cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus);
    if (r == CUDA_SUCCESS)
        fixup(symbol, pfn, cudaVersion, flags);
    return r;
}
