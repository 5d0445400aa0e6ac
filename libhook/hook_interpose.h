/*
 * hook_interpose.h - layer 3 of libvgpu-hook.so, interposition: the entry
 * points a program calls instead of the driver's, and the lifecycle they
 * share (see hook_base.h for the layers). Uses layers 0 to 2.
 *
 *   hook_init.c     hook.conf, resolving the real driver, registration with
 *                   vgpud on the first intercepted call, fork
 *   hook_dlsym.c    dlsym and cuGetProcAddress: every way a program reaches
 *                   a driver function lands on the hook
 *   hook_ctx.c      cuInit, contexts, memory info
 *   hook_alloc.c    every allocation path and its free
 *   hook_launch.c   kernel and graph launches, stream captures
 *   hook_nvml.c     NVML memory info
 *
 * The files of this layer know each other: every entry point enters through
 * the lifecycle (ENTER, vgpu_ensure), the hook table in hook_dlsym.c names
 * every entry point, and resolution refuses a "driver" that is the hook
 * itself by comparing addresses with its entry points.
 */
#ifndef VGPU_HOOK_INTERPOSE_H
#define VGPU_HOOK_INTERPOSE_H

#include "hook_services.h"

#pragma GCC visibility push(hidden)

/* ---------------------------------------------------------------------- */
/* hook_init.c                                                              */

/* Resolve real symbols and read config (once), then register with vgpud if
 * not yet done in this process image. Returns the mode. Cheap after the first
 * call: one atomic load. */
int vgpu_ensure(void);
/* vgpu_ensure with its common case inline (the launch path). */
static inline __attribute__((always_inline)) int vgpu_ensure_fast(void)
{
    int m = atomic_load_explicit(&vgpu_mode, memory_order_acquire);
    if (__builtin_expect(m != VGPU_MODE_UNINIT, 1))
        return m;
    return vgpu_ensure();
}
/* Resolve the real NVML symbols (NVML may be used without CUDA). */
bool vgpu_resolve_nvml(void);


/* The mode a hooked entry point acts in: PASSTHROUGH when re-entered. */
static inline __attribute__((always_inline)) int vgpu_enter(void)
{
    if (__builtin_expect(vgpu_in_hook != 0, 0))
        return VGPU_MODE_PASSTHROUGH;
    return vgpu_ensure_fast();
}

/* The start of every hooked CUDA entry point `name`: declares mode_ (the
 * mode to act in: REGISTERED enforces; anything else calls the driver and
 * accounts nothing), and refuses the call in FAIL/BROKEN or when the driver
 * lacks the function. */
#define ENTER(name)                                                                        \
    int mode_ = vgpu_enter();                                                              \
    if (__builtin_expect(mode_ >= VGPU_MODE_FAIL, 0) || !real_##name)                      \
        return VGPU_REFUSED_ERROR;                                                         \
    (void)mode_

/* ---------------------------------------------------------------------- */
/* hook_dlsym.c                                                             */

typedef void (*vgpu_fn)(void);
/* The real dlsym (never our own). */
void *vgpu_real_dlsym(void *handle, const char *name);
/* Our hook for `name`, or NULL if we do not hook it. */
void *vgpu_hook_for_name(const char *name);
/* Fill the table of the driver's addresses of every hooked name. */
void vgpu_dlsym_fill_real(void *libcuda, void *libnvml);

#pragma GCC visibility pop

#endif /* VGPU_HOOK_INTERPOSE_H */
