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
#include <elf.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>

#include "hook_interpose.h"

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

/* ---- finding the C library's dlsym ----
 *
 * Our own dlsym is exported, so the name cannot be used to reach the real
 * one. Three ways, the first that works wins; each finds the very function
 * a program without the hook would call, so none can do worse than it:
 *
 *   1. dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34"): glibc 2.34 and later, where
 *      libdl is part of libc, on every architecture.
 *   2. the same with this architecture's first glibc version, where dlsym
 *      lives in libdl.so.2 (older glibc): GLIBC_2.2.5 on x86-64, GLIBC_2.17
 *      on aarch64, and so on.
 *   3. no version names at all: the dynamic symbol table of each object
 *      after the hook in the link map (what RTLD_NEXT searches), looked up
 *      through its GNU or SysV hash table, taking the default version of a
 *      defined `dlsym`. This covers a glibc or an architecture the list in
 *      2 does not know.
 *
 * Not used: glibc's private __libc_dlsym and _dl_sym. The first takes a
 * link map only (no RTLD_DEFAULT/RTLD_NEXT, no dlerror), the second is not
 * exported since glibc 2.34: either could do worse than the real dlsym. Building with -DVGPU_DLSYM_ELF_ONLY skips 1 and 2 (the tests'
 * way to exercise 3). */

static char dlsym_found_by[160]; /* how, for VGPU_DEBUG=getproc */

static uintptr_t dyn_ptr(const struct link_map *l, uintptr_t v)
{
    /* glibc relocates these entries in place on most architectures, not on
     * those with a read-only dynamic section (RISC-V, MIPS). */
    return v < (uintptr_t)l->l_addr ? (uintptr_t)l->l_addr + v : v;
}

static uint32_t gnu_hash(const char *s)
{
    uint32_t h = 5381;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        h = h * 33 + *p;
    return h;
}

static uint32_t sysv_hash(const char *s)
{
    uint32_t h = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        h = (h << 4) + *p;
        uint32_t g = h & 0xf0000000u;
        if (g)
            h ^= g >> 24;
        h &= ~g;
    }
    return h;
}

struct best {
    void *dflt;     /* the default version (name@@VERSION, or unversioned) */
    void *other;    /* a non-default one (name@VERSION) */
};

/* Symbol i of l, if it is a defined function called name: note it in *b.
 * true once the default version is found. */
static bool consider(const struct link_map *l, const ElfW(Sym) *s, const char *strtab,
                     const ElfW(Half) *versym, uint32_t i, const char *name, struct best *b)
{
    if (s->st_shndx == SHN_UNDEF || !s->st_value || (s->st_info & 0xf) != STT_FUNC ||
        strcmp(strtab + s->st_name, name))
        return false;
    ElfW(Half) v = versym ? versym[i] : 1; /* no version table: all global */
    void *addr = (void *)((uintptr_t)l->l_addr + s->st_value);
    if ((v & 0x7fff) == 0) /* VER_NDX_LOCAL */
        return false;
    if (!(v & 0x8000)) {
        b->dflt = addr;
        return true;
    }
    if (!b->other)
        b->other = addr;
    return false;
}

/* The address of `name` defined in l, its default version preferred (the
 * one a plain link against l would bind); NULL if l does not define it. */
static void *elf_lookup(const struct link_map *l, const char *name)
{
    const ElfW(Sym) *symtab = NULL;
    const char *strtab = NULL;
    const uint32_t *gnuhash = NULL, *hash = NULL;
    const ElfW(Half) *versym = NULL;
    if (!l->l_ld)
        return NULL;
    for (const ElfW(Dyn) *d = l->l_ld; d->d_tag != DT_NULL; d++) {
        uintptr_t v = dyn_ptr(l, (uintptr_t)d->d_un.d_ptr);
        switch (d->d_tag) {
        case DT_SYMTAB: symtab = (const ElfW(Sym) *)v; break;
        case DT_STRTAB: strtab = (const char *)v; break;
        case DT_GNU_HASH: gnuhash = (const uint32_t *)v; break;
        case DT_HASH: hash = (const uint32_t *)v; break;
        case DT_VERSYM: versym = (const ElfW(Half) *)v; break;
        default: break;
        }
    }
    if (!symtab || !strtab || (!gnuhash && !hash))
        return NULL;
    struct best best = {NULL, NULL};
    if (gnuhash) {
        uint32_t nbuckets = gnuhash[0], symoffset = gnuhash[1], bloom_size = gnuhash[2];
        const ElfW(Addr) *bloom = (const ElfW(Addr) *)&gnuhash[4];
        const uint32_t *buckets = (const uint32_t *)&bloom[bloom_size];
        const uint32_t *chain = &buckets[nbuckets];
        uint32_t h = gnu_hash(name);
        if (!nbuckets)
            return NULL;
        uint32_t i = buckets[h % nbuckets];
        if (i < symoffset)
            return NULL;
        for (;; i++) {
            uint32_t h2 = chain[i - symoffset];
            if ((h | 1) == (h2 | 1) && consider(l, &symtab[i], strtab, versym, i, name, &best))
                return best.dflt;
            if (h2 & 1)
                break;
        }
    } else {
        uint32_t nbucket = hash[0];
        const uint32_t *bucket = &hash[2], *chain = &bucket[nbucket];
        if (!nbucket)
            return NULL;
        for (uint32_t i = bucket[sysv_hash(name) % nbucket]; i != STN_UNDEF; i = chain[i])
            if (consider(l, &symtab[i], strtab, versym, i, name, &best))
                return best.dflt;
    }
    return best.other; /* only a non-default version: still the real function */
}

static dlsym_fn dlsym_from_link_map(void)
{
    Dl_info info;
    struct link_map *self = NULL;
    if (!dladdr1((void *)&dlsym_from_link_map, &info, (void **)&self, RTLD_DL_LINKMAP) || !self)
        return NULL;
    for (struct link_map *l = self->l_next; l; l = l->l_next) {
        void *f = elf_lookup(l, "dlsym");
        if (f && f != (void *)&dlsym) {
            snprintf(dlsym_found_by, sizeof dlsym_found_by, "the symbol table of %s", l->l_name);
            return (dlsym_fn)f;
        }
    }
    return NULL;
}

static dlsym_fn find_real_dlsym(void)
{
#ifndef VGPU_DLSYM_ELF_ONLY
    static const char *const versions[] = {
        "GLIBC_2.34",
#if defined(__x86_64__) && defined(__ILP32__)
        "GLIBC_2.16",
#elif defined(__x86_64__)
        "GLIBC_2.2.5",
#elif defined(__aarch64__)
        "GLIBC_2.17",
#elif defined(__powerpc64__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        "GLIBC_2.17",
#elif defined(__powerpc64__)
        "GLIBC_2.3",
#elif defined(__s390x__)
        "GLIBC_2.2",
#elif defined(__riscv) && __riscv_xlen == 64
        "GLIBC_2.27",
#elif defined(__loongarch64)
        "GLIBC_2.36",
#elif defined(__arm__)
        "GLIBC_2.4",
#elif defined(__i386__)
        "GLIBC_2.0",
#endif
    };
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        void *f = dlvsym(RTLD_NEXT, "dlsym", versions[i]);
        if (f && f != (void *)&dlsym) {
            snprintf(dlsym_found_by, sizeof dlsym_found_by, "dlvsym(dlsym, %s)", versions[i]);
            return (dlsym_fn)f;
        }
    }
#endif
    return dlsym_from_link_map();
}

static dlsym_fn get_real_dlsym(void)
{
    dlsym_fn f = atomic_load_explicit(&real_dlsym_p, memory_order_acquire);
    if (f)
        return f;
    f = find_real_dlsym();
    if (!f) {
        vgpu_warn_once(VGPU_W_DLSYM, "vgpu: cannot find the C library's dlsym; dlsym returns NULL in this process");
        return NULL;
    }
    if (debug_getproc())
        fprintf(stderr, "vgpu-debug: real dlsym found by %s\n", dlsym_found_by);
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

/* A real handle for l (a struct link_map is one only for objects that were
 * dlopened or are the program: passing a preloaded library's or the vDSO's
 * map to dlsym crashes in glibc), or NULL. dlclose it after use. */
static void *handle_of(const struct link_map *l)
{
    if (!l->l_name || !l->l_name[0])
        return l->l_prev ? NULL : dlopen(NULL, RTLD_LAZY); /* the program */
    void *vdso = (void *)getauxval(AT_SYSINFO_EHDR);
    Dl_info di;
    struct link_map *vl = NULL;
    if (vdso && dladdr1(vdso, &di, (void **)&vl, RTLD_DL_LINKMAP) && vl == l)
        return NULL; /* the vDSO has no file to dlopen and nothing to look up */
    return dlopen(l->l_name, RTLD_LAZY | RTLD_NOLOAD);
}

/* `name` as l itself defines it (not one of its dependencies), else NULL.
 * Through the real dlsym, so versions, IFUNCs and the like are its. A
 * result that lies in no object at all (a TLS variable) goes to *loose. */
static void *defined_in(const struct link_map *l, const char *name, void **loose)
{
    void *h = handle_of(l);
    if (!h)
        return NULL;
    void *r = vgpu_real_dlsym(h, name);
    dlclose(h);
    if (!r)
        return NULL;
    Dl_info ri;
    struct link_map *rl = NULL;
    if (dladdr1(r, &ri, (void **)&rl, RTLD_DL_LINKMAP) && rl)
        return rl == l ? r : NULL;
    if (!*loose)
        *loose = r;
    return NULL;
}

/* RTLD_NEXT means "after the caller". Forwarding it from here would mean
 * "after the hook", which can find the caller's own symbol and recurse, so
 * look in the objects after the caller's in the link map (the order of the
 * program's global scope), then, for a caller dlopened after its own
 * dependencies (a plugin finds libc before it), in those before it. Never
 * the caller's own definition. Unlike glibc, objects dlopened RTLD_LOCAL
 * are searched too: the public link map does not say which are global. */
static void *dlsym_next(const void *caller, const char *name)
{
    Dl_info info;
    struct link_map *lm = NULL;
    if (!dladdr1(caller, &info, (void **)&lm, RTLD_DL_LINKMAP) || !lm)
        return vgpu_real_dlsym(RTLD_NEXT, name);
    void *loose = NULL, *r;
    for (struct link_map *l = lm->l_next; l; l = l->l_next)
        if ((r = defined_in(l, name, &loose)))
            return r;
    struct link_map *head = lm;
    while (head->l_prev)
        head = head->l_prev;
    for (struct link_map *l = head; l && l != lm; l = l->l_next)
        if ((r = defined_in(l, name, &loose)))
            return r;
    return loose;
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

/* Is p one of our hooks already? (A driver whose table of entry points
 * takes the addresses of its exported functions gets ours, by interposition:
 * the simulated one does.) */
static bool is_hook(const void *p)
{
    for (size_t i = 0; i < NENTRIES; i++)
        if (table[i].hook == p)
            return true;
    return false;
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
    if (s == *pfn && *pfn && symbol && !is_hook(*pfn)) {
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
    /* Not ENTER: in FAIL mode the pointers are still handed out (each hooked
     * one refuses by itself; the others are the driver's, as from dlsym).
     * Re-entered (the driver's cuGetProcAddress calls its _v2 through the
     * exported name, as the simulated one does): the driver's answer as it
     * is; the outer call swaps it. */
    if (__builtin_expect(vgpu_in_hook != 0, 0))
        return real_cuGetProcAddress ? real_cuGetProcAddress(symbol, pfn, cudaVersion, flags)
                                     : VGPU_REFUSED_ERROR;
    int m = vgpu_enter();
    if (m == VGPU_MODE_BROKEN || !real_cuGetProcAddress)
        return VGPU_REFUSED_ERROR;
    CUresult r = VGPU_DRIVER(real_cuGetProcAddress(symbol, pfn, cudaVersion, flags));
    if (r == CUDA_SUCCESS)
        fixup(symbol, pfn, cudaVersion, flags);
    return r;
}

VGPU_EXPORT CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cudaVersion, cuuint64_t flags,
                                         CUdriverProcAddressQueryResult *symbolStatus)
{
    if (__builtin_expect(vgpu_in_hook != 0, 0)) /* as cuGetProcAddress */
        return real_cuGetProcAddress_v2
                   ? real_cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus)
                   : VGPU_REFUSED_ERROR;
    int m = vgpu_enter();
    if (m == VGPU_MODE_BROKEN || !real_cuGetProcAddress_v2)
        return VGPU_REFUSED_ERROR;
    CUresult r = VGPU_DRIVER(real_cuGetProcAddress_v2(symbol, pfn, cudaVersion, flags, symbolStatus));
    if (r == CUDA_SUCCESS)
        fixup(symbol, pfn, cudaVersion, flags);
    return r;
}
