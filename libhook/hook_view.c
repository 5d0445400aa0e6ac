/*
 * hook_view.c - the devices a program sees in a slice that gpu.devices
 * restricts: CUDA's and NVML's device lists (docs/design.md, "Devices").
 *
 * The daemon's welcome lists the slice's devices (their UUIDs, in the
 * node's order). The slice then looks like a node with just those GPUs:
 * NVML shows them, numbered from 0 in that order, and CUDA shows them too,
 * through the driver's own CUDA_VISIBLE_DEVICES: the hook sets it to their
 * UUIDs for the driver's cuInit and puts the program's value back after,
 * so every driver function that takes a device ordinal (hundreds, many of
 * them not hooked) numbers devices the same way. A CUDA_VISIBLE_DEVICES of
 * the program's own is read as on such a node: indices are positions in
 * the slice's list (NVML's numbering inside the slice), UUIDs (or unique
 * prefixes) must be the slice's, and the list ends at the first entry that
 * is neither or repeats one, as the driver reads it. NVML ignores it, as
 * NVIDIA's does.
 *
 * The view is fixed the first time it is asked for in a process image: a
 * running program's devices are never renumbered under it (a reconnect
 * that brings another list changes only what the daemon lets it attach).
 * With no list (the slice may use every device) nothing is changed.
 */
#include <stdlib.h>
#include <string.h>

#include "hook_services.h"

static pthread_mutex_t viewmu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int view_state; /* 0 not fixed yet, 1 every device, 2 restricted */
static struct vgpu_view view;
static pthread_mutex_t initmu = PTHREAD_MUTEX_INITIALIZER;
static bool driver_ready; /* initmu: the driver's cuInit succeeded */

const struct vgpu_view *vgpu_view(void)
{
    int s = atomic_load_explicit(&view_state, memory_order_acquire);
    if (__builtin_expect(s == 0, 0)) {
        if (atomic_load(&vgpu_mode) != VGPU_MODE_REGISTERED)
            return NULL; /* no daemon: no slice to show */
        pthread_mutex_lock(&viewmu);
        s = atomic_load(&view_state);
        if (s == 0) {
            view.n = vgpu_client_devices(view.uuid, VGPU_MAX_HDEV);
            s = view.n < 0 ? 1 : 2;
            atomic_store_explicit(&view_state, s, memory_order_release);
        }
        pthread_mutex_unlock(&viewmu);
    }
    return s == 2 ? &view : NULL;
}

int vgpu_view_index(const struct vgpu_view *v, const char *uuid)
{
    for (int i = 0; uuid && i < v->n; i++)
        if (!strcmp(v->uuid[i], uuid))
            return i;
    return -1;
}

/* One entry of CUDA_VISIBLE_DEVICES (len bytes at e, no blanks around):
 * its position in the view, or -1. */
static int entry_index(const struct vgpu_view *v, const char *e, size_t len)
{
    if (len == 0)
        return -1;
    if (len > 4 && !strncmp(e, "GPU-", 4)) {
        int found = -1;
        for (int i = 0; i < v->n; i++) {
            if (len <= strlen(v->uuid[i]) && !strncmp(v->uuid[i], e, len)) {
                if (found >= 0)
                    return -1; /* a prefix of two: names neither */
                found = i;
            }
        }
        return found;
    }
    int k = 0;
    for (size_t i = 0; i < len; i++) {
        if (e[i] < '0' || e[i] > '9' || k > VGPU_MAX_HDEV)
            return -1; /* MIG-..., a sign, anything else */
        k = k * 10 + (e[i] - '0');
    }
    return k < v->n ? k : -1;
}

int vgpu_view_compose(const struct vgpu_view *v, const char *cvd, int *out, int cap)
{
    if (!cvd) {
        int n = v->n < cap ? v->n : cap;
        for (int i = 0; i < n; i++)
            out[i] = i;
        return n;
    }
    int n = 0;
    for (const char *p = cvd; *p && n < cap;) {
        while (*p == ' ' || *p == '\t')
            p++;
        size_t len = strcspn(p, ",");
        size_t l = len;
        while (l && (p[l - 1] == ' ' || p[l - 1] == '\t'))
            l--;
        int k = entry_index(v, p, l);
        for (int j = 0; j < n && k >= 0; j++)
            if (out[j] == k)
                k = -1;
        if (k < 0)
            break;
        out[n++] = k;
        p += len;
        if (*p == ',')
            p++;
    }
    return n;
}

/* CUDA_VISIBLE_DEVICES for the driver: the UUIDs of what the view and the
 * program's own value leave, comma-separated. Their count (0: none). */
static int driver_list(const struct vgpu_view *v, char *buf, size_t cap)
{
    int idx[VGPU_MAX_HDEV];
    int n = vgpu_view_compose(v, getenv("CUDA_VISIBLE_DEVICES"), idx, VGPU_MAX_HDEV);
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < n; i++) {
        size_t u = strlen(v->uuid[idx[i]]);
        if (len + u + 2 > cap)
            return i;
        if (i)
            buf[len++] = ',';
        memcpy(buf + len, v->uuid[idx[i]], u + 1);
        len += u;
    }
    return n;
}

CUresult vgpu_view_cuinit(unsigned int flags)
{
    const struct vgpu_view *v = vgpu_view();
    if (!v || flags != 0)
        return VGPU_DRIVER(real_cuInit(flags));
    pthread_mutex_lock(&initmu);
    CUresult r;
    if (driver_ready) {
        r = VGPU_DRIVER(real_cuInit(flags));
        pthread_mutex_unlock(&initmu);
        return r;
    }
    char list[VGPU_MAX_HDEV * VGPU_UUID_MAX];
    const char *mine = getenv("CUDA_VISIBLE_DEVICES");
    if (driver_list(v, list, sizeof list) == 0) {
        vgpu_warn_once(VGPU_W_NOGPU, "vgpu: no GPU for this process: its slice may use %d device%s%s%s%s", v->n,
                       v->n == 1 ? "" : "s", mine ? " and CUDA_VISIBLE_DEVICES=\"" : "", mine ? mine : "",
                       mine ? "\" names none of them" : "");
        pthread_mutex_unlock(&initmu);
        return CUDA_ERROR_NO_DEVICE;
    }
    /* The program's value, to put back once the driver has read ours. One
     * too long to keep is left as ours (UUIDs of its devices: it reads the
     * same again). setenv is not safe against a getenv racing on another
     * thread; the window is this one call, at the program's first cuInit. */
    static char saved[4096];
    bool restore = !mine || strlen(mine) < sizeof saved;
    if (mine && restore)
        memcpy(saved, mine, strlen(mine) + 1);
    if (setenv("CUDA_VISIBLE_DEVICES", list, 1) != 0)
        vgpu_warn_once(VGPU_W_VIEW, "vgpu: cannot set CUDA_VISIBLE_DEVICES for the driver: CUDA shows every device "
                       "(those outside the slice still fail at context creation)");
    r = VGPU_DRIVER(real_cuInit(flags));
    if (restore && mine)
        setenv("CUDA_VISIBLE_DEVICES", saved, 1);
    else if (restore)
        unsetenv("CUDA_VISIBLE_DEVICES");
    if (r == CUDA_SUCCESS)
        driver_ready = true;
    pthread_mutex_unlock(&initmu);
    return r;
}

void vgpu_view_atfork_child(void)
{
    /* The child registers as a process of its own; its view is made then. */
    pthread_mutex_init(&viewmu, NULL);
    pthread_mutex_init(&initmu, NULL);
    atomic_store(&view_state, 0);
}
