"""cffi builder for vgpu_cgroup._wire._abi: the daemon's view of libhook's header.

API mode: the C compiler checks every field we declare against the real
header, so the Python and C sides cannot silently disagree on a layout.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
INCLUDE = os.path.join(ROOT, "libhook", "include")

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define VGPU_PROTO_VERSION ...
    #define VGPU_FRAME_HEADER ...
    #define VGPU_MAX_FRAME ...
    #define VGPU_SHM_MAGIC ...
    #define VGPU_ABI_VERSION ...
    #define VGPU_MAX_DEVICES ...
    #define VGPU_RING_SLOTS ...
    #define VGPU_DEV_ACTIVE ...
    #define VGPU_DEV_UNLIMITED ...
    #define VGPU_DEV_CONTENDED ...
    #define VGPU_GRANT_WAIT ...
    #define VGPU_GRANT_RUN ...
    #define VGPU_GRANT_TAKE ...
    #define VGPU_GRANT_HOLD ...
    #define VGPU_GRANT_STATE_MASK ...
    #define VGPU_GRANT_GEN_SHIFT ...
    #define VGPU_NR_ERROR_CODES ...
    const char *vgpu_error_code_name(int code);

    struct vgpu_ctl_dev {
        uint32_t grant;
        uint32_t flags;
        uint64_t mem_limit;
        uint64_t mem_used;
        uint64_t rate_ppm;
        uint64_t inflight_ns;
        uint64_t hold_end_ns;
        uint64_t hold_until_ns;
        ...;
    };
    struct vgpu_ctl_page {
        uint32_t magic;
        uint32_t abi_version;
        uint64_t seq;
        uint64_t tick_ns;
        uint64_t daemon_epoch;
        uint64_t heartbeat;
        struct vgpu_ctl_dev dev[16];
        ...;
    };
    struct vgpu_interval {
        uint64_t start_ns;
        uint64_t end_ns;
    };
    struct vgpu_stat_dev {
        uint64_t launches;
        uint64_t graph_launches;
        uint64_t throttled_ns;
        uint64_t nr_throttled;
        uint64_t busy_ns;
        uint64_t ring_head;
        uint64_t allocs;
        uint64_t frees;
        uint64_t cost_ns;
        struct vgpu_interval ring[512];
        ...;
    };
    struct vgpu_stat_page {
        uint32_t magic;
        uint32_t abi_version;
        uint32_t pid;
        struct vgpu_stat_dev dev[16];
        ...;
    };

    /* The gate's word is written with release order (after the fields it
     * publishes) and waiters on it are woken: a shared futex, since the
     * client maps the same memfd. */
    void vgpu_store_release_u32(uint32_t *p, uint32_t v);
    int vgpu_futex_wake(uint32_t *p);
    """
)
ffibuilder.set_source(
    "vgpu_cgroup._wire._abi",
    '#include "vgpu_abi.h"\n'
    "#include <limits.h>\n"
    "#include <linux/futex.h>\n"
    "#include <sys/syscall.h>\n"
    "#include <unistd.h>\n"
    "static void vgpu_store_release_u32(uint32_t *p, uint32_t v)\n"
    "{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }\n"
    "static int vgpu_futex_wake(uint32_t *p)\n"
    "{ return (int)syscall(SYS_futex, p, FUTEX_WAKE, INT_MAX, NULL, NULL, 0); }\n"
    "_Static_assert(VGPU_MAX_DEVICES == 16, \"cdef array sizes\");\n"
    "_Static_assert(VGPU_RING_SLOTS == 512, \"cdef array sizes\");\n",
    include_dirs=[INCLUDE],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=ROOT, verbose=False)
