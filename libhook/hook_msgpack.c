/*
 * hook_msgpack.c - the smallest msgpack that the protocol needs.
 *
 * Written here rather than linked because the hook may depend on nothing but
 * libc/libdl/libpthread at run time. Pure: no I/O, no allocation. The writer
 * fills a caller's buffer and sets `overflow` instead of writing past it; the
 * reader never reads past `len` and sets `err` on anything malformed, so a
 * hostile or corrupt frame gives an error, never a crash.
 */
#include <string.h>

#include "hook_client.h"

static void put(struct mp_w *w, const void *src, size_t n)
{
    if (w->overflow || w->cap - w->len < n) {
        w->overflow = true;
        return;
    }
    memcpy(w->p + w->len, src, n);
    w->len += n;
}

static void put_be(struct mp_w *w, uint8_t tag, uint64_t v, int bytes)
{
    uint8_t b[9];
    b[0] = tag;
    for (int i = 0; i < bytes; i++)
        b[1 + i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
    put(w, b, (size_t)bytes + 1);
}

void mp_map(struct mp_w *w, uint32_t n)
{
    if (n < 16) {
        uint8_t b = (uint8_t)(0x80 | n);
        put(w, &b, 1);
    } else if (n <= 0xffff) {
        put_be(w, 0xde, n, 2);
    } else {
        put_be(w, 0xdf, n, 4);
    }
}

void mp_array(struct mp_w *w, uint32_t n)
{
    if (n < 16) {
        uint8_t b = (uint8_t)(0x90 | n);
        put(w, &b, 1);
    } else if (n <= 0xffff) {
        put_be(w, 0xdc, n, 2);
    } else {
        put_be(w, 0xdd, n, 4);
    }
}

void mp_str(struct mp_w *w, const char *s)
{
    size_t n = strlen(s);
    if (n < 32) {
        uint8_t b = (uint8_t)(0xa0 | n);
        put(w, &b, 1);
    } else if (n <= 0xff) {
        put_be(w, 0xd9, n, 1);
    } else if (n <= 0xffff) {
        put_be(w, 0xda, n, 2);
    } else {
        put_be(w, 0xdb, n, 4);
    }
    put(w, s, n);
}

void mp_uint(struct mp_w *w, uint64_t v)
{
    if (v < 128) {
        uint8_t b = (uint8_t)v;
        put(w, &b, 1);
    } else if (v <= 0xff) {
        put_be(w, 0xcc, v, 1);
    } else if (v <= 0xffff) {
        put_be(w, 0xcd, v, 2);
    } else if (v <= 0xffffffffu) {
        put_be(w, 0xce, v, 4);
    } else {
        put_be(w, 0xcf, v, 8);
    }
}

void mp_int(struct mp_w *w, int64_t v)
{
    if (v >= 0) {
        mp_uint(w, (uint64_t)v);
    } else if (v >= -32) {
        uint8_t b = (uint8_t)(int8_t)v;
        put(w, &b, 1);
    } else {
        put_be(w, 0xd3, (uint64_t)v, 8);
    }
}

void mp_nil(struct mp_w *w)
{
    uint8_t b = 0xc0;
    put(w, &b, 1);
}

void mp_bool(struct mp_w *w, bool v)
{
    uint8_t b = v ? 0xc3 : 0xc2;
    put(w, &b, 1);
}

/* ---- reader ---- */

static bool need(struct mp_r *r, size_t n)
{
    if (r->err || r->len - r->pos < n) {
        r->err = true;
        return false;
    }
    return true;
}

static uint64_t get_be(struct mp_r *r, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = (v << 8) | r->p[r->pos + (size_t)i];
    r->pos += (size_t)bytes;
    return v;
}

enum mp_type mp_peek(struct mp_r *r)
{
    if (!need(r, 1))
        return MP_ERR;
    uint8_t b = r->p[r->pos];
    if (b <= 0x7f || b == 0xcc || b == 0xcd || b == 0xce || b == 0xcf)
        return MP_UINT;
    if (b >= 0xe0 || (b >= 0xd0 && b <= 0xd3))
        return MP_INT;
    if ((b & 0xe0) == 0xa0 || b == 0xd9 || b == 0xda || b == 0xdb)
        return MP_STR;
    if ((b & 0xf0) == 0x90 || b == 0xdc || b == 0xdd)
        return MP_ARRAY;
    if ((b & 0xf0) == 0x80 || b == 0xde || b == 0xdf)
        return MP_MAP;
    if (b == 0xc0)
        return MP_NIL;
    if (b == 0xc2 || b == 0xc3)
        return MP_BOOL;
    return MP_OTHER;
}

bool mp_read_map(struct mp_r *r, uint32_t *n)
{
    if (!need(r, 1))
        return false;
    uint8_t b = r->p[r->pos];
    if ((b & 0xf0) == 0x80) {
        r->pos++;
        *n = b & 0x0f;
    } else if (b == 0xde && need(r, 3)) {
        r->pos++;
        *n = (uint32_t)get_be(r, 2);
    } else if (b == 0xdf && need(r, 5)) {
        r->pos++;
        *n = (uint32_t)get_be(r, 4);
    } else {
        r->err = true;
        return false;
    }
    return true;
}

bool mp_read_array(struct mp_r *r, uint32_t *n)
{
    if (!need(r, 1))
        return false;
    uint8_t b = r->p[r->pos];
    if ((b & 0xf0) == 0x90) {
        r->pos++;
        *n = b & 0x0f;
    } else if (b == 0xdc && need(r, 3)) {
        r->pos++;
        *n = (uint32_t)get_be(r, 2);
    } else if (b == 0xdd && need(r, 5)) {
        r->pos++;
        *n = (uint32_t)get_be(r, 4);
    } else {
        r->err = true;
        return false;
    }
    return true;
}

bool mp_read_str(struct mp_r *r, const char **s, uint32_t *n)
{
    if (!need(r, 1))
        return false;
    uint8_t b = r->p[r->pos];
    uint32_t len;
    if ((b & 0xe0) == 0xa0) {
        r->pos++;
        len = b & 0x1f;
    } else if (b == 0xd9 && need(r, 2)) {
        r->pos++;
        len = (uint32_t)get_be(r, 1);
    } else if (b == 0xda && need(r, 3)) {
        r->pos++;
        len = (uint32_t)get_be(r, 2);
    } else if (b == 0xdb && need(r, 5)) {
        r->pos++;
        len = (uint32_t)get_be(r, 4);
    } else {
        r->err = true;
        return false;
    }
    if (!need(r, len))
        return false;
    *s = (const char *)r->p + r->pos;
    *n = len;
    r->pos += len;
    return true;
}

bool mp_read_int(struct mp_r *r, int64_t *v)
{
    if (!need(r, 1))
        return false;
    uint8_t b = r->p[r->pos];
    int bytes = 0;
    bool sign = false;
    if (b <= 0x7f) {
        r->pos++;
        *v = b;
        return true;
    }
    if (b >= 0xe0) {
        r->pos++;
        *v = (int8_t)b;
        return true;
    }
    switch (b) {
    case 0xcc: bytes = 1; break;
    case 0xcd: bytes = 2; break;
    case 0xce: bytes = 4; break;
    case 0xcf: bytes = 8; break;
    case 0xd0: bytes = 1; sign = true; break;
    case 0xd1: bytes = 2; sign = true; break;
    case 0xd2: bytes = 4; sign = true; break;
    case 0xd3: bytes = 8; sign = true; break;
    default:
        r->err = true;
        return false;
    }
    if (!need(r, 1 + (size_t)bytes))
        return false;
    r->pos++;
    uint64_t u = get_be(r, bytes);
    if (sign) {
        int shift = 64 - 8 * bytes;
        *v = shift ? (int64_t)(u << shift) >> shift : (int64_t)u;
    } else {
        if (u > (uint64_t)INT64_MAX) {
            r->err = true;
            return false;
        }
        *v = (int64_t)u;
    }
    return true;
}

bool mp_read_nil(struct mp_r *r)
{
    if (!need(r, 1) || r->p[r->pos] != 0xc0) {
        r->err = true;
        return false;
    }
    r->pos++;
    return true;
}

static bool skip_depth(struct mp_r *r, int depth)
{
    if (depth > 32) {
        r->err = true;
        return false;
    }
    if (!need(r, 1))
        return false;
    uint8_t b = r->p[r->pos];
    enum mp_type t = mp_peek(r);
    const char *s;
    uint32_t n;
    int64_t i;
    switch (t) {
    case MP_NIL:
    case MP_BOOL:
        r->pos++;
        return true;
    case MP_INT:
    case MP_UINT:
        if (b == 0xcf) { /* may exceed int64 */
            if (!need(r, 9))
                return false;
            r->pos += 9;
            return true;
        }
        return mp_read_int(r, &i);
    case MP_STR:
        return mp_read_str(r, &s, &n);
    case MP_ARRAY:
        if (!mp_read_array(r, &n))
            return false;
        for (uint32_t k = 0; k < n; k++)
            if (!skip_depth(r, depth + 1))
                return false;
        return true;
    case MP_MAP:
        if (!mp_read_map(r, &n))
            return false;
        for (uint32_t k = 0; k < 2 * n; k++)
            if (!skip_depth(r, depth + 1))
                return false;
        return true;
    default:
        break;
    }
    /* floats, bin, ext */
    size_t sz = 0, hdr = 1;
    switch (b) {
    case 0xca: sz = 4; break;
    case 0xcb: sz = 8; break;
    case 0xc4: case 0xc7: hdr = 2; break;
    case 0xc5: case 0xc8: hdr = 3; break;
    case 0xc6: case 0xc9: hdr = 5; break;
    case 0xd4: sz = 2; break;
    case 0xd5: sz = 3; break;
    case 0xd6: sz = 5; break;
    case 0xd7: sz = 9; break;
    case 0xd8: sz = 17; break;
    default:
        r->err = true;
        return false;
    }
    if (hdr > 1) {
        if (!need(r, hdr))
            return false;
        r->pos++;
        sz = (size_t)get_be(r, (int)hdr - 1);
        if (b >= 0xc7 && b <= 0xc9)
            sz += 1; /* ext type byte */
        if (!need(r, sz))
            return false;
        r->pos += sz;
        return true;
    }
    if (!need(r, 1 + sz))
        return false;
    r->pos += 1 + sz;
    return true;
}

bool mp_skip(struct mp_r *r)
{
    return skip_depth(r, 0);
}
