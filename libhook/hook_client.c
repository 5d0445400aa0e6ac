/*
 * hook_client.c - the connection to vgpud: handshake, requests, and the
 * monitor thread that notices a daemon restart and reconnects (frames and
 * replies themselves are hook_wire.c's).
 *
 * One round trip is in flight per process (cmu): reservations are not a hot
 * path and a single in-order stream keeps reply matching trivial. cmu is held
 * while a reply is awaited, which is up to 30 s when the daemon hangs, so
 * nothing that must not wait takes it: one-way messages (releases, and any
 * frame given to vgpu_client_send_oneway) take only smu, which is held just
 * around a non-blocking write of one whole frame. A frame the socket cannot
 * take now is not waited for: a release is kept in `unsent` and sent with
 * the next frame that goes out (or by the monitor within 100 ms), and a
 * reconnect's hello declares what is still held, which covers it.
 *
 * Locks, always taken in this order: cmu (round trips, handshakes,
 * reconnects), smu (writes and changes of cfd), hmu (held/unsent pairs).
 * The launch fast path never comes here; it only reads the ctl page mapped
 * at registration.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "hook_client.h"

_Atomic(struct vgpu_ctl_page *) vgpu_ctl;
_Atomic(struct vgpu_stat_page *) vgpu_stat;
_Atomic int vgpu_connected;
_Atomic uint64_t vgpu_conn_gen;

static pthread_mutex_t cmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t smu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t hmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t up_cv;
static int cfd = -1;              /* written under cmu and smu; read under either */
static bool slots_ok;             /* smu: vgpu_hdevs' slots belong to cfd's connection */
static uint32_t next_id = 1;      /* guarded by cmu */
static _Atomic int monitor_started;
static _Atomic int cfd_snapshot = -1;
static uint64_t client_id;
static char client_slice[256];
/* The welcome's device list, written at each handshake: -1 every device.
 * Under amu, held only around a copy (never behind a round trip). */
static pthread_mutex_t amu = PTHREAD_MUTEX_INITIALIZER;
static int allowed_n = -1;
static char allowed[VGPU_MAX_DEVICES][VGPU_UUID_MAX];
/* Bytes freed (or rolled back) but not yet sent to the daemon on the current
 * connection, per device (hmu). Reset at each (re)connection to what the
 * daemon adopted from the hello minus what is held now. */
static uint64_t unsent[VGPU_MAX_HDEV];
static _Atomic int deferred;      /* some unsent is waiting for the socket */
static _Atomic uint64_t oneway_dropped;

#define RECONNECT_WAIT_NS (10ull * 1000000000ull)
/* A one-way sender waits at most this long for smu (held only around
 * non-blocking writes, so this is a bound, not a wait that happens). */
#define ONEWAY_LOCK_NS 20000000ull
/* A frame the kernel took in part is finished within this, or the stream is
 * corrupt and the connection is shut down. */
#define SEND_PARTIAL_NS 50000000ull
/* A round trip whose request the socket cannot take polls for room this
 * often (the daemon may be busy; the reply deadline bounds the whole). */
#define SEND_ROOM_POLL_MS 10

static void init_cv(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&up_cv, &a);
    pthread_condattr_destroy(&a);
}

__attribute__((constructor)) static void client_ctor(void)
{
    init_cv();
}

/* ---- connection state ---- */

/* cmu held. */
static void mark_down_locked(void)
{
    pthread_mutex_lock(&smu);
    if (cfd >= 0) {
        close(cfd);
        cfd = -1;
    }
    slots_ok = false;
    atomic_store(&cfd_snapshot, -1);
    pthread_mutex_unlock(&smu);
    if (atomic_exchange(&vgpu_connected, 0))
        vgpu_warn_once(VGPU_W_LOST, "vgpu: lost the connection to vgpud at %s; reconnecting, running on the last budget",
                       vgpu_cfg.socket);
}

/* smu within ONEWAY_LOCK_NS, for callers that must not wait. smu is only
 * ever held around non-blocking writes (a partial one is finished within
 * SEND_PARTIAL_NS), so failing here means something is badly wrong. */
static bool smu_lock_bounded(void)
{
    if (pthread_mutex_trylock(&smu) == 0)
        return true;
    uint64_t deadline = vgpu_now_ns() + ONEWAY_LOCK_NS;
    do {
        struct timespec ts = {0, 20000};
        nanosleep(&ts, NULL);
        if (pthread_mutex_trylock(&smu) == 0)
            return true;
    } while (vgpu_now_ns() < deadline);
    return false;
}

enum { SEND_OK = 0, SEND_DOWN, SEND_FULL, SEND_BROKEN };

/* smu held. Write one whole frame without blocking: all of it or, when the
 * socket has no room now, none of it (SEND_FULL). A frame the kernel took in
 * part must be finished, or the daemon would read garbage: it gets
 * SEND_PARTIAL_NS, then the connection is shut down (not closed: a round
 * trip may be polling cfd; it and the monitor see the hangup and reconnect,
 * and the hello re-declares what is held). */
static int send_whole_locked(const uint8_t *p, size_t n)
{
    if (cfd < 0)
        return SEND_DOWN;
    size_t done = 0;
    uint64_t deadline = 0;
    while (done < n) {
        ssize_t w = send(cfd, p + done, n - done, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            done += (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (done == 0)
                return SEND_FULL;
            if (!deadline)
                deadline = vgpu_now_ns() + SEND_PARTIAL_NS;
            int ms = vgpu_remaining_ms(deadline);
            if (ms == 0)
                break;
            struct pollfd pfd = {.fd = cfd, .events = POLLOUT};
            poll(&pfd, 1, ms);
            continue;
        }
        break; /* EPIPE, ECONNRESET: the daemon is gone */
    }
    if (done == n)
        return SEND_OK;
    shutdown(cfd, SHUT_RDWR);
    return SEND_BROKEN;
}

/* smu held: send what was released and not yet sent (oldest first is not
 * needed: releases of one device add up). Stops at the first frame the
 * socket cannot take and keeps the rest. */
static int flush_releases_locked(void)
{
    if (cfd < 0 || !slots_ok) { /* (re)connecting: connect_locked flushes */
        atomic_store(&deferred, 1);
        return SEND_DOWN;
    }
    int nh = atomic_load(&vgpu_nr_hdev);
    for (int i = 0; i < nh; i++) {
        pthread_mutex_lock(&hmu);
        uint64_t x = unsent[i];
        unsent[i] = 0;
        pthread_mutex_unlock(&hmu);
        if (!x)
            continue;
        int slot = atomic_load(&vgpu_hdevs[i].slot);
        if (slot < 0)
            continue; /* refused on this connection: the daemon booked nothing there */
        uint8_t out[64];
        struct mp_w w = {.p = out + 4, .cap = sizeof out - 4};
        mp_map(&w, 3);
        mp_str(&w, "t");
        mp_str(&w, "release");
        mp_str(&w, "slot");
        mp_uint(&w, (uint64_t)slot);
        mp_str(&w, "n");
        mp_uint(&w, x);
        vgpu_frame_header(out, w.len);
        int r = send_whole_locked(out, 4 + w.len);
        if (r != SEND_OK) {
            /* After DOWN/BROKEN the next connection recomputes unsent. */
            pthread_mutex_lock(&hmu);
            unsent[i] += x;
            pthread_mutex_unlock(&hmu);
            atomic_store(&deferred, 1);
            return r;
        }
    }
    atomic_store(&deferred, 0);
    return SEND_OK;
}

/* Send what is unsent now, without waiting for anything: a free calls this. */
static void flush_releases_bounded(void)
{
    if (!smu_lock_bounded()) {
        atomic_store(&deferred, 1);
        atomic_fetch_add(&oneway_dropped, 1);
        return;
    }
    int r = flush_releases_locked();
    pthread_mutex_unlock(&smu);
    if (r == SEND_FULL && atomic_load(&vgpu_connected)) {
        atomic_fetch_add(&oneway_dropped, 1);
        vgpu_warn_once(VGPU_W_RELEASE, "vgpu: vgpud is not reading its socket; frees are reported to it when it does");
    }
}

/* Send a request and wait for the reply with the same id (cmu held). */
static bool roundtrip_locked(struct mp_w *w, uint32_t id, struct vgpu_wire_reply *rep)
{
    if (cfd < 0)
        return false;
    if (w->overflow || w->len == 0 || w->len > VGPU_BUF_CAP) {
        vgpu_warn_once(VGPU_W_PROTO, "vgpu: request of %zu bytes too large", w->len);
        return false;
    }
    uint8_t frame[4 + VGPU_BUF_CAP];
    vgpu_frame_header(frame, w->len);
    memcpy(frame + 4, w->p, w->len);
    /* A live daemon answers in well under a second; 30 s means hung. */
    uint64_t deadline = vgpu_now_ns() + 30000000000ull;
    for (;;) {
        pthread_mutex_lock(&smu);
        /* Releases first, so that admission sees the memory already freed. */
        flush_releases_locked();
        int r = send_whole_locked(frame, 4 + w->len);
        pthread_mutex_unlock(&smu);
        if (r == SEND_OK)
            break;
        if (r != SEND_FULL || vgpu_remaining_ms(deadline) == 0) {
            mark_down_locked();
            return false;
        }
        /* cfd cannot change under us: closing it takes cmu. */
        struct pollfd pfd = {.fd = cfd, .events = POLLOUT};
        poll(&pfd, 1, SEND_ROOM_POLL_MS);
    }
    for (;;) {
        struct vgpu_rx rx;
        if (!vgpu_recv_frame(cfd, &rx, deadline, NULL, NULL)) {
            mark_down_locked();
            return false;
        }
        bool ok = vgpu_parse_reply(rx.p, rx.len, rep);
        vgpu_rx_done(&rx);
        if (!ok) {
            vgpu_warn_once(VGPU_W_PROTO, "vgpu: undecodable reply from vgpud; dropping connection");
            mark_down_locked();
            return false;
        }
        if (rep->id == (int64_t)id)
            return true;
        if (!strcmp(rep->t, "error") && rep->id < 0) {
            (void)vgpu_reply_code(rep);
            vgpu_warn_once(VGPU_W_PROTO, "vgpu: vgpud error %s: %s", rep->code, rep->msg);
            mark_down_locked();
            return false;
        }
        /* a stale reply (e.g. for a request before a timeout): skip */
    }
}

/* Connect, hello, welcome with the two regions. Leaves cfd open on success.
 * `why` gets a human reason on failure; *transient says whether the daemon
 * went away mid-handshake (worth another try) rather than refusing us. */
static bool handshake_once_locked(uint64_t deadline, char *why, size_t whylen, bool *transient)
{
    int fd;
    for (;;) {
        fd = vgpu_connect_unix(vgpu_cfg.socket);
        if (fd >= 0)
            break;
        /* The daemon may be starting: retry refused/missing until deadline. */
        if ((fd != -ENOENT && fd != -ECONNREFUSED && fd != -EAGAIN) || vgpu_remaining_ms(deadline) == 0) {
            snprintf(why, whylen, "%s", strerror(-fd));
            return false;
        }
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }

    uint8_t out[VGPU_BUF_CAP];
    struct mp_w w = {.p = out, .cap = sizeof out};
    char comm[64] = "";
    FILE *f = fopen("/proc/self/comm", "re");
    if (f) {
        if (fgets(comm, sizeof comm, f))
            comm[strcspn(comm, "\n")] = 0;
        fclose(f);
    }
    /* What the process holds now, per device: the daemon books exactly this
     * for the new connection (nothing before a daemon restart). */
    uint64_t decl[VGPU_MAX_HDEV] = {0};
    int nheld = 0, nh = atomic_load(&vgpu_nr_hdev);
    for (int i = 0; i < nh; i++)
        if ((decl[i] = atomic_load(&vgpu_hdevs[i].held)) != 0)
            nheld++;
    mp_map(&w, nheld ? 6 : 5);
    mp_str(&w, "t");
    mp_str(&w, "hello");
    mp_str(&w, "v");
    mp_uint(&w, VGPU_PROTO_VERSION);
    mp_str(&w, "role");
    mp_str(&w, "hook");
    mp_str(&w, "pid");
    mp_uint(&w, (uint64_t)getpid());
    mp_str(&w, "comm");
    mp_str(&w, comm);
    if (nheld) {
        mp_str(&w, "held");
        mp_array(&w, (uint32_t)nheld);
        for (int i = 0; i < nh; i++) {
            if (!decl[i])
                continue;
            mp_map(&w, 2);
            mp_str(&w, "dev");
            mp_str(&w, vgpu_hdevs[i].uuid);
            mp_str(&w, "n");
            mp_uint(&w, decl[i]);
        }
    }
    if (!vgpu_send_frame(fd, &w)) {
        snprintf(why, whylen, "sending hello: %s", strerror(errno));
        close(fd);
        *transient = true;
        return false;
    }
    struct vgpu_rx rx;
    int fds[2], nfds = 0;
    struct vgpu_wire_reply rep;
    bool ok = vgpu_recv_frame(fd, &rx, deadline, fds, &nfds);
    bool parsed = ok && vgpu_parse_reply(rx.p, rx.len, &rep);
    vgpu_rx_done(&rx);
    if (!ok) {
        snprintf(why, whylen, "no welcome from the daemon (%s)",
                 errno == ETIMEDOUT ? "none before the connect timeout"
                 : errno == ECONNRESET ? "it closed the connection" : strerror(errno));
        *transient = true;
    } else if (!parsed) {
        snprintf(why, whylen, "undecodable welcome");
        ok = false;
    } else if (strcmp(rep.t, "welcome")) {
        snprintf(why, whylen, "daemon said %s: %s %s", rep.t, rep.code, rep.msg);
        ok = false;
        /* Refused for capacity (a bound of our slice or of the node): a slot
         * may free up, so try again until the connect timeout. */
        if (!strcmp(rep.code, "limit"))
            *transient = true;
    } else if (nfds != 2) {
        snprintf(why, whylen, "welcome carried %d descriptors, not 2", nfds);
        ok = false;
    }
    struct vgpu_ctl_page *ctl = NULL;
    struct vgpu_stat_page *st = NULL;
    if (ok) {
        ctl = vgpu_map_region(fds[0], sizeof *ctl, PROT_READ);
        st = vgpu_map_region(fds[1], sizeof *st, PROT_READ | PROT_WRITE);
        if (!ctl || !st) {
            snprintf(why, whylen, "cannot map the shared regions");
            ok = false;
        } else if (ctl->magic != VGPU_SHM_MAGIC || ctl->abi_version != VGPU_ABI_VERSION) {
            snprintf(why, whylen, "shared region magic/abi mismatch (abi %u, want %u)", ctl->abi_version,
                     VGPU_ABI_VERSION);
            ok = false;
        }
    }
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    if (!ok) {
        if (ctl)
            munmap(ctl, sizeof *ctl);
        if (st)
            munmap(st, sizeof *st);
        close(fd);
        return false;
    }
    if (st->magic == 0) {
        st->magic = VGPU_SHM_MAGIC;
        st->abi_version = VGPU_ABI_VERSION;
    }
    st->pid = (uint32_t)getpid();
    client_id = (uint64_t)rep.id;
    snprintf(client_slice, sizeof client_slice, "%s", rep.slice);
    if (rep.devices_dropped)
        vgpu_warn_once(VGPU_W_VIEW, "vgpu: %d of the %d entries in the daemon's list of this slice's devices are "
                       "no UUID or past the %u this hook can use; it shows the other %d",
                       rep.devices_dropped, rep.ndevices + rep.devices_dropped, VGPU_MAX_DEVICES, rep.ndevices);
    pthread_mutex_lock(&amu);
    allowed_n = rep.ndevices;
    if (allowed_n > 0)
        memcpy(allowed, rep.devices, sizeof allowed);
    pthread_mutex_unlock(&amu);
    /* Old mappings stay mapped: a launching thread may still hold a pointer. */
    atomic_store_explicit(&vgpu_stat, st, memory_order_release);
    atomic_store_explicit(&vgpu_ctl, ctl, memory_order_release);
    pthread_mutex_lock(&smu);
    cfd = fd;
    slots_ok = false; /* until reattach_locked */
    /* The daemon adopted decl; whatever was freed since the snapshot is
     * still to be released on this connection, and nothing freed before it
     * (the old connection's unsent is covered by decl). A free moves held
     * and unsent together under hmu, so none is lost or sent twice. */
    pthread_mutex_lock(&hmu);
    for (int i = 0; i < VGPU_MAX_HDEV; i++) {
        uint64_t now = i < nh ? atomic_load(&vgpu_hdevs[i].held) : 0;
        unsent[i] = decl[i] > now ? decl[i] - now : 0;
    }
    pthread_mutex_unlock(&hmu);
    atomic_store(&cfd_snapshot, fd);
    pthread_mutex_unlock(&smu);
    /* A new daemon knows nothing of our work: the next launch says `want`. */
    for (int i = 0; i < atomic_load(&vgpu_nr_hdev) && i < VGPU_MAX_HDEV; i++)
        atomic_store(&vgpu_hdevs[i].busy, 0);
    atomic_store(&vgpu_connected, 1);
    atomic_fetch_add(&vgpu_conn_gen, 1);
    return true;
}

/* The handshake, tried again while the deadline allows when the daemon
 * closed on us before its welcome (it was restarting, or so loaded that our
 * hello waited past its handshake timeout), or refused us for capacity:
 * that is no reason to fail CUDA. If it comes to failing, a capacity
 * refusal is the reason given (it names the bound), not the last attempt's
 * running out of time. */
static bool handshake_locked(uint64_t deadline, char *why, size_t whylen)
{
    char refused[256] = "";
    for (;;) {
        bool transient = false;
        if (handshake_once_locked(deadline, why, whylen, &transient))
            return true;
        if (!strncmp(why, "daemon said error: limit ", 25))
            snprintf(refused, sizeof refused, "%s", why);
        if (!transient || vgpu_remaining_ms(deadline) == 0) {
            if (refused[0])
                snprintf(why, whylen, "%s", refused);
            return false;
        }
        struct timespec ts = {0, 50 * 1000000};
        nanosleep(&ts, NULL);
    }
}

static void *monitor_main(void *arg);
static bool reattach_locked(void);

/* Handshake, then attach every known device again (slots are per
 * connection); only then may frames that name a slot go out. cmu held. */
static bool connect_locked(uint64_t deadline, char *why, size_t whylen)
{
    if (!handshake_locked(deadline, why, whylen))
        return false;
    if (!reattach_locked()) {
        snprintf(why, whylen, "the connection dropped while re-attaching devices");
        return false;
    }
    pthread_mutex_lock(&smu);
    if (cfd >= 0)
        slots_ok = true;
    flush_releases_locked();
    pthread_mutex_unlock(&smu);
    return true;
}

static void start_monitor(void)
{
    if (atomic_exchange(&monitor_started, 1))
        return;
    if (!vgpu_start_thread(monitor_main)) {
        atomic_store(&monitor_started, 0);
        vgpu_warn_once(VGPU_W_THREAD, "vgpu: cannot start the monitor thread");
    }
}

int vgpu_client_devices(char (*out)[VGPU_UUID_MAX], int cap)
{
    pthread_mutex_lock(&amu);
    int n = allowed_n;
    for (int i = 0; i < n && i < cap; i++)
        memcpy(out[i], allowed[i], VGPU_UUID_MAX);
    pthread_mutex_unlock(&amu);
    return n < cap ? n : cap;
}

bool vgpu_client_register(void)
{
    char why[256] = "";
    uint64_t deadline = vgpu_now_ns() + (uint64_t)vgpu_cfg.connect_timeout_ms * 1000000ull;
    pthread_mutex_lock(&cmu);
    bool ok = connect_locked(deadline, why, sizeof why);
    pthread_mutex_unlock(&cmu);
    if (ok) {
        start_monitor();
        return true;
    }
    const char *src = vgpu_cfg.conf_path[0] ? vgpu_cfg.conf_path : "the default; no hook.conf";
    if (vgpu_cfg.on_no_daemon_unlimited)
        vgpu_warn_once(VGPU_W_CONNECT,
                       "vgpu: cannot reach vgpud at %s: %s; running WITHOUT limits (on_no_daemon=unlimited in %s)",
                       vgpu_cfg.socket, why, src);
    else
        vgpu_warn_once(VGPU_W_CONNECT,
                       "vgpu: cannot reach vgpud at %s: %s; refusing CUDA (on_no_daemon=fail in %s)",
                       vgpu_cfg.socket, why, src);
    return false;
}

/* ---- monitor: notice hangups, reconnect with backoff ---- */

static void *monitor_main(void *arg)
{
    (void)arg;
    vgpu_in_hook = 1; /* a service thread (it makes no driver calls anyway, so
                       * CUDA's rules during graph captures do not concern it) */
    uint64_t backoff_ms = 50;
    for (;;) {
        int fd = atomic_load(&cfd_snapshot);
        if (fd >= 0 && atomic_load(&vgpu_connected)) {
            backoff_ms = 50;
            struct pollfd p = {.fd = fd, .events = POLLRDHUP};
            int r = poll(&p, 1, 100);
            /* Frees the socket could not take when they happened. */
            if (atomic_load(&deferred))
                flush_releases_bounded();
            if (r > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL))) {
                pthread_mutex_lock(&cmu);
                if (cfd == fd)
                    mark_down_locked();
                pthread_mutex_unlock(&cmu);
            }
            continue;
        }
        struct timespec ts = {(time_t)(backoff_ms / 1000), (long)(backoff_ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
        char why[256];
        pthread_mutex_lock(&cmu);
        bool ok = cfd >= 0;
        if (!ok && connect_locked(vgpu_now_ns() + 1000000000ull, why, sizeof why))
            ok = cfd >= 0;
        if (ok)
            pthread_cond_broadcast(&up_cv);
        pthread_mutex_unlock(&cmu);
        if (ok) {
            backoff_ms = 50;
        } else if (backoff_ms < 1000) {
            backoff_ms *= 2;
            if (backoff_ms > 1000)
                backoff_ms = 1000;
        }
    }
    return NULL;
}

/* Wait (cmu held) until connected and devices re-attached, or deadline. */
static bool wait_up_locked(uint64_t deadline)
{
    while (cfd < 0) {
        if (vgpu_now_ns() >= deadline)
            return false;
        uint64_t d = deadline;
        struct timespec ts = {(time_t)(d / 1000000000ull), (long)(d % 1000000000ull)};
        pthread_cond_timedwait(&up_cv, &cmu, &ts);
    }
    return true;
}

/* ---- requests ---- */

static int attach_locked(const char *uuid, uint64_t total, int *slot)
{
    if (cfd < 0)
        return VGPU_R_DOWN;
    uint8_t out[256];
    struct mp_w w = {.p = out, .cap = sizeof out};
    uint32_t id = next_id++;
    mp_map(&w, 4);
    mp_str(&w, "t");
    mp_str(&w, "attach");
    mp_str(&w, "id");
    mp_uint(&w, id);
    mp_str(&w, "dev");
    mp_str(&w, uuid);
    mp_str(&w, "total");
    mp_uint(&w, total);
    struct vgpu_wire_reply rep;
    if (!roundtrip_locked(&w, id, &rep))
        return VGPU_R_DOWN;
    if (!strcmp(rep.t, "attached") && rep.slot >= 0 && rep.slot < (int64_t)VGPU_MAX_DEVICES) {
        *slot = (int)rep.slot;
        return VGPU_R_OK;
    }
    if (!strcmp(rep.t, "error") && vgpu_reply_code(&rep) == VGPU_ERR_OOM) {
        /* No room in the slice for a context: out of memory, and worth
         * trying again once the slice has room (not a refused device). */
        vgpu_warn_once(VGPU_W_CTXMEM, "vgpu: no GPU memory for a context on %s: %s", uuid, rep.msg);
        return VGPU_R_DENIED;
    }
    vgpu_warn_once(VGPU_W_DEVICE, "vgpu: vgpud refused device %s: %s %s", uuid, rep.code, rep.msg);
    return VGPU_R_REFUSED;
}

int vgpu_client_attach(const char *uuid, uint64_t total, int *slot)
{
    pthread_mutex_lock(&cmu);
    int res = attach_locked(uuid, total, slot);
    pthread_mutex_unlock(&cmu);
    return res;
}

/* After a reconnect: slots are per connection, so attach every device we
 * knew again before any request uses a slot number (cmu held). */
static bool reattach_locked(void)
{
    int nh = atomic_load(&vgpu_nr_hdev);
    for (int i = 0; i < nh; i++) {
        struct vgpu_hdev *d = &vgpu_hdevs[i];
        if (atomic_load(&d->slot) < 0 && !atomic_load(&d->held))
            continue;
        int slot = -1;
        int r = attach_locked(d->uuid, d->total, &slot);
        if (r == VGPU_R_DOWN)
            return false;
        /* Refused, or no room for a context: the old slot number means
         * nothing on this connection; vgpu_hdev_attach asks again. */
        atomic_store(&d->slot, r == VGPU_R_OK ? slot : -1);
    }
    return true;
}

int vgpu_client_reserve(int hidx, uint64_t n)
{
    uint64_t deadline = vgpu_now_ns() + RECONNECT_WAIT_NS;
    pthread_mutex_lock(&cmu);
    int res = VGPU_R_DOWN;
    for (;;) {
        if (!wait_up_locked(deadline))
            break;
        int slot = atomic_load(&vgpu_hdevs[hidx].slot);
        if (slot < 0) {
            res = VGPU_R_REFUSED;
            break;
        }
        uint8_t out[128];
        struct mp_w w = {.p = out, .cap = sizeof out};
        uint32_t id = next_id++;
        mp_map(&w, 4);
        mp_str(&w, "t");
        mp_str(&w, "reserve");
        mp_str(&w, "id");
        mp_uint(&w, id);
        mp_str(&w, "slot");
        mp_uint(&w, (uint64_t)slot);
        mp_str(&w, "n");
        mp_uint(&w, n);
        struct vgpu_wire_reply rep;
        if (!roundtrip_locked(&w, id, &rep))
            continue; /* connection dropped: wait for the monitor, retry */
        if (!strcmp(rep.t, "granted")) {
            res = VGPU_R_OK;
        } else if (!strcmp(rep.t, "denied")) {
            res = VGPU_R_DENIED;
        } else {
            if (!strcmp(rep.t, "error"))
                (void)vgpu_reply_code(&rep);
            vgpu_warn_once(VGPU_W_PROTO, "vgpu: reserve answered with %s %s: %s", rep.t, rep.code, rep.msg);
            res = VGPU_R_DENIED;
        }
        break;
    }
    pthread_mutex_unlock(&cmu);
    return res;
}

/* Give n bytes back to the daemon on device hidx: queue them in unsent and
 * send what can go now. Never waits for a round trip, a reply or a socket
 * with no room. */
static void release(int hidx, uint64_t n, bool was_held)
{
    if (n == 0 || hidx < 0 || hidx >= VGPU_MAX_HDEV)
        return;
    pthread_mutex_lock(&hmu);
    if (was_held)
        atomic_fetch_sub(&vgpu_hdevs[hidx].held, n);
    unsent[hidx] += n;
    pthread_mutex_unlock(&hmu);
    if (atomic_load(&cfd_snapshot) >= 0)
        flush_releases_bounded();
    /* While down: the reconnect's hello declares what is still held. */
}

void vgpu_client_release(int hidx, uint64_t n)
{
    release(hidx, n, false);
}

void vgpu_client_free(int hidx, uint64_t n)
{
    release(hidx, n, true);
}

bool vgpu_client_send_oneway(const uint8_t *frame, size_t len)
{
    if (!frame || len <= 4 || len > 4 + (size_t)VGPU_MAX_FRAME)
        return false;
    size_t body = (size_t)frame[0] << 24 | (size_t)frame[1] << 16 | (size_t)frame[2] << 8 | frame[3];
    if (body != len - 4)
        return false; /* not one complete frame: sending it would corrupt the stream */
    if (atomic_load(&cfd_snapshot) < 0)
        return false;
    if (!smu_lock_bounded()) {
        atomic_fetch_add(&oneway_dropped, 1);
        return false;
    }
    int r = slots_ok ? send_whole_locked(frame, len) : SEND_DOWN;
    pthread_mutex_unlock(&smu);
    if (r != SEND_OK && r != SEND_DOWN)
        atomic_fetch_add(&oneway_dropped, 1);
    return r == SEND_OK;
}

uint64_t vgpu_client_oneway_dropped(void)
{
    return atomic_load(&oneway_dropped);
}

void vgpu_client_atfork_child(void)
{
    pthread_mutex_init(&cmu, NULL);
    pthread_mutex_init(&amu, NULL);
    pthread_mutex_init(&smu, NULL);
    pthread_mutex_init(&hmu, NULL);
    init_cv();
    if (cfd >= 0)
        close(cfd);
    cfd = -1;
    slots_ok = false;
    memset(unsent, 0, sizeof unsent);
    atomic_store(&deferred, 0);
    atomic_store(&oneway_dropped, 0);
    atomic_store(&cfd_snapshot, -1);
    atomic_store(&vgpu_connected, 0);
    atomic_store(&monitor_started, 0);
    /* The parent's pages are shared memory: never write the parent's stats. */
    atomic_store(&vgpu_ctl, NULL);
    atomic_store(&vgpu_stat, NULL);
}

/* `want` or `idle` for a device slot: read the slot right before framing
 * (a reconnect renumbers slots; see vgpu_client_send_oneway). */
bool vgpu_client_notify(int slot, enum vgpu_note what)
{
    static const char *const names[] = {"want", "idle", "drained"};
    uint8_t out[48];
    struct mp_w w = {.p = out + 4, .cap = sizeof out - 4};
    bool at = what == VGPU_NOTE_WANT; /* when: the daemon judges schedules on it */
    mp_map(&w, at ? 3 : 2);
    mp_str(&w, "t");
    mp_str(&w, names[what]);
    mp_str(&w, "slot");
    mp_uint(&w, (uint64_t)slot);
    if (at) {
        mp_str(&w, "at");
        mp_uint(&w, vgpu_now_ns());
    }
    if (w.overflow)
        return false;
    out[0] = (uint8_t)(w.len >> 24);
    out[1] = (uint8_t)(w.len >> 16);
    out[2] = (uint8_t)(w.len >> 8);
    out[3] = (uint8_t)w.len;
    return vgpu_client_send_oneway(out, 4 + w.len);
}
