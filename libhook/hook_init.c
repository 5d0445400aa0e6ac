/*
 * hook_init.c - configuration, lazy registration, real-symbol resolution,
 * fork handling.
 *
 * Nothing happens at load time except registering the fork handler: the
 * library may be preloaded into every process on a node (ld.so.preload), and
 * most of them never touch CUDA. The first intercepted call resolves the real
 * driver, reads hook.conf and registers with vgpud; every later call pays
 * one atomic load (vgpu_ensure's fast path).
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <signal.h>

#include "hook_interpose.h"

static pthread_once_t resolve_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t init_mu = PTHREAD_MUTEX_INITIALIZER;
static bool resolved_ok;

/* ---- configuration ---- */

static void trim(char *s)
{
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' ' || s[n - 1] == '\t'))
        s[--n] = 0;
}

/* Parse hook.conf: `key=value` lines, `#` comments. Unknown keys and bad
 * values get one warning and are ignored, never fatal. */
static bool read_conf(const char *path, bool *allow_env)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    snprintf(vgpu_cfg.conf_path, sizeof vgpu_cfg.conf_path, "%s", path);
    char line[512];
    while (fgets(line, sizeof line, f)) {
        trim(line);
        char *p = line;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!*p || *p == '#')
            continue;
        char *eq = strchr(p, '=');
        if (!eq) {
            vgpu_warn_once(VGPU_W_CONF, "vgpu: %s: ignoring line without '=': %s", path, p);
            continue;
        }
        *eq = 0;
        char *key = p, *val = eq + 1;
        trim(key);
        while (*val == ' ' || *val == '\t')
            val++;
        if (!strcmp(key, "socket")) {
            if (strlen(val) >= sizeof vgpu_cfg.socket)
                vgpu_warn_once(VGPU_W_CONF, "vgpu: %s: socket path too long", path);
            else
                strcpy(vgpu_cfg.socket, val);
        } else if (!strcmp(key, "on_no_daemon")) {
            if (!strcmp(val, "fail"))
                vgpu_cfg.on_no_daemon_unlimited = false;
            else if (!strcmp(val, "unlimited"))
                vgpu_cfg.on_no_daemon_unlimited = true;
            else
                vgpu_warn_once(VGPU_W_CONF, "vgpu: %s: on_no_daemon must be fail or unlimited, not '%s'", path, val);
        } else if (!strcmp(key, "connect_timeout_ms")) {
            char *end;
            long v = strtol(val, &end, 10);
            if (*end || v < 0 || v > 600000)
                vgpu_warn_once(VGPU_W_CONF, "vgpu: %s: bad connect_timeout_ms '%s'", path, val);
            else
                vgpu_cfg.connect_timeout_ms = (int)v;
        } else if (!strcmp(key, "allow_env")) {
            *allow_env = !strcmp(val, "1") || !strcmp(val, "yes") || !strcmp(val, "true");
        } else {
            vgpu_warn_once(VGPU_W_CONF, "vgpu: %s: unknown key '%s'", path, key);
        }
    }
    fclose(f);
    return true;
}

static void load_config(void)
{
    snprintf(vgpu_cfg.socket, sizeof vgpu_cfg.socket, "%s", VGPU_DEFAULT_SOCKET);
    vgpu_cfg.on_no_daemon_unlimited = false;
    vgpu_cfg.connect_timeout_ms = 2000;
    vgpu_cfg.conf_path[0] = 0;

    bool allow_env = true;
    struct stat st;
    if (stat(VGPU_HOOK_CONF, &st) == 0) {
        /* The operator's file wins over the environment, which the program's
         * own user controls. Only a root-owned, not world-writable file
         * counts as the operator's. */
        if (st.st_uid != 0 || (st.st_mode & S_IWOTH)) {
            vgpu_warn_once(VGPU_W_CONF, "vgpu: ignoring %s: not root-owned or world-writable", VGPU_HOOK_CONF);
        } else {
            allow_env = false;
            read_conf(VGPU_HOOK_CONF, &allow_env);
        }
    } else {
        const char *alt = getenv("VGPU_HOOK_CONF");
        if (alt && *alt)
            read_conf(alt, &allow_env);
    }
    const char *env = getenv("VGPU_SOCKET");
    if (allow_env && env && *env && strlen(env) < sizeof vgpu_cfg.socket)
        snprintf(vgpu_cfg.socket, sizeof vgpu_cfg.socket, "%s", env);
}

/* ---- real symbols ---- */

static void *libcuda_handle, *libnvml_handle;
static pthread_mutex_t nvml_mu = PTHREAD_MUTEX_INITIALIZER;
static _Atomic int nvml_state; /* 0 untried, 1 ok, 2 failed */

static bool resolve_cuda(void)
{
    const char *path = getenv("VGPU_REAL_LIBCUDA");
    if (!path || !*path)
        path = "libcuda.so.1";
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        vgpu_warn_once(VGPU_W_LIBCUDA, "vgpu: cannot load the CUDA driver %s: %s", path, dlerror());
        return false;
    }
#define VGPU_RESOLVE(name) real_##name = (__typeof__(&name))vgpu_real_dlsym(h, #name);
    VGPU_HOOKED_CUDA(VGPU_RESOLVE)
    VGPU_USED_CUDA(VGPU_RESOLVE)
#undef VGPU_RESOLVE
    /* Installed as libcuda.so.1 without VGPU_REAL_LIBCUDA we would find
     * ourselves: calling that would recurse forever. */
    if ((void *)real_cuInit == (void *)&cuInit || !real_cuInit) {
        vgpu_warn_once(VGPU_W_LIBCUDA, "vgpu: %s is the hook itself or lacks cuInit; set VGPU_REAL_LIBCUDA to the driver's path", path);
        return false;
    }
    libcuda_handle = h;
    vgpu_dlsym_fill_real(h, NULL);
    return true;
}

bool vgpu_resolve_nvml(void)
{
    int s = atomic_load_explicit(&nvml_state, memory_order_acquire);
    if (s)
        return s == 1;
    pthread_mutex_lock(&nvml_mu);
    if (!atomic_load(&nvml_state)) {
        vgpu_in_hook++; /* NVML's constructors may call back into us */
        void *h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
        vgpu_in_hook--;
        if (h) {
#define VGPU_RESOLVE(name) real_##name = (__typeof__(&name))vgpu_real_dlsym(h, #name);
            VGPU_HOOKED_NVML(VGPU_RESOLVE)
            VGPU_USED_NVML(VGPU_RESOLVE)
#undef VGPU_RESOLVE
        }
        if (!h || (void *)real_nvmlDeviceGetMemoryInfo == (void *)&nvmlDeviceGetMemoryInfo) {
            vgpu_warn_once(VGPU_W_NVML, "vgpu: cannot load NVML (libnvidia-ml.so.1)");
            atomic_store(&nvml_state, 2);
        } else {
            libnvml_handle = h;
            vgpu_dlsym_fill_real(NULL, h);
            atomic_store(&nvml_state, 1);
        }
    }
    pthread_mutex_unlock(&nvml_mu);
    return atomic_load(&nvml_state) == 1;
}

static void resolve(void)
{
    load_config();
    resolved_ok = resolve_cuda();
}

/* ---- registration ---- */

static int slow_init(void)
{
    if (vgpu_in_hook) /* the driver called back into us during init */
        return VGPU_MODE_PASSTHROUGH;
    vgpu_in_hook++; /* dlopen runs the driver's constructors */
    pthread_once(&resolve_once, resolve);
    pthread_mutex_lock(&init_mu);
    int m = atomic_load(&vgpu_mode);
    if (m == VGPU_MODE_UNINIT) {
        if (!resolved_ok) {
            m = VGPU_MODE_BROKEN;
        } else if (vgpu_client_register()) {
            m = VGPU_MODE_REGISTERED;
        } else if (vgpu_cfg.on_no_daemon_unlimited) {
            m = VGPU_MODE_PASSTHROUGH;
        } else {
            m = VGPU_MODE_FAIL;
        }
        atomic_store_explicit(&vgpu_mode, m, memory_order_release);
        if (m == VGPU_MODE_REGISTERED)
            vgpu_account_start();
    }
    pthread_mutex_unlock(&init_mu);
    vgpu_in_hook--;
    return m;
}

int vgpu_ensure(void)
{
    int m = atomic_load_explicit(&vgpu_mode, memory_order_acquire);
    if (__builtin_expect(m != VGPU_MODE_UNINIT, 1))
        return m;
    return slow_init();
}

/* ---- fork ---- */

static void atfork_child(void)
{
    /* The child has one thread: ours (accountant, monitor) are gone, and any
     * lock another parent thread held is held forever here. Re-create locks,
     * forget the connection, what the parent held and its batches; the next
     * CUDA call registers the child as its own client. */
    pthread_mutex_init(&init_mu, NULL);
    pthread_mutex_init(&nvml_mu, NULL);
    vgpu_client_atfork_child();
    vgpu_dev_atfork_child();
    vgpu_view_atfork_child();
    vgpu_mem_atfork_child();
    vgpu_launch_atfork_child();
    vgpu_account_atfork_child();
    int m = atomic_load(&vgpu_mode);
    if (m != VGPU_MODE_BROKEN)
        atomic_store(&vgpu_mode, VGPU_MODE_UNINIT);
}

__attribute__((constructor)) static void vgpu_ctor(void)
{
    pthread_atfork(NULL, NULL, atfork_child);
}
