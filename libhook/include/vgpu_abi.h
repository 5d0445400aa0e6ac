/*
 * vgpu_abi.h - every constant and struct shared between libvgpu-hook.so
 * (C, inside CUDA programs) and vgpud (Python, through cffi in API mode).
 *
 * This is the one truth for the boundary: the daemon's cffi module compiles
 * against this header, so a field that moves breaks the build instead of
 * corrupting a client, and tests/test_abi.py asserts every offset below.
 * All fields are fixed-width; all structs are padded by hand to 8-byte
 * multiples, and the per-device blocks to whole cache lines so a daemon
 * write to one device never shares a line with a client's counters.
 *
 * Two shared-memory regions exist per client connection, both memfds made
 * by the daemon and passed with SCM_RIGHTS in the welcome message:
 *
 *   ctl  (struct vgpu_ctl_page): written by the daemon only. The client gets
 *        a read-only file description, so it cannot raise its own budget.
 *   stat (struct vgpu_stat_page): written by the client only (counters and
 *        measured GPU busy intervals); the daemon reads it every tick.
 */
#ifndef VGPU_ABI_H
#define VGPU_ABI_H

#include <stdint.h>

/* ---- wire protocol (docs/protocol.md) ---- */
#define VGPU_PROTO_VERSION 1u
#define VGPU_FRAME_HEADER 4u         /* big-endian uint32 length prefix */
#define VGPU_MAX_FRAME 65536u        /* largest msgpack body accepted */
#define VGPU_DEFAULT_SOCKET "/run/vgpu/vgpud.sock"
#define VGPU_HOOK_CONF "/etc/vgpu/hook.conf"

/*
 * The codes an {t:"error", code} may carry, X(NAME, "code"): the one list.
 * The daemon reads it through cffi (vgpu_cgroup._protocol.ERROR_CODES, which
 * its Error messages are checked against) and the hook matches what it
 * receives against it; docs/protocol.md says what each means.
 */
#define VGPU_ERROR_CODES(X)                                                    \
    X(FRAME, "frame")                                                          \
    X(DECODE, "decode")                                                        \
    X(ORDER, "order")                                                          \
    X(TYPE, "type")                                                            \
    X(VERSION, "version")                                                      \
    X(DEVICE, "device")                                                        \
    X(OOM, "oom")                                                              \
    X(PERMISSION, "permission")                                                \
    X(NOTFOUND, "notfound")                                                    \
    X(INVALID, "invalid")                                                      \
    X(INTERNAL, "internal")                                                    \
    X(LIMIT, "limit")

enum vgpu_error_code {
#define VGPU_ERR_ENUM_(name, text) VGPU_ERR_##name,
    VGPU_ERROR_CODES(VGPU_ERR_ENUM_)
#undef VGPU_ERR_ENUM_
    VGPU_NR_ERROR_CODES
};

/* The text of a code; NULL outside 0..VGPU_NR_ERROR_CODES-1. */
static inline const char *vgpu_error_code_name(int code)
{
    switch (code) {
#define VGPU_ERR_CASE_(name, text) case VGPU_ERR_##name: return text;
    VGPU_ERROR_CODES(VGPU_ERR_CASE_)
#undef VGPU_ERR_CASE_
    default: return (const char *)0;
    }
}

/* The code of a text (NUL-terminated); -1 if it is none of them. */
static inline int vgpu_error_code_of(const char *text)
{
    for (int i = 0; text && i < VGPU_NR_ERROR_CODES; i++) {
        const char *a = vgpu_error_code_name(i), *b = text;
        while (*a && *a == *b)
            a++, b++;
        if (!*a && !*b)
            return i;
    }
    return -1;
}

/* ---- shared memory ---- */
#define VGPU_SHM_MAGIC 0x55504756u   /* "VGPU" little-endian */
#define VGPU_ABI_VERSION 2u
#define VGPU_MAX_DEVICES 16u
#define VGPU_RING_SLOTS 512u         /* busy intervals per device, power of 2 */
#define VGPU_UNLIMITED UINT64_MAX    /* "max" in a uint64 field */

/* vgpu_ctl_dev.flags */
#define VGPU_DEV_ACTIVE 0x1u         /* slot assigned to a device */
#define VGPU_DEV_UNLIMITED 0x2u      /* no gating: nothing on the device asks for shares */
#define VGPU_DEV_CONTENDED 0x4u      /* other slices use the device: report idleness fast */

/*
 * vgpu_ctl_dev.grant: the launch gate of a gated slot, and its futex word.
 * Bits 0-1 are the state, bits 2-31 a generation the daemon bumps with every
 * change, so a thread that waits on the word it read never misses one.
 *
 *   WAIT  another slice owns the device: say so (`want`) and wait
 *   RUN   this process's slice owns the device: launch
 *   TAKE  the daemon would hand the device over the moment this slice asks:
 *         launch at once, and say so (`want`)
 *   HOLD  as RUN, but a neighbour that wakes on a schedule is due: what this
 *         process queues must have run by hold_end_ns (launch only what the
 *         hook's estimate of its queue says fits), and from hold_until_ns on
 *         launch freely again (the neighbour is late). A hook that does not
 *         know the state launches, as for RUN.
 *
 * A slice owns a device for a window; the daemon charges it the windows it
 * owned (docs/design.md, "Compute").
 */
#define VGPU_GRANT_WAIT 0u
#define VGPU_GRANT_RUN 1u
#define VGPU_GRANT_TAKE 2u
#define VGPU_GRANT_HOLD 3u
#define VGPU_GRANT_STATE_MASK 3u
#define VGPU_GRANT_GEN_SHIFT 2u

/*
 * Per device, daemon-written. The hook's launch fast path reads flags and
 * grant with acquire loads, and inflight_ns through the accountant.
 */
struct vgpu_ctl_dev {
    uint32_t grant;         /* VGPU_GRANT_* | generation << 2; futex word */
    uint32_t flags;         /* VGPU_DEV_* */
    uint64_t mem_limit;     /* effective gpu.memory.max over all ancestors */
    uint64_t mem_used;      /* the limiting slice's current usage */
    uint64_t rate_ppm;      /* the slice's current share of one GPU, parts per million */
    uint64_t inflight_ns;   /* GPU time an owner may keep queued; 0: no bound */
    uint64_t hold_end_ns;   /* HOLD: queued work must have run by then (CLOCK_MONOTONIC) */
    uint64_t hold_until_ns; /* HOLD: launch freely from then on */
    uint64_t _pad1[1];
};                          /* 64 bytes */

struct vgpu_ctl_page {
    uint32_t magic;         /* VGPU_SHM_MAGIC */
    uint32_t abi_version;   /* VGPU_ABI_VERSION */
    uint64_t seq;           /* bumped by each control tick that publishes here */
    uint64_t tick_ns;       /* the daemon's control period */
    uint64_t daemon_epoch;  /* changes when the daemon restarts */
    uint64_t heartbeat;     /* the daemon's tick count, written every tick while
                               a slot of this client waits: a waiting hook that
                               sees it stop knows the daemon is stalled */
    uint64_t _pad[3];
    struct vgpu_ctl_dev dev[VGPU_MAX_DEVICES];
};                          /* 64 + 16*64 = 1088 bytes */

/* A span during which the client had work on the GPU, CLOCK_MONOTONIC ns. */
struct vgpu_interval {
    uint64_t start_ns;
    uint64_t end_ns;
};

/*
 * Per device, client-written. Counters only grow. ring_head counts every
 * interval ever published: the writer fills ring[head % SLOTS] and then
 * stores head + 1 with release order; the reader loads head with acquire.
 */
struct vgpu_stat_dev {
    uint64_t launches;        /* kernel launches of every kind, graphs included */
    uint64_t graph_launches;  /* of which cuGraphLaunch */
    uint64_t throttled_ns;    /* time launching threads spent waiting for the device */
    uint64_t nr_throttled;    /* launches that had to wait */
    uint64_t busy_ns;         /* sum of published interval lengths */
    uint64_t ring_head;
    uint64_t allocs;          /* successful allocations on this device */
    uint64_t frees;           /* frees on this device */
    uint64_t cost_ns;         /* measured GPU time per launch (moving average) */
    uint64_t _pad[7];
    struct vgpu_interval ring[VGPU_RING_SLOTS];
};                            /* 128 + 512*16 = 8320 bytes */

struct vgpu_stat_page {
    uint32_t magic;
    uint32_t abi_version;
    uint32_t pid;             /* as the client sees itself (informational) */
    uint32_t _pad0;
    uint64_t _pad[6];
    struct vgpu_stat_dev dev[VGPU_MAX_DEVICES];
};                            /* 64 + 16*8320 bytes */

#endif /* VGPU_ABI_H */
