/*
 * hook_wire.c - frames and replies on the socket to vgpud, as functions of a
 * descriptor (hook_client.c owns the connection and its locks): the 4-byte
 * length header, blocking reads with a deadline that collect the welcome's
 * descriptors, reply decoding, connecting, and mapping a shared region.
 */
#include <errno.h>
#include <poll.h>
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

int vgpu_remaining_ms(uint64_t deadline)
{
    uint64_t now = vgpu_now_ns();
    if (now >= deadline)
        return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > 600000 ? 600000 : (int)ms;
}


size_t vgpu_frame_header(uint8_t *out, size_t body)
{
    out[0] = (uint8_t)(body >> 24);
    out[1] = (uint8_t)(body >> 16);
    out[2] = (uint8_t)(body >> 8);
    out[3] = (uint8_t)body;
    return 4;
}


/* ---- framing ---- */

static bool write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return false;
        }
        p += w;
        n -= (size_t)w;
    }
    return true;
}

bool vgpu_send_frame(int fd, const struct mp_w *w)
{
    if (w->overflow || w->len == 0 || w->len > VGPU_MAX_FRAME)
        return false;
    uint8_t hdr[4] = {(uint8_t)(w->len >> 24), (uint8_t)(w->len >> 16), (uint8_t)(w->len >> 8),
                      (uint8_t)w->len};
    uint8_t buf[4 + VGPU_BUF_CAP];
    memcpy(buf, hdr, 4);
    memcpy(buf + 4, w->p, w->len);
    return write_all(fd, buf, 4 + w->len);
}

/* Read exactly n bytes before deadline; collects SCM_RIGHTS fds if fds. */
static bool read_full(int fd, uint8_t *p, size_t n, uint64_t deadline, int *fds, int *nfds)
{
    while (n) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int pr = poll(&pfd, 1, vgpu_remaining_ms(deadline));
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr == 0)
            errno = ETIMEDOUT;
        if (pr <= 0)
            return false;
        union {
            struct cmsghdr h;
            char b[CMSG_SPACE(sizeof(int) * 4)];
        } cm;
        struct iovec iov = {.iov_base = p, .iov_len = n};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.b,
                            .msg_controllen = sizeof cm.b};
        ssize_t r = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0)
            errno = ECONNRESET;
        if (r <= 0)
            return false;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int got[4];
            memcpy(got, CMSG_DATA(c), sizeof(int) * (size_t)(k > 4 ? 4 : k));
            for (int i = 0; i < k && i < 4; i++) {
                if (fds && *nfds < 2)
                    fds[(*nfds)++] = got[i];
                else
                    close(got[i]);
            }
        }
        p += r;
        n -= (size_t)r;
    }
    return true;
}

void vgpu_rx_done(struct vgpu_rx *rx)
{
    if (rx->p && rx->p != rx->small)
        free(rx->p);
    rx->p = NULL;
}

bool vgpu_recv_frame(int fd, struct vgpu_rx *rx, uint64_t deadline, int *fds, int *nfds)
{
    uint8_t hdr[4];
    rx->p = NULL;
    if (!read_full(fd, hdr, 4, deadline, fds, nfds))
        return false;
    uint32_t n = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
    if (n == 0 || n > VGPU_MAX_FRAME) {
        vgpu_warn_once(VGPU_W_PROTO, "vgpu: daemon sent a frame of %u bytes (protocol limit %u); dropping connection",
                       n, VGPU_MAX_FRAME);
        errno = EPROTO;
        return false;
    }
    rx->p = n <= sizeof rx->small ? rx->small : malloc(n);
    if (!rx->p) {
        vgpu_warn_once(VGPU_W_PROTO, "vgpu: no host memory for a %u-byte frame from vgpud; dropping connection", n);
        errno = ENOMEM;
        return false;
    }
    if (!read_full(fd, rx->p, n, deadline, fds, nfds)) {
        vgpu_rx_done(rx);
        return false;
    }
    rx->len = n;
    return true;
}


/* ---- replies ---- */

static void copy_str(char *dst, size_t cap, const char *s, uint32_t n)
{
    if (n >= cap)
        n = (uint32_t)cap - 1;
    memcpy(dst, s, n);
    dst[n] = 0;
}

/* A welcome's "devices": an array of UUID strings (or nil: every device). */
static bool parse_devices(struct mp_r *r, struct vgpu_wire_reply *out)
{
    if (mp_peek(r) != MP_ARRAY)
        return mp_skip(r); /* nil, or not a list: no restriction known */
    uint32_t n;
    if (!mp_read_array(r, &n))
        return false;
    out->ndevices = 0;
    for (uint32_t i = 0; i < n; i++) {
        const char *s;
        uint32_t sl;
        if (mp_peek(r) != MP_STR || out->ndevices >= (int)VGPU_MAX_DEVICES) {
            out->devices_dropped++;
            if (!mp_skip(r))
                return false;
            continue;
        }
        if (!mp_read_str(r, &s, &sl))
            return false;
        if (sl == 0 || sl >= VGPU_UUID_MAX) {
            out->devices_dropped++;
            continue;
        }
        copy_str(out->devices[out->ndevices++], VGPU_UUID_MAX, s, sl);
    }
    return true;
}

/* Decode one reply map; unknown keys are skipped. false if malformed. */
bool vgpu_parse_reply(const uint8_t *buf, size_t len, struct vgpu_wire_reply *out)
{
    memset(out, 0, sizeof *out);
    out->id = -1;
    out->slot = -1;
    out->ndevices = -1;
    struct mp_r r = {.p = buf, .len = len};
    uint32_t n;
    if (!mp_read_map(&r, &n))
        return false;
    for (uint32_t i = 0; i < n; i++) {
        const char *k;
        uint32_t kl;
        if (!mp_read_str(&r, &k, &kl))
            return false;
        const char *s;
        uint32_t sl;
#define KEY(lit) (kl == sizeof(lit) - 1 && !memcmp(k, lit, kl))
        if (KEY("t") || KEY("code") || KEY("msg") || KEY("slice")) {
            if (mp_peek(&r) != MP_STR) {
                if (!mp_skip(&r))
                    return false;
                continue;
            }
            if (!mp_read_str(&r, &s, &sl))
                return false;
            if (KEY("t"))
                copy_str(out->t, sizeof out->t, s, sl);
            else if (KEY("code"))
                copy_str(out->code, sizeof out->code, s, sl);
            else if (KEY("msg"))
                copy_str(out->msg, sizeof out->msg, s, sl);
            else
                copy_str(out->slice, sizeof out->slice, s, sl);
        } else if ((KEY("id") || KEY("slot") || KEY("tick_ns") || KEY("epoch") || KEY("limit") ||
                    KEY("current")) &&
                   (mp_peek(&r) == MP_INT || mp_peek(&r) == MP_UINT)) {
            int64_t v;
            if (!mp_read_int(&r, &v))
                return false;
            if (KEY("id"))
                out->id = v;
            else if (KEY("slot"))
                out->slot = v;
            else if (KEY("tick_ns"))
                out->tick_ns = v;
            else if (KEY("epoch"))
                out->epoch = v;
            else if (KEY("limit"))
                out->limit = v;
            else
                out->current = v;
        } else if (KEY("devices")) {
            if (!parse_devices(&r, out))
                return false;
        } else if (!mp_skip(&r)) {
            return false;
        }
#undef KEY
    }
    return out->t[0] != 0 && !r.err;
}

/* The code of an error reply, from vgpu_abi.h's one table. One the table
 * does not have means the daemon and the hook disagree on the protocol: said
 * once, and the request counts as refused. */
int vgpu_reply_code(const struct vgpu_wire_reply *rep)
{
    int c = vgpu_error_code_of(rep->code);
    if (c < 0)
        vgpu_warn_once(VGPU_W_CODE, "vgpu: vgpud sent error code '%s', which this hook does not know: %s",
                       rep->code, rep->msg);
    return c;
}


int vgpu_connect_unix(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    for (;;) {
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
        if (errno != EINTR)
            break;
    }
    int e = errno;
    close(fd);
    return -e;
}

void *vgpu_map_region(int fd, size_t size, int prot)
{
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < size)
        return NULL;
    void *p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}
