/*
 * hook_base.c - layer 0: the driver's function pointers (resolved by
 * hook_init.c), the mode and configuration, the device table, the re-entry
 * guard, one-line warnings, clocks and service threads.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include "hook_base.h"

#define VGPU_DEF_REAL(name) __typeof__(&name) real_##name;
VGPU_HOOKED_CUDA(VGPU_DEF_REAL)
VGPU_USED_CUDA(VGPU_DEF_REAL)
VGPU_HOOKED_NVML(VGPU_DEF_REAL)
VGPU_USED_NVML(VGPU_DEF_REAL)
#undef VGPU_DEF_REAL

struct vgpu_config vgpu_cfg;
_Atomic int vgpu_mode;
_Thread_local int vgpu_in_hook __attribute__((tls_model("initial-exec")));

struct vgpu_hdev vgpu_hdevs[VGPU_MAX_HDEV];
_Atomic int vgpu_nr_hdev;

static _Atomic uint64_t warned;

uint64_t vgpu_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t vgpu_coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void vgpu_warn_once(int kind, const char *fmt, ...)
{
    uint64_t bit = 1ull << (kind & 63);
    if (atomic_fetch_or(&warned, bit) & bit)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n] = '\n';
    /* One write(2): lines from several threads never interleave. */
    ssize_t w = write(2, line, (size_t)n + 1);
    (void)w;
}

bool vgpu_start_thread(void *(*fn)(void *))
{
    pthread_t t;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    bool ok = pthread_create(&t, &a, fn, NULL) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&a);
    return ok;
}
