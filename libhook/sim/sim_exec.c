/*
 * sim_exec.c - what runs on the device: modules and their functions (a kernel
 * named sim_sleep_ns runs for its first parameter's nanoseconds), kernel
 * launches, and graphs (built, captured, instantiated, launched).
 */
#include "sim_internal.h"

/* ---- modules ---- */
static CUresult module_new(CUmodule *module)
{
    WITH_CTX(c);
    CUresult r = CUDA_ERROR_OUT_OF_MEMORY;
    CUmodule m = calloc(1, sizeof *m);
    if (m != NULL && sim_mem_charge(g_s, phys(c->dev), MODULE_OVERHEAD) == 0) {
        m->h.type = T_MODULE;
        m->h.ctx = c;
        if (reg_add(m, T_MODULE)) {
            *module = m;
            r = CUDA_SUCCESS;
        } else {
            sim_mem_uncharge(g_s, phys(c->dev), MODULE_OVERHEAD);
        }
    }
    if (r != CUDA_SUCCESS)
        free(m);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuModuleLoadData(CUmodule *module, const void *image)
{
    CHECK_INIT();
    if (module == NULL || image == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    return module_new(module);
}

CUresult cuModuleLoad(CUmodule *module, const char *fname)
{
    CHECK_INIT();
    if (module == NULL || fname == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    if (access(fname, R_OK) != 0)
        return CUDA_ERROR_NOT_FOUND;
    return module_new(module);
}

void module_free_locked(CUmodule m)
{
    for (size_t i = 0; i < g_reg.cap; i++) {
        if (g_reg.k[i] > 1 && g_reg.v[i] == T_FUNC && ((CUfunction)g_reg.k[i])->mod == m) {
            CUfunction f = (CUfunction)g_reg.k[i];
            reg_del(f);
            free(f);
        }
    }
    sim_mem_uncharge(g_s, phys(m->h.ctx->dev), MODULE_OVERHEAD);
    reg_del(m);
    free(m);
}

CUresult cuModuleUnload(CUmodule hmod)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hmod, T_MODULE)) {
        module_free_locked(hmod);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name)
{
    CHECK_INIT();
    if (hfunc == NULL || name == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_HANDLE;
    if (reg_is(hmod, T_MODULE)) {
        CUfunction f = calloc(1, sizeof *f);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        if (f != NULL) {
            f->h.type = T_FUNC;
            f->h.ctx = hmod->h.ctx;
            f->mod = hmod;
            snprintf(f->name, sizeof f->name, "%s", name);
            f->sleep = strcmp(name, "sim_sleep_ns") == 0;
            if (reg_add(f, T_FUNC)) {
                *hfunc = f;
                r = CUDA_SUCCESS;
            } else {
                free(f);
            }
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

/* ---- graphs ---- */
void graph_free_locked(CUgraph g)
{
    for (size_t i = 0; i < g->n; i++) {
        reg_del(g->nodes[i]);
        free(g->nodes[i]);
    }
    free(g->nodes);
    reg_del(g);
    free(g);
}

CUgraph graph_new_locked(void)
{
    CUgraph g = calloc(1, sizeof *g);
    if (g == NULL)
        return NULL;
    g->h.type = T_GRAPH;
    if (!reg_add(g, T_GRAPH)) {
        free(g);
        return NULL;
    }
    return g;
}

static CUresult graph_add_locked(CUgraph g, bool kernel, uint64_t ns, CUgraphNode *out)
{
    if (g->n == g->cap) {
        size_t cap = g->cap ? g->cap * 2 : 16;
        CUgraphNode *nn = realloc(g->nodes, cap * sizeof *nn);
        if (nn == NULL)
            return CUDA_ERROR_OUT_OF_MEMORY;
        g->nodes = nn;
        g->cap = cap;
    }
    CUgraphNode node = calloc(1, sizeof *node);
    if (node == NULL || !reg_add(node, T_NODE)) {
        free(node);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    node->h.type = T_NODE;
    node->g = g;
    node->kernel = kernel;
    node->ns = ns;
    g->nodes[g->n++] = node;
    if (out)
        *out = node;
    return CUDA_SUCCESS;
}

CUresult cuGraphCreate(CUgraph *phGraph, unsigned int flags)
{
    CHECK_INIT();
    if (phGraph == NULL || flags != 0)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    *phGraph = graph_new_locked();
    pthread_mutex_unlock(&g_mu);
    return *phGraph ? CUDA_SUCCESS : CUDA_ERROR_OUT_OF_MEMORY;
}

static CUresult check_deps(CUgraph g, const CUgraphNode *deps, size_t n)
{
    if (n > 0 && deps == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    for (size_t i = 0; i < n; i++)
        if (!reg_is(deps[i], T_NODE) || deps[i]->g != g)
            return CUDA_ERROR_INVALID_VALUE;
    return CUDA_SUCCESS;
}

static uint64_t kernel_ns(CUfunction f, void **params, void **extra)
{
    if (!f->sleep)
        return g_kernel_ns;
    uint64_t v = 0;
    if (params != NULL && params[0] != NULL) {
        memcpy(&v, params[0], sizeof v);
        return v;
    }
    /* extra = {CU_LAUNCH_PARAM_BUFFER_POINTER, buf, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, END} */
    for (int i = 0; extra != NULL && i < 16 && extra[i] != NULL; i += 2)
        if (extra[i] == (void *)1 && extra[i + 1] != NULL) {
            memcpy(&v, extra[i + 1], sizeof v);
            return v;
        }
    return g_kernel_ns;
}

CUresult cuGraphAddKernelNode_v2(CUgraphNode *phGraphNode, CUgraph hGraph, const CUgraphNode *dependencies,
                                 size_t numDependencies, const CUDA_KERNEL_NODE_PARAMS_v2 *p)
{
    CHECK_INIT();
    if (phGraphNode == NULL || p == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r;
    if (!reg_is(hGraph, T_GRAPH))
        r = CUDA_ERROR_INVALID_VALUE;
    else if ((r = check_deps(hGraph, dependencies, numDependencies)) != CUDA_SUCCESS)
        ;
    else if (!reg_is(p->func, T_FUNC))
        r = CUDA_ERROR_INVALID_VALUE;
    else
        r = graph_add_locked(hGraph, true, kernel_ns(p->func, p->kernelParams, p->extra), phGraphNode);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphAddEmptyNode(CUgraphNode *phGraphNode, CUgraph hGraph, const CUgraphNode *dependencies,
                             size_t numDependencies)
{
    CHECK_INIT();
    if (phGraphNode == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r;
    if (!reg_is(hGraph, T_GRAPH))
        r = CUDA_ERROR_INVALID_VALUE;
    else if ((r = check_deps(hGraph, dependencies, numDependencies)) == CUDA_SUCCESS)
        r = graph_add_locked(hGraph, false, 0, phGraphNode);
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec *phGraphExec, CUgraph hGraph, unsigned long long flags)
{
    CHECK_INIT();
    (void)flags;
    if (phGraphExec == NULL)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraph, T_GRAPH)) {
        CUgraphExec e = calloc(1, sizeof *e);
        uint64_t *ns = calloc(hGraph->n ? hGraph->n : 1, sizeof *ns);
        r = CUDA_ERROR_OUT_OF_MEMORY;
        if (e != NULL && ns != NULL) {
            e->h.type = T_EXEC;
            e->ns = ns;
            for (size_t i = 0; i < hGraph->n; i++)
                if (hGraph->nodes[i]->kernel)
                    e->ns[e->n++] = hGraph->nodes[i]->ns;
            if (reg_add(e, T_EXEC)) {
                *phGraphExec = e;
                r = CUDA_SUCCESS;
            }
        }
        if (r != CUDA_SUCCESS) {
            free(e);
            free(ns);
        }
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphExecDestroy(CUgraphExec hGraphExec)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraphExec, T_EXEC)) {
        reg_del(hGraphExec);
        free(hGraphExec->ns);
        free(hGraphExec);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

CUresult cuGraphDestroy(CUgraph hGraph)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUresult r = CUDA_ERROR_INVALID_VALUE;
    if (reg_is(hGraph, T_GRAPH)) {
        graph_free_locked(hGraph);
        r = CUDA_SUCCESS;
    }
    pthread_mutex_unlock(&g_mu);
    return r;
}

static CUresult graph_launch(CUgraphExec e, CUstream hs, bool ptsz)
{
    CHECK_INIT();
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(e, T_EXEC))
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked(s->h.ctx, true);
    if (r == CUDA_SUCCESS && s->capture != NULL) {
        r = capture_join_locked(s);
        for (size_t i = 0; i < e->n && r == CUDA_SUCCESS; i++)
            r = graph_add_locked(s->capture, true, e->ns[i], NULL);
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    struct op op = {.kind = OP_GRAPH};
    if (r == CUDA_SUCCESS) {
        op.graph_n = e->n;
        op.graph_ns = malloc((e->n ? e->n : 1) * sizeof *op.graph_ns);
        if (op.graph_ns == NULL)
            r = CUDA_ERROR_OUT_OF_MEMORY;
        else
            memcpy(op.graph_ns, e->ns, e->n * sizeof *op.graph_ns);
    }
    pthread_mutex_unlock(&g_mu);
    if (r == CUDA_SUCCESS) {
        r = enqueue(s, &op);
        if (r != CUDA_SUCCESS)
            free(op.graph_ns);
    }
    return r;
}

CUresult cuGraphLaunch(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(hGraphExec, hStream, false);
}

CUresult cuGraphLaunch_ptsz(CUgraphExec hGraphExec, CUstream hStream)
{
    return graph_launch(hGraphExec, hStream, true);
}

/* ---- launches ---- */
static CUresult launch(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                       CUstream hs, bool ptsz, void **params, void **extra)
{
    CHECK_INIT();
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || bx * by * bz > 1024)
        return CUDA_ERROR_INVALID_VALUE;
    pthread_mutex_lock(&g_mu);
    CUstream s;
    CUresult r = resolve_stream(hs, &s);
    if (r == CUDA_SUCCESS && !reg_is(f, T_FUNC))
        r = CUDA_ERROR_INVALID_HANDLE;
    if (r == CUDA_SUCCESS && is_legacy(hs, ptsz))
        r = capture_legacy_locked(s->h.ctx, true);
    if (r == CUDA_SUCCESS && s->capture != NULL)
        r = capture_join_locked(s);
    if (r != CUDA_SUCCESS) {
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    uint64_t ns = kernel_ns(f, params, extra);
    if (s->capture != NULL) {
        r = graph_add_locked(s->capture, true, ns, NULL);
        pthread_mutex_unlock(&g_mu);
        return r;
    }
    pthread_mutex_unlock(&g_mu);
    struct op op = {.kind = OP_KERNEL, .ns = ns};
    return enqueue(s, &op);
}

CUresult cuLaunchKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                        unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                        unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, false, kernelParams,
                  extra);
}

CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                             unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                             unsigned int sharedMemBytes, CUstream hStream, void **kernelParams, void **extra)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, true, kernelParams,
                  extra);
}

static CUresult launch_ex(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra, bool ptsz)
{
    if (config == NULL || (config->numAttrs > 0 && config->attrs == NULL))
        return check_init() ? check_init() : CUDA_ERROR_INVALID_VALUE;
    return launch(f, config->gridDimX, config->gridDimY, config->gridDimZ, config->blockDimX, config->blockDimY,
                  config->blockDimZ, config->hStream, ptsz, kernelParams, extra);
}

CUresult cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
    return launch_ex(config, f, kernelParams, extra, false);
}

CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *config, CUfunction f, void **kernelParams, void **extra)
{
    return launch_ex(config, f, kernelParams, extra, true);
}

CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gridDimX, unsigned int gridDimY, unsigned int gridDimZ,
                                   unsigned int blockDimX, unsigned int blockDimY, unsigned int blockDimZ,
                                   unsigned int sharedMemBytes, CUstream hStream, void **kernelParams)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, false, kernelParams,
                  NULL);
}

CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gridDimX, unsigned int gridDimY,
                                        unsigned int gridDimZ, unsigned int blockDimX, unsigned int blockDimY,
                                        unsigned int blockDimZ, unsigned int sharedMemBytes, CUstream hStream,
                                        void **kernelParams)
{
    (void)sharedMemBytes;
    return launch(f, gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, hStream, true, kernelParams,
                  NULL);
}
