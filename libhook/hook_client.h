/*
 * hook_client.h - layer 1 of libvgpu-hook.so, the transport: everything that
 * crosses the socket to vgpud (see hook_base.h for the layers).
 *
 *   hook_msgpack.c  the minimal msgpack encoder/decoder (pure)
 *   hook_wire.c     framing, reply decoding, the socket and the shared
 *                   regions' mappings: functions of a descriptor, no state
 *   hook_client.c   the connection: handshake, round trips, one-way frames,
 *                   releases that wait for room, the monitor thread that
 *                   reconnects after a daemon restart
 *
 * Uses only layer 0. The launch fast path never calls into this layer: it
 * reads the ctl page mapped at registration (vgpu_ctl) and writes the stat
 * page (vgpu_stat_dev).
 */
#ifndef VGPU_HOOK_CLIENT_H
#define VGPU_HOOK_CLIENT_H

#include "hook_base.h"

#pragma GCC visibility push(hidden)

/* ---------------------------------------------------------------------- */
/* hook_msgpack.c: a writer into a fixed buffer and a reader over one.      */

struct mp_w {
    uint8_t *p;
    size_t len, cap;
    bool overflow;
};
void mp_map(struct mp_w *w, uint32_t n);
void mp_array(struct mp_w *w, uint32_t n);
void mp_str(struct mp_w *w, const char *s);
void mp_uint(struct mp_w *w, uint64_t v);
void mp_int(struct mp_w *w, int64_t v);
void mp_nil(struct mp_w *w);
void mp_bool(struct mp_w *w, bool b);

struct mp_r {
    const uint8_t *p;
    size_t len, pos;
    bool err;
};
enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_UINT, MP_STR, MP_ARRAY, MP_MAP, MP_OTHER, MP_ERR };
enum mp_type mp_peek(struct mp_r *r);
bool mp_read_map(struct mp_r *r, uint32_t *n);
bool mp_read_array(struct mp_r *r, uint32_t *n);
/* str: pointer into the buffer, not NUL-terminated. */
bool mp_read_str(struct mp_r *r, const char **s, uint32_t *n);
/* any integer that fits int64 (uint > INT64_MAX fails) */
bool mp_read_int(struct mp_r *r, int64_t *v);
bool mp_read_nil(struct mp_r *r);
bool mp_skip(struct mp_r *r);

/* ---------------------------------------------------------------------- */
/* hook_wire.c: frames and replies (for hook_client.c).                     */

/* Largest request or small reply, bytes of msgpack. */
#define VGPU_BUF_CAP 4096

/* Milliseconds from now until deadline (CLOCK_MONOTONIC ns), 0 if past. */
int vgpu_remaining_ms(uint64_t deadline);
/* The 4-byte big-endian length header of a frame of `body` bytes. */
size_t vgpu_frame_header(uint8_t *out, size_t body);
/* Write w's bytes as one frame on a blocking socket. */
bool vgpu_send_frame(int fd, const struct mp_w *w);

/* One received frame: small ones (every reply but a `denied` naming a very
 * long slice path) in place, larger ones up to VGPU_MAX_FRAME on the heap,
 * sized from the header. */
struct vgpu_rx {
    uint8_t *p;
    size_t len;
    uint8_t small[VGPU_BUF_CAP];
};
/* Read one frame before deadline, collecting up to two SCM_RIGHTS fds when
 * fds is given. false with errno set (ETIMEDOUT, ECONNRESET, EPROTO...). */
bool vgpu_recv_frame(int fd, struct vgpu_rx *rx, uint64_t deadline, int *fds, int *nfds);
void vgpu_rx_done(struct vgpu_rx *rx);

/* A decoded reply; fields the reply lacks are "" or -1 (id, slot). */
struct vgpu_wire_reply {
    char t[16];
    int64_t id;
    int64_t slot;
    int64_t tick_ns, epoch;
    char code[16];
    char msg[160];
    char slice[256];
    int64_t limit, current;
    /* welcome: the devices the slice may use (docs/protocol.md); -1 when
     * the welcome has no list (every device). Entries past
     * VGPU_MAX_DEVICES, and any that is not a string short enough for a
     * UUID, are left out and counted in devices_dropped. */
    int ndevices;
    int devices_dropped;
    char devices[VGPU_MAX_DEVICES][VGPU_UUID_MAX];
};
/* Decode one reply map; unknown keys are skipped. false if malformed. */
bool vgpu_parse_reply(const uint8_t *buf, size_t len, struct vgpu_wire_reply *out);
/* The VGPU_ERR_* code of an error reply (vgpu_abi.h's table); -1, said
 * once, for a code this hook does not know. */
int vgpu_reply_code(const struct vgpu_wire_reply *rep);

/* A connected Unix stream socket to path, or -errno. */
int vgpu_connect_unix(const char *path);
/* mmap a shared region received as an fd (size checked), or NULL. */
void *vgpu_map_region(int fd, size_t size, int prot);

/* ---------------------------------------------------------------------- */
/* hook_client.c: the connection to vgpud.                                  */

/* Try to register (connect + hello + welcome + mmap) within the configured
 * timeout. true on success. Called with the init mutex held. */
bool vgpu_client_register(void);
/* Current shared pages (NULL if never registered). Swapped atomically on
 * reconnect; old mappings stay mapped. */
extern _Atomic(struct vgpu_ctl_page *) vgpu_ctl;
extern _Atomic(struct vgpu_stat_page *) vgpu_stat;
extern _Atomic int vgpu_connected;    /* 1 while the daemon connection is up */
extern _Atomic uint64_t vgpu_conn_gen; /* bumped on every (re)registration */

enum vgpu_reply { VGPU_R_OK = 0, VGPU_R_DENIED, VGPU_R_REFUSED, VGPU_R_DOWN };
/* The devices the slice may use, as the last welcome listed them (UUIDs,
 * in the node's order): how many, copied into out (at most cap), or -1
 * when the slice may use every device of the node or there has been no
 * welcome. */
int vgpu_client_devices(char (*out)[VGPU_UUID_MAX], int cap);
/* attach: slot out; mem_limit ignored (read from ctl). */
int vgpu_client_attach(const char *uuid, uint64_t total, int *slot);
/* reserve n bytes on device hidx (its current slot); waits up to 10 s for a
 * reconnect if down. */
int vgpu_client_reserve(int hidx, uint64_t n);
/* Give back n bytes reserved on device hidx and never counted in its held
 * (a reservation rolled back): no reply, and never waits behind a round trip
 * or for a socket with no room (what cannot go now goes with the next frame,
 * or the next hello's held covers it). */
void vgpu_client_release(int hidx, uint64_t n);
/* The same for n bytes counted in vgpu_hdevs[hidx].held (a free): held goes
 * down with the release, atomically with respect to a reconnect's hello. */
void vgpu_client_free(int hidx, uint64_t n);
/* Send one complete, already framed message (4-byte big-endian length, then
 * that many bytes of msgpack) that expects no reply. Callable from any
 * thread, hook service threads included (not async-signal-safe). Never
 * waits behind a pending round trip and takes bounded time (a few µs
 * normally, at most tens of ms): it writes without blocking, all of the
 * frame or nothing. false when there is no connection (or a reconnect has
 * not re-attached the devices yet), when frame is not exactly one frame, or
 * when the socket cannot take it now (counted in
 * vgpu_client_oneway_dropped). A frame naming a slot may meet a reconnect
 * that renumbered it: read the slot just before building the frame. */
bool vgpu_client_send_oneway(const uint8_t *frame, size_t len);
/* One-way frames (and attempts to flush releases) that found no room. */
uint64_t vgpu_client_oneway_dropped(void);
/* fork child: forget the connection and threads. */
void vgpu_client_atfork_child(void);

/* Tell vgpud about this process's work on device slot `slot`, one-way and
 * never waiting behind a round trip: it has work (`want`); its work has
 * drained and it launches nothing (`idle`); what it had queued when it lost
 * the device has finished (`drained`). false if it could not be sent. */
enum vgpu_note { VGPU_NOTE_WANT, VGPU_NOTE_IDLE, VGPU_NOTE_DRAINED };
bool vgpu_client_notify(int slot, enum vgpu_note what);

/* Stat page helpers. */
static inline struct vgpu_stat_dev *vgpu_stat_dev(int slot)
{
    struct vgpu_stat_page *s = atomic_load_explicit(&vgpu_stat, memory_order_acquire);
    if (!s || slot < 0 || slot >= (int)VGPU_MAX_DEVICES)
        return NULL;
    return &s->dev[slot];
}
static inline void vgpu_stat_add(int slot, size_t off, uint64_t v)
{
    struct vgpu_stat_dev *d = vgpu_stat_dev(slot);
    if (d)
        __atomic_fetch_add((uint64_t *)((char *)d + off), v, __ATOMIC_RELAXED);
}
#define VGPU_STAT_ADD(slot, field, v) \
    vgpu_stat_add((slot), offsetof(struct vgpu_stat_dev, field), (v))

#pragma GCC visibility pop

#endif /* VGPU_HOOK_CLIENT_H */
