# Builds $(OUT)/libvgpu-hook.so. Called from libhook/Makefile, which exports
# OUT, CC and CFLAGS_COMMON. Run-time dependencies: libc, libdl, libpthread.
OUT ?= $(abspath ../vgpu_cgroup/_lib)
CC ?= cc
CFLAGS_COMMON ?= -std=gnu11 -O2 -g -fPIC -Wall -Wextra -Werror -fvisibility=hidden \
                 -I$(CURDIR)/include -D_GNU_SOURCE

# By layer (hook_base.h): base; transport; services; interposition.
HOOK_SRCS = hook_base.c \
            hook_msgpack.c hook_wire.c hook_client.c \
            hook_dev.c hook_view.c hook_mem.c hook_capture.c hook_batch.c hook_gate.c hook_account.c \
            hook_init.c hook_dlsym.c hook_ctx.c hook_alloc.c hook_launch.c hook_nvml.c
HOOK_OBJDIR = $(OUT)/.hook-obj
HOOK_OBJS = $(HOOK_SRCS:%.c=$(HOOK_OBJDIR)/%.o)
HOOK_DEPS = hook_base.h hook_client.h hook_services.h hook_interpose.h include/vgpu_abi.h include/vgpu_cuda.h include/vgpu_nvml.h

.PHONY: all clean
all: $(OUT)/libvgpu-hook.so

# HOOK_EXTRA_CFLAGS: test builds only (tests/test_hook.py builds a copy with
# -DVGPU_DLSYM_ELF_ONLY into a LIBOUT of its own).
$(HOOK_OBJDIR)/%.o: %.c $(HOOK_DEPS) | $(HOOK_OBJDIR)
	$(CC) $(CFLAGS_COMMON) $(HOOK_EXTRA_CFLAGS) -pthread -c $< -o $@

$(HOOK_OBJDIR):
	mkdir -p $@

$(OUT)/libvgpu-hook.so: $(HOOK_OBJS) libvgpu-hook.map
	$(CC) -shared -pthread -o $@ $(HOOK_OBJS) -Wl,--version-script=libvgpu-hook.map \
	    -Wl,-z,now -Wl,--no-undefined -ldl -lpthread

clean:
	rm -rf $(HOOK_OBJDIR) $(OUT)/libvgpu-hook.so
