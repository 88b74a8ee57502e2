/*
 * Handles. Parent GPU handles are a static array. GPU-instance, compute-instance and MIG device
 * handles are allocated once per instance *incarnation* (its creation serial) and never freed:
 * a handle stays a valid pointer for the life of the library, while a handle to a destroyed
 * instance -- even if an instance with the same id was created since -- resolves to
 * NVML_ERROR_INVALID_ARGUMENT, as a stale handle does with the real driver.
 */
#include <stdlib.h>

#include "sim.h"

#define MAGIC_GPU 0x4E564750U /* "NVGP" */
#define MAGIC_MIG 0x4E564D47U /* "NVMG" */
#define MAGIC_GI 0x4E564749U  /* "NVGI" */
#define MAGIC_CI 0x4E564349U  /* "NVCI" */

static struct nvmlDevice_st gpu_handles[SIM_MAX_GPUS];
static struct nvmlDevice_st *mig_cache[SIM_MAX_GPUS][SIM_MAX_GI][SIM_MAX_CI];
static struct nvmlGpuInstance_st *gi_cache[SIM_MAX_GPUS][SIM_MAX_GI];
static struct nvmlComputeInstance_st *ci_cache[SIM_MAX_GPUS][SIM_MAX_GI][SIM_MAX_CI];

static int is_gpu_handle(const struct nvmlDevice_st *device)
{
    uintptr_t address = (uintptr_t)device;
    return address >= (uintptr_t)&gpu_handles[0] &&
           address < (uintptr_t)&gpu_handles[SIM_MAX_GPUS];
}

nvmlDevice_t sim_device_handle(unsigned int gpu)
{
    struct nvmlDevice_st *handle = &gpu_handles[gpu];
    handle->magic = MAGIC_GPU;
    handle->is_mig = 0;
    handle->gpu = gpu;
    return handle;
}

/* Allocation failure is reported as NULL; callers map it to NVML_ERROR_MEMORY. */
nvmlDevice_t sim_mig_handle(const struct sim_state *state, unsigned int gpu, unsigned int gi,
                            unsigned int ci)
{
    uint64_t serial = state->gpu[gpu].gi[gi].ci[ci].serial;
    struct nvmlDevice_st *cached = mig_cache[gpu][gi][ci];
    if (cached != NULL && cached->serial == serial && cached->state_id == state->id) {
        return cached;
    }
    struct nvmlDevice_st *handle = calloc(1, sizeof *handle);
    if (handle == NULL) {
        return NULL;
    }
    *handle = (struct nvmlDevice_st){.magic = MAGIC_MIG, .is_mig = 1, .gpu = gpu, .gi = gi,
                                     .ci = ci, .serial = serial, .state_id = state->id};
    mig_cache[gpu][gi][ci] = handle;
    return handle;
}

nvmlGpuInstance_t sim_gi_handle(const struct sim_state *state, unsigned int gpu, unsigned int gi)
{
    uint64_t serial = state->gpu[gpu].gi[gi].serial;
    struct nvmlGpuInstance_st *cached = gi_cache[gpu][gi];
    if (cached != NULL && cached->serial == serial && cached->state_id == state->id) {
        return cached;
    }
    struct nvmlGpuInstance_st *handle = calloc(1, sizeof *handle);
    if (handle == NULL) {
        return NULL;
    }
    *handle = (struct nvmlGpuInstance_st){
        .magic = MAGIC_GI, .gpu = gpu, .gi = gi, .serial = serial, .state_id = state->id};
    gi_cache[gpu][gi] = handle;
    return handle;
}

nvmlComputeInstance_t sim_ci_handle(const struct sim_state *state, unsigned int gpu,
                                    unsigned int gi, unsigned int ci)
{
    uint64_t serial = state->gpu[gpu].gi[gi].ci[ci].serial;
    struct nvmlComputeInstance_st *cached = ci_cache[gpu][gi][ci];
    if (cached != NULL && cached->serial == serial && cached->state_id == state->id) {
        return cached;
    }
    struct nvmlComputeInstance_st *handle = calloc(1, sizeof *handle);
    if (handle == NULL) {
        return NULL;
    }
    *handle = (struct nvmlComputeInstance_st){.magic = MAGIC_CI, .gpu = gpu, .gi = gi, .ci = ci,
                                              .serial = serial, .state_id = state->id};
    ci_cache[gpu][gi][ci] = handle;
    return handle;
}

static int gi_live(const struct sim_state *state, unsigned int gpu, unsigned int gi,
                   uint64_t serial)
{
    return gpu < state->gpu_count && gi < SIM_MAX_GI && state->gpu[gpu].mig_current &&
           state->gpu[gpu].gi[gi].used && state->gpu[gpu].gi[gi].serial == serial;
}

static int ci_live(const struct sim_state *state, unsigned int gpu, unsigned int gi,
                   unsigned int ci, uint64_t serial)
{
    return gpu < state->gpu_count && gi < SIM_MAX_GI && ci < SIM_MAX_CI &&
           state->gpu[gpu].mig_current && state->gpu[gpu].gi[gi].used &&
           state->gpu[gpu].gi[gi].ci[ci].used && state->gpu[gpu].gi[gi].ci[ci].serial == serial;
}

/* nvml.h: "NVML_ERROR_GPU_IS_LOST if the target GPU has fallen off the bus or is otherwise
 * inaccessible" -- for every handle on that GPU, MIG devices and instances included, since they
 * live on the same board. Checked after the handle itself, so a stale handle stays
 * NVML_ERROR_INVALID_ARGUMENT. */
nvmlReturn_t sim_check_gpu_reachable(unsigned int gpu)
{
    return sim_gpu_lost(gpu) ? NVML_ERROR_GPU_IS_LOST : NVML_SUCCESS;
}

nvmlReturn_t sim_resolve_device(const struct sim_state *state, nvmlDevice_t device,
                                const struct nvmlDevice_st **out)
{
    if (device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (is_gpu_handle(device)) {
        if (device->magic != MAGIC_GPU || device->gpu >= state->gpu_count) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
    } else if (device->magic != MAGIC_MIG || device->state_id != state->id ||
               !ci_live(state, device->gpu, device->gi, device->ci, device->serial)) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_gpu_reachable(device->gpu));
    *out = device;
    return NVML_SUCCESS;
}

nvmlReturn_t sim_resolve_gpu(const struct sim_state *state, nvmlDevice_t device,
                             unsigned int *gpu)
{
    const struct nvmlDevice_st *resolved;
    SIM_CHECK(sim_resolve_device(state, device, &resolved));
    if (resolved->is_mig) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    *gpu = resolved->gpu;
    return NVML_SUCCESS;
}

nvmlReturn_t sim_resolve_mig_gpu(const struct sim_state *state, nvmlDevice_t device,
                                 unsigned int *gpu)
{
    SIM_CHECK(sim_resolve_gpu(state, device, gpu));
    return state->gpu[*gpu].mig_current ? NVML_SUCCESS : NVML_ERROR_NOT_SUPPORTED;
}

nvmlReturn_t sim_resolve_gi(const struct sim_state *state, nvmlGpuInstance_t handle,
                            unsigned int *gpu, unsigned int *gi)
{
    if (handle == NULL || handle->magic != MAGIC_GI || handle->state_id != state->id ||
        !gi_live(state, handle->gpu, handle->gi, handle->serial)) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_gpu_reachable(handle->gpu));
    *gpu = handle->gpu;
    *gi = handle->gi;
    return NVML_SUCCESS;
}

nvmlReturn_t sim_resolve_ci(const struct sim_state *state, nvmlComputeInstance_t handle,
                            unsigned int *gpu, unsigned int *gi, unsigned int *ci)
{
    if (handle == NULL || handle->magic != MAGIC_CI || handle->state_id != state->id ||
        !ci_live(state, handle->gpu, handle->gi, handle->ci, handle->serial)) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_gpu_reachable(handle->gpu));
    *gpu = handle->gpu;
    *gi = handle->gi;
    *ci = handle->ci;
    return NVML_SUCCESS;
}

nvmlReturn_t sim_synced_device(nvmlDevice_t device, const struct nvmlDevice_st **out)
{
    SIM_CHECK(sim_sync());
    return sim_resolve_device(&sim.state, device, out);
}

nvmlReturn_t sim_synced_gpu(nvmlDevice_t device, unsigned int *gpu)
{
    SIM_CHECK(sim_sync());
    return sim_resolve_gpu(&sim.state, device, gpu);
}

nvmlReturn_t sim_synced_mig_gpu(nvmlDevice_t device, unsigned int *gpu)
{
    SIM_CHECK(sim_sync());
    return sim_resolve_mig_gpu(&sim.state, device, gpu);
}

nvmlReturn_t sim_synced_gi(nvmlGpuInstance_t handle, unsigned int *gpu, unsigned int *gi)
{
    SIM_CHECK(sim_sync());
    return sim_resolve_gi(&sim.state, handle, gpu, gi);
}

nvmlReturn_t sim_synced_ci(nvmlComputeInstance_t handle, unsigned int *gpu, unsigned int *gi,
                           unsigned int *ci)
{
    SIM_CHECK(sim_sync());
    return sim_resolve_ci(&sim.state, handle, gpu, gi, ci);
}
