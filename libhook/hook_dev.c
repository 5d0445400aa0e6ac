/*
 * hook_dev.c - devices and contexts: which physical GPU a call is about, its
 * slot in the shared regions, and what the program is told about its memory.
 *
 * A device is known by UUID (the daemon's key) and attached lazily: when a
 * context is made on it, or when memory or info is first asked for there.
 * The entry points that make and switch contexts are hook_ctx.c's.
 */
#include <stdio.h>
#include <string.h>

#include "hook_services.h"

struct vgpu_ctxinfo vgpu_ctxs[VGPU_MAX_CTX];

#define MAX_CUDEV 64
static _Atomic int cudev_map[MAX_CUDEV]; /* hidx + 1; 0 unknown */
static pthread_mutex_t devmu = PTHREAD_MUTEX_INITIALIZER;

void vgpu_hdev_inflight_init(struct vgpu_hdev *d)
{
    uint32_t m = (uint32_t)(VGPU_INFLIGHT_NS / VGPU_COST_INIT_NS);
    if (m < VGPU_INFLIGHT_MIN)
        m = VGPU_INFLIGHT_MIN;
    atomic_store(&d->inflight, 0);
    atomic_store(&d->inflight_max, m);
    atomic_store(&d->batch_max, m / 2 ? m / 2 : 1);
    atomic_store(&d->busy, 0);
    pthread_mutex_init(&d->note_mu, NULL);
    d->seen_grant = VGPU_GRANT_WAIT;
    d->drain_pending = 0;
    d->cost_ns = 0;
    d->idle_launches = 0;
    d->idle_since = 0;
}


static void format_uuid(char *out, size_t cap, const CUuuid *u)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, cap,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12],
             b[13], b[14], b[15]);
}

int vgpu_hdev_of_uuid(const char *uuid, uint64_t total)
{
    int n = atomic_load_explicit(&vgpu_nr_hdev, memory_order_acquire);
    for (int i = 0; i < n; i++)
        if (!strcmp(vgpu_hdevs[i].uuid, uuid))
            return i;
    pthread_mutex_lock(&devmu);
    n = atomic_load(&vgpu_nr_hdev);
    int found = -1;
    for (int i = 0; i < n; i++)
        if (!strcmp(vgpu_hdevs[i].uuid, uuid))
            found = i;
    if (found < 0 && n < VGPU_MAX_HDEV) {
        struct vgpu_hdev *d = &vgpu_hdevs[n];
        snprintf(d->uuid, sizeof d->uuid, "%s", uuid);
        d->total = total;
        atomic_store(&d->slot, -1);
        atomic_store(&d->refused, 0);
        atomic_store(&d->held, 0);
        vgpu_hdev_inflight_init(d);
        atomic_store_explicit(&vgpu_nr_hdev, n + 1, memory_order_release);
        found = n;
    }
    pthread_mutex_unlock(&devmu);
    if (found < 0)
        vgpu_warn_once(VGPU_W_DEVICE, "vgpu: more than %d devices; extra ones are not limited", VGPU_MAX_HDEV);
    return found;
}

int vgpu_hdev_of_cudev(CUdevice dev)
{
    if (dev < 0 || dev >= MAX_CUDEV)
        return -1;
    int v = atomic_load_explicit(&cudev_map[dev], memory_order_acquire);
    if (v > 0)
        return v - 1;
    CUuuid u;
    CUresult r = CUDA_ERROR_NOT_FOUND;
    if (real_cuDeviceGetUuid_v2)
        r = VGPU_DRIVER(real_cuDeviceGetUuid_v2(&u, dev));
    if (r != CUDA_SUCCESS && real_cuDeviceGetUuid)
        r = VGPU_DRIVER(real_cuDeviceGetUuid(&u, dev));
    if (r != CUDA_SUCCESS)
        return -1;
    size_t total = 0;
    if (!real_cuDeviceTotalMem_v2 || VGPU_DRIVER(real_cuDeviceTotalMem_v2(&total, dev)) != CUDA_SUCCESS)
        return -1;
    char uuid[VGPU_UUID_MAX];
    format_uuid(uuid, sizeof uuid, &u);
    int h = vgpu_hdev_of_uuid(uuid, total);
    if (h >= 0)
        atomic_store_explicit(&cudev_map[dev], h + 1, memory_order_release);
    return h;
}

int vgpu_hdev_attach(int hidx)
{
    if (hidx < 0)
        return -2;
    struct vgpu_hdev *d = &vgpu_hdevs[hidx];
    int slot = atomic_load_explicit(&d->slot, memory_order_acquire);
    if (slot >= 0)
        return slot;
    if (atomic_load(&d->refused))
        return -1;
    if (atomic_load(&vgpu_mode) != VGPU_MODE_REGISTERED)
        return -2;
    pthread_mutex_lock(&devmu);
    slot = atomic_load(&d->slot);
    if (slot < 0 && !atomic_load(&d->refused)) {
        int s = -1;
        int r = vgpu_client_attach(d->uuid, d->total, &s);
        if (r == VGPU_R_OK) {
            atomic_store_explicit(&d->slot, s, memory_order_release);
            slot = s;
        } else if (r == VGPU_R_REFUSED) {
            atomic_store(&d->refused, 1);
            slot = -1;
        } else if (r == VGPU_R_DENIED) {
            slot = -3; /* no memory for a context now; may succeed later */
        } else {
            slot = -2;
        }
    }
    pthread_mutex_unlock(&devmu);
    return slot;
}

struct vgpu_ctxinfo *vgpu_ctxinfo_get(CUcontext ctx, bool create)
{
    if (!ctx)
        return NULL;
    for (int i = 0; i < VGPU_MAX_CTX; i++)
        if (atomic_load_explicit(&vgpu_ctxs[i].ctx, memory_order_acquire) == ctx)
            return &vgpu_ctxs[i];
    if (!create)
        return NULL;
    /* Unknown context: it must be the current one (made before we were
     * loaded, or through an entry point we do not hook). */
    CUdevice dev;
    if (!real_cuCtxGetDevice || VGPU_DRIVER(real_cuCtxGetDevice(&dev)) != CUDA_SUCCESS)
        return NULL;
    int hidx = vgpu_hdev_of_cudev(dev);
    if (hidx < 0)
        return NULL;
    struct vgpu_ctxinfo *ci = NULL;
    pthread_mutex_lock(&devmu);
    for (int i = 0; i < VGPU_MAX_CTX && !ci; i++)
        if (atomic_load(&vgpu_ctxs[i].ctx) == ctx)
            ci = &vgpu_ctxs[i];
    for (int i = 0; i < VGPU_MAX_CTX && !ci; i++) {
        if (atomic_load(&vgpu_ctxs[i].ctx) == NULL) {
            ci = &vgpu_ctxs[i];
            ci->hidx = hidx;
            atomic_store(&ci->dead, 0);
            ci->priv_stream = NULL;
            ci->anchor_ev = NULL;
            ci->anchor_ns = ci->anchor_err = ci->anchor_taken = 0;
            atomic_store_explicit(&ci->ctx, ctx, memory_order_release);
        }
    }
    pthread_mutex_unlock(&devmu);
    if (!ci)
        vgpu_warn_once(VGPU_W_TABLE, "vgpu: more than %d contexts; launches in the others are not measured", VGPU_MAX_CTX);
    return ci;
}

int vgpu_current_hdev(void)
{
    CUcontext ctx = NULL;
    if (real_cuCtxGetCurrent && VGPU_DRIVER(real_cuCtxGetCurrent(&ctx)) == CUDA_SUCCESS && ctx) {
        struct vgpu_ctxinfo *ci = vgpu_ctxinfo_get(ctx, true);
        if (ci)
            return ci->hidx;
    }
    CUdevice dev;
    if (real_cuCtxGetDevice && VGPU_DRIVER(real_cuCtxGetDevice(&dev)) == CUDA_SUCCESS)
        return vgpu_hdev_of_cudev(dev);
    return -1;
}

void vgpu_clamp_mem(int hidx, uint64_t *free_b, uint64_t *total_b)
{
    int slot = vgpu_hdev_attach(hidx);
    struct vgpu_ctl_page *ctl = atomic_load_explicit(&vgpu_ctl, memory_order_acquire);
    if (slot < 0 || !ctl)
        return;
    uint64_t limit = __atomic_load_n(&ctl->dev[slot].mem_limit, __ATOMIC_RELAXED);
    uint64_t used = __atomic_load_n(&ctl->dev[slot].mem_used, __ATOMIC_RELAXED);
    if (limit == VGPU_UNLIMITED)
        return;
    if (*total_b > limit)
        *total_b = limit;
    uint64_t avail = limit > used ? limit - used : 0;
    if (*free_b > avail)
        *free_b = avail;
    if (*free_b > *total_b)
        *free_b = *total_b;
}

void vgpu_dev_atfork_child(void)
{
    pthread_mutex_init(&devmu, NULL);
    /* Slots belonged to the parent's connection; the child holds nothing. */
    int n = atomic_load(&vgpu_nr_hdev);
    for (int i = 0; i < n; i++) {
        atomic_store(&vgpu_hdevs[i].slot, -1);
        atomic_store(&vgpu_hdevs[i].refused, 0);
        atomic_store(&vgpu_hdevs[i].held, 0);
        vgpu_hdev_inflight_init(&vgpu_hdevs[i]); /* the parent's batches are not ours */
    }
    for (int i = 0; i < VGPU_MAX_CTX; i++)
        atomic_store(&vgpu_ctxs[i].ctx, NULL);
}

void vgpu_ctxinfo_note(CUcontext ctx, int hidx)
{
    if (!ctx || hidx < 0)
        return;
    if (vgpu_ctxinfo_get(ctx, false))
        return;
    pthread_mutex_lock(&devmu);
    bool have = false;
    for (int i = 0; i < VGPU_MAX_CTX && !have; i++)
        have = atomic_load(&vgpu_ctxs[i].ctx) == ctx;
    for (int i = 0; i < VGPU_MAX_CTX && !have; i++) {
        struct vgpu_ctxinfo *ci = &vgpu_ctxs[i];
        if (atomic_load(&ci->ctx) == NULL) {
            ci->hidx = hidx;
            atomic_store(&ci->dead, 0);
            ci->priv_stream = NULL;
            ci->anchor_ev = NULL;
            ci->anchor_ns = ci->anchor_err = ci->anchor_taken = 0;
            atomic_store_explicit(&ci->ctx, ctx, memory_order_release);
            have = true;
        }
    }
    pthread_mutex_unlock(&devmu);
}
