/*
 * rtld_next - dlsym(RTLD_NEXT) as a program and as a plugin it dlopens
 * (argv[1], built from rtld_next_plugin.c) ask for it, for the hook's tests:
 * run with and without the hook, every answer must be the same. Prints one
 * JSON object: "who:name" -> "library:symbol" (or "null").
 */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

static void show(const char *who, const char *name, void *p, int *first)
{
    Dl_info info;
    const char *lib = "null", *sym = "null";
    if (p && dladdr(p, &info)) {
        lib = info.dli_fname ? strrchr(info.dli_fname, '/') ? strrchr(info.dli_fname, '/') + 1 : info.dli_fname : "?";
        sym = info.dli_sname ? info.dli_sname : "?";
    } else if (p) {
        lib = sym = "?";
    }
    printf("%s\"%s:%s\": \"%s:%s\"", *first ? "" : ", ", who, name, lib, sym);
    *first = 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    void *plugin = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    void *(*next)(const char *) = plugin ? (void *(*)(const char *))dlsym(plugin, "plugin_next") : NULL;
    if (!next)
        return 3;
    const char *names[] = {"puts", "malloc", "strlen", "environ", "plugin_next", "no_such_symbol"};
    int first = 1;
    printf("{");
    for (unsigned i = 0; i < sizeof names / sizeof names[0]; i++) {
        show("main", names[i], dlsym(RTLD_NEXT, names[i]), &first);
        show("plugin", names[i], next(names[i]), &first);
    }
    printf("}\n");
    return 0;
}
