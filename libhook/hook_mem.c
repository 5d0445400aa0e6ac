/*
 * hook_mem.c - the steps of every allocation path (hook_alloc.c has the
 * entry points): reserve with the daemon first, call the driver, give the
 * reservation back if the driver fails, remember handle -> (bytes, device)
 * so the matching free releases exactly that.
 *
 * Reserving before allocating makes admission exact under concurrency: the
 * daemon is the single writer of every slice's usage, so no interleaving of
 * processes can push a slice past its max (check-then-allocate cannot race).
 */
#include <stdlib.h>

#include "hook_services.h"

struct alloc {
    struct alloc *next;
    uint64_t key;
    int kind;
    int hidx;
    uint64_t bytes;
};

#define NBUCKET 4096
static struct alloc *buckets[NBUCKET];
static pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER;

static unsigned bucket_of(int kind, uint64_t key)
{
    uint64_t h = (key ^ ((uint64_t)kind << 56)) * 0x9e3779b97f4a7c15ull;
    return (unsigned)(h >> 52) & (NBUCKET - 1);
}

static bool table_put(int kind, uint64_t key, int hidx, uint64_t bytes)
{
    struct alloc *a = malloc(sizeof *a);
    if (!a) {
        vgpu_warn_once(VGPU_W_TABLE, "vgpu: out of host memory for the allocation table");
        return false;
    }
    a->key = key;
    a->kind = kind;
    a->hidx = hidx;
    a->bytes = bytes;
    unsigned b = bucket_of(kind, key);
    pthread_mutex_lock(&tmu);
    a->next = buckets[b];
    buckets[b] = a;
    pthread_mutex_unlock(&tmu);
    return true;
}

static bool table_take(int kind, uint64_t key, int *hidx, uint64_t *bytes)
{
    unsigned b = bucket_of(kind, key);
    bool found = false;
    pthread_mutex_lock(&tmu);
    for (struct alloc **pp = &buckets[b]; *pp; pp = &(*pp)->next) {
        struct alloc *a = *pp;
        if (a->kind == kind && a->key == key) {
            *pp = a->next;
            *hidx = a->hidx;
            *bytes = a->bytes;
            free(a);
            found = true;
            break;
        }
    }
    pthread_mutex_unlock(&tmu);
    return found;
}

void vgpu_mem_atfork_child(void)
{
    /* The parent's allocations are not the child's: forget them (the nodes
     * leak, by design: another parent thread may have held tmu). */
    pthread_mutex_init(&tmu, NULL);
    for (int i = 0; i < NBUCKET; i++)
        buckets[i] = NULL;
}

/* ---- the reserve / commit / rollback steps ---- */

CUresult vgpu_mem_reserve(int mode, int hidx, uint64_t n, struct vgpu_resv *rv)
{
    rv->hidx = -1;
    rv->n = 0;
    if (mode != VGPU_MODE_REGISTERED || hidx < 0)
        return CUDA_SUCCESS;
    int slot = vgpu_hdev_attach(hidx);
    if (slot == -1)
        return CUDA_ERROR_INVALID_DEVICE;
    if (slot == -3)
        return CUDA_ERROR_OUT_OF_MEMORY;
    rv->hidx = hidx;
    if (n == 0)
        return CUDA_SUCCESS;
    int r = vgpu_client_reserve(hidx, n);
    if (r != VGPU_R_OK) {
        rv->hidx = -1;
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    rv->n = n;
    return CUDA_SUCCESS;
}

void vgpu_mem_rollback(struct vgpu_resv *rv)
{
    if (rv->hidx >= 0 && rv->n)
        vgpu_client_release(rv->hidx, rv->n);
    rv->hidx = -1;
    rv->n = 0;
}

void vgpu_mem_commit(struct vgpu_resv *rv, int kind, uint64_t key)
{
    if (rv->hidx < 0)
        return;
    if (!table_put(kind, key, rv->hidx, rv->n)) {
        /* Cannot remember it: keep the reservation (it is really allocated)
         * and let the connection close give it back. */
        return;
    }
    atomic_fetch_add(&vgpu_hdevs[rv->hidx].held, rv->n);
    int slot = atomic_load(&vgpu_hdevs[rv->hidx].slot);
    VGPU_STAT_ADD(slot, allocs, 1);
}

void vgpu_mem_forget(int kind, uint64_t key)
{
    int hidx;
    uint64_t n;
    if (!table_take(kind, key, &hidx, &n))
        return;
    int slot = atomic_load(&vgpu_hdevs[hidx].slot);
    VGPU_STAT_ADD(slot, frees, 1);
    vgpu_client_free(hidx, n);
}

int vgpu_mem_cur_hdev(int mode)
{
    return mode == VGPU_MODE_REGISTERED ? vgpu_current_hdev() : -1;
}
