/*
 * sim_control.c - the control surface for tests (vgpu_sim.h): per-process and
 * per-device statistics read from the shared device, and a reset.
 */
#include "sim_internal.h"

/* ---- control surface for tests ---- */
static struct sim_shm *ctl_map(void)
{
    const char *name = getenv("VGPU_SIM_SHM");
    return sim_shm_map_existing(name && *name ? name : "vgpu-sim");
}

int vgpuSimMemorySum(const int *pids, int n, uint64_t *mem_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL || n < 0 || (n > 0 && !pids) || !mem_bytes)
        return -1;
    uint64_t total = 0;
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    for (int k = 0; k < n; k++) {
        int slot = sim_proc_slot_locked(s, pids[k], false);
        if (slot >= 0)
            for (int d = 0; d < SIM_MAX_DEVS; d++)
                total += s->proc[slot].mem[d];
    }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    *mem_bytes = total;
    return 0;
}

/* pid's busy time and memory on device dev (physical), or summed over
 * every device when dev < 0. */
static int process_stats(int pid, int dev, uint64_t *busy_ns, uint64_t *mem_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    if (dev >= SIM_MAX_DEVS) {
        sim_shm_detach(s);
        return -1;
    }
    if (pid <= 0)
        pid = getpid();
    sim_lock(&s->table_mu);
    sim_reap_locked(s);
    int slot = sim_proc_slot_locked(s, pid, false);
    if (slot < 0) /* a dead process keeps its busy time */
        for (int i = 0; i < SIM_MAX_PROCS; i++)
            if (s->proc[i].pid == pid)
                slot = i;
    uint64_t busy = 0, mem = 0;
    if (slot >= 0)
        for (int d = 0; d < SIM_MAX_DEVS; d++) {
            if (dev >= 0 && d != dev)
                continue;
            busy += __atomic_load_n(&s->proc[slot].busy[d], __ATOMIC_RELAXED);
            mem += s->proc[slot].mem[d];
        }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    if (slot < 0)
        return -1;
    if (busy_ns)
        *busy_ns = busy;
    if (mem_bytes)
        *mem_bytes = mem;
    return 0;
}

int vgpuSimProcessStats(int pid, uint64_t *busy_ns, uint64_t *mem_bytes)
{
    return process_stats(pid, -1, busy_ns, mem_bytes);
}

int vgpuSimProcessDeviceStats(int pid, int dev, uint64_t *busy_ns, uint64_t *mem_bytes)
{
    if (dev < 0)
        return -1;
    return process_stats(pid, dev, busy_ns, mem_bytes);
}

int vgpuSimDeviceStats(int dev, uint64_t *busy_ns, uint64_t *used_bytes, uint64_t *total_bytes)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    int rc = -1;
    if (dev >= 0 && (uint32_t)dev < s->ndev) {
        if (busy_ns)
            *busy_ns = __atomic_load_n(&s->dev[dev].busy_total, __ATOMIC_RELAXED);
        if (used_bytes)
            *used_bytes = sim_mem_used(s, dev);
        if (total_bytes)
            *total_bytes = s->total_mem;
        rc = 0;
    }
    sim_shm_detach(s);
    return rc;
}

int vgpuSimReset(void)
{
    struct sim_shm *s = ctl_map();
    if (s == NULL)
        return -1;
    sim_lock(&s->table_mu);
    for (int i = 0; i < SIM_MAX_PROCS; i++) {
        struct sim_proc *p = &s->proc[i];
        for (int d = 0; d < SIM_MAX_DEVS; d++)
            __atomic_store_n(&p->busy[d], 0, __ATOMIC_RELAXED);
        memset(p->hist, 0, sizeof p->hist);
        memset(p->hist_pos, 0, sizeof p->hist_pos);
    }
    for (int d = 0; d < SIM_MAX_DEVS; d++) {
        __atomic_store_n(&s->dev[d].busy_total, 0, __ATOMIC_RELAXED);
        memset(s->dev[d].hist, 0, sizeof s->dev[d].hist);
        s->dev[d].hist_pos = 0;
    }
    sim_unlock(&s->table_mu);
    sim_shm_detach(s);
    return 0;
}
