/*
 * vgpu_sim.h - the simulated GPU's control surface for tests.
 *
 * Exported from the simulated libcuda.so.1 next to the cu* entry points.
 * Every call maps the shm object named by VGPU_SIM_SHM *at call time*, so a
 * test process can inspect any simulated device, including one it never
 * initialised CUDA on. They need no cuInit and work in a forked child.
 * All return 0 on success and -1 when the object or pid is unknown.
 */
#ifndef VGPU_SIM_H
#define VGPU_SIM_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Device time spent on pid's kernels and memory it holds, summed over devices.
 * pid <= 0 means the caller. A dead process keeps its busy time (memory 0)
 * until its table slot is recycled. */
int vgpuSimProcessStats(int pid, uint64_t *busy_ns, uint64_t *mem_bytes);

/* The same on one device, by its physical index (NVML's index, whatever
 * CUDA_VISIBLE_DEVICES the process had). */
int vgpuSimProcessDeviceStats(int pid, int dev, uint64_t *busy_ns, uint64_t *mem_bytes);

/* Memory held by all of `pids` together, read in one critical section: a
 * consistent snapshot, so a sum over several processes never counts memory
 * one freed and another then got. Unknown or dead pids count 0. */
int vgpuSimMemorySum(const int *pids, int n, uint64_t *mem_bytes);

/* Total busy time of a device (physical index) and its memory in use (dead processes reaped) and total. */
int vgpuSimDeviceStats(int dev, uint64_t *busy_ns, uint64_t *used_bytes, uint64_t *total_bytes);

/* Zeroes busy-time counters and utilization history; memory accounting is kept. */
int vgpuSimReset(void);

#ifdef __cplusplus
}
#endif

#endif /* VGPU_SIM_H */
