/*
 * sim_shm.h - the simulated device's shared state (internal to libhook/sim).
 *
 * Every process on the machine that loads the simulated libcuda or libnvidia-ml
 * maps one POSIX shm object (env VGPU_SIM_SHM, default "vgpu-sim"). It holds
 * what a real GPU holds for all processes at once: memory in use per process,
 * the time-slice lock, and per-process busy time (the ground truth the tests
 * measure shares against). Both libraries compile this unit in privately.
 */
#ifndef VGPU_SIM_SHM_H
#define VGPU_SIM_SHM_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SIM_MAGIC 0x4d495356u /* "VSIM" */
#define SIM_LAYOUT_VERSION 1u
#define SIM_MAX_DEVS 8
#define SIM_MAX_PROCS 256
#define SIM_HIST 32      /* busy-time snapshots kept per process and device */
#define SIM_QUEUE 256    /* waiters for the device, FIFO */
#define SIM_SNAP_NS 10000000ull /* at most one snapshot per 10 ms */

struct sim_snap {
    uint64_t t_ns;    /* CLOCK_REALTIME */
    uint64_t busy_ns; /* cumulative busy time at t_ns */
};

struct sim_proc {
    int32_t pid;
    uint32_t alive;
    uint64_t mem[SIM_MAX_DEVS];
    uint64_t busy[SIM_MAX_DEVS];
    uint32_t hist_pos[SIM_MAX_DEVS];
    struct sim_snap hist[SIM_MAX_DEVS][SIM_HIST];
};

struct sim_waiter {
    int32_t pid;
    uint32_t wake;  /* futex word: bumped when this waiter is at the head */
    uint64_t token;
};

struct sim_dev {
    pthread_mutex_t mu;     /* robust, process-shared; short critical sections only */
    uint32_t seq;           /* futex word: bumped whenever the device may have changed hands */
    uint32_t held;
    int32_t holder_pid;
    uint32_t qhead, qtail;  /* waiter ring indices (monotonic, mod SIM_QUEUE) */
    uint32_t pad;
    uint64_t holder_token;
    uint64_t next_token;
    struct sim_waiter q[SIM_QUEUE];
    uint64_t busy_total;
    uint32_t hist_pos;
    uint32_t pad2;
    struct sim_snap hist[SIM_HIST];
};

struct sim_shm {
    uint32_t magic;
    uint32_t version;
    uint32_t ready;
    uint32_t ndev;
    uint64_t total_mem;
    pthread_mutex_t table_mu; /* robust, process-shared: guards proc[] */
    struct sim_dev dev[SIM_MAX_DEVS];
    struct sim_proc proc[SIM_MAX_PROCS];
};

/* Maps the object named by VGPU_SIM_SHM, creating it if needed. NULL on failure. */
struct sim_shm *sim_shm_attach(void);
/* Maps (creating if needed) the object with this name, uncached; sim_shm_detach() to unmap. */
struct sim_shm *sim_shm_open_named(const char *name);
/* Maps an existing object by name without creating it; sim_shm_detach() to unmap. */
struct sim_shm *sim_shm_map_existing(const char *name);
void sim_shm_detach(struct sim_shm *s);
const char *sim_shm_name(void);

uint64_t sim_now_ns(void);      /* CLOCK_MONOTONIC */
uint64_t sim_realtime_ns(void); /* CLOCK_REALTIME */
uint64_t sim_parse_size(const char *s, uint64_t dflt);
uint64_t sim_env_u64(const char *name, uint64_t dflt);

void sim_lock(pthread_mutex_t *m);
void sim_unlock(pthread_mutex_t *m);
bool sim_pid_alive(int pid);

/* Both under table_mu. */
void sim_reap_locked(struct sim_shm *s);
int sim_proc_slot_locked(struct sim_shm *s, int pid, bool create);

/* Memory: 0 on success, -1 when the device is full. */
int sim_mem_charge(struct sim_shm *s, int dev, uint64_t n);
void sim_mem_uncharge(struct sim_shm *s, int dev, uint64_t n);
uint64_t sim_mem_used(struct sim_shm *s, int dev);

/* Time-slice lock: returns a token that sim_dev_release() needs. */
uint64_t sim_dev_acquire(struct sim_shm *s, int dev);
void sim_dev_release(struct sim_shm *s, int dev, uint64_t token);
bool sim_dev_has_waiters(struct sim_shm *s, int dev);
void sim_account_busy(struct sim_shm *s, int dev, uint64_t ns);

void sim_uuid_bytes(const char *shm_name, int dev, unsigned char out[16]);
void sim_uuid_string(const char *shm_name, int dev, char *buf, size_t len);

#define SIM_DEVICE_NAME "vgpu simulated GPU"

#endif
