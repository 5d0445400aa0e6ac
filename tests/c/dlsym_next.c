/*
 * dlsym_next - a second interposer of dlsym, preloaded after the hook and
 * linked with only a SysV hash table (--hash-style=sysv), for the hook's
 * tests: the hook's version-free search for the real dlsym must find this
 * one (the next object after it, as RTLD_NEXT would) through DT_HASH.
 * Says so on stderr once, then forwards to the C library's.
 */
#include <dlfcn.h>
#include <unistd.h>

__attribute__((visibility("default"))) void *dlsym(void *handle, const char *name)
{
    static void *(*next)(void *, const char *);
    static int said;
    if (!next)
        next = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!next)
        next = (void *(*)(void *, const char *))dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    if (!said) {
        said = 1;
        static const char msg[] = "dlsym_next: called\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
    }
    return next ? next(handle, name) : NULL;
}
