/*
 * oneway_unit - vgpu_client_send_oneway from inside the hook, for the hook's
 * tests. Linked with the hook's own objects (vgpu_cgroup/_lib/.hook-obj),
 * so the hook's hidden internals are callable here; cuInit registers with
 * the daemon at VGPU_SOCKET as under LD_PRELOAD.
 *
 * Reads commands from stdin, one per line, and answers each with a JSON line:
 *   attach_bg      start a thread whose attach round trip the daemon may hold
 *   send N         N one-way frames {t:"note", i:k}: how many went, the slowest call
 *   bad            frames that are not exactly one frame are refused
 *   dropped        vgpu_client_oneway_dropped()
 *   quit
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "hook_client.h"

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void *attach_main(void *arg)
{
    (void)arg;
    int slot = -1;
    vgpu_client_attach("GPU-00000000-0000-0000-0000-000000000000", 1ull << 30, &slot);
    return NULL;
}

static size_t note(uint8_t *out, size_t cap, uint64_t i)
{
    struct mp_w w = {.p = out + 4, .cap = cap - 4};
    mp_map(&w, 2);
    mp_str(&w, "t");
    mp_str(&w, "note");
    mp_str(&w, "i");
    mp_uint(&w, i);
    out[0] = (uint8_t)(w.len >> 24);
    out[1] = (uint8_t)(w.len >> 16);
    out[2] = (uint8_t)(w.len >> 8);
    out[3] = (uint8_t)w.len;
    return 4 + w.len;
}

int main(void)
{
    int init_rc = cuInit(0);
    printf("{\"init_rc\": %d}\n", init_rc);
    fflush(stdout);
    char line[128];
    uint64_t next = 0;
    pthread_t t;
    while (fgets(line, sizeof line, stdin)) {
        unsigned long n = 0;
        if (!strncmp(line, "attach_bg", 9)) {
            pthread_create(&t, NULL, attach_main, NULL);
            printf("{\"started\": 1}\n");
        } else if (sscanf(line, "send %lu", &n) == 1) {
            unsigned long ok = 0, fail = 0;
            uint64_t worst = 0;
            for (unsigned long k = 0; k < n; k++) {
                uint8_t f[64];
                size_t len = note(f, sizeof f, next);
                uint64_t t0 = mono_ns();
                bool sent = vgpu_client_send_oneway(f, len);
                uint64_t d = mono_ns() - t0;
                worst = d > worst ? d : worst;
                if (sent) {
                    ok++;
                    next++;
                } else {
                    fail++;
                }
            }
            printf("{\"ok\": %lu, \"fail\": %lu, \"max_ns\": %" PRIu64 "}\n", ok, fail, worst);
        } else if (!strncmp(line, "bad", 3)) {
            uint8_t f[64];
            size_t len = note(f, sizeof f, 0);
            int shorter = vgpu_client_send_oneway(f, len - 1);   /* header says more */
            int longer = vgpu_client_send_oneway(f, len + 1);    /* a byte of the next */
            int empty = vgpu_client_send_oneway(f, 4);
            int null = vgpu_client_send_oneway(NULL, len);
            printf("{\"shorter\": %d, \"longer\": %d, \"empty\": %d, \"null\": %d}\n", shorter, longer,
                   empty, null);
        } else if (!strncmp(line, "dropped", 7)) {
            printf("{\"dropped\": %" PRIu64 "}\n", vgpu_client_oneway_dropped());
        } else if (!strncmp(line, "quit", 4)) {
            break;
        }
        fflush(stdout);
    }
    return 0;
}
