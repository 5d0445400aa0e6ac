/*
 * rtld_next_plugin - a library a program dlopens after its dependencies
 * (as a plugin), asking dlsym(RTLD_NEXT) from there: for tests/c/rtld_next.c.
 */
#include <dlfcn.h>

__attribute__((visibility("default"))) void *plugin_next(const char *name)
{
    return dlsym(RTLD_NEXT, name);
}
