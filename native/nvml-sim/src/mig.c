/*
 * MIG: mode (current/pending), GPU-instance and compute-instance profiles, placements,
 * capacity, creation and destruction, and MIG device handles.
 *
 * Capacity rules (NVIDIA MIG user guide, "Partitioning"): a GPU instance occupies the memory
 * slices of its placement, which may not overlap another instance's; the compute slices of all
 * GPU instances may not exceed the GPU's seven; and each profile allows at most instanceCount
 * instances. A compute instance occupies compute slices of its GPU instance the same way.
 */
#include <stdio.h>
#include <string.h>

#include "sim.h"

#define SIM_MAX_PROCESSES 1024
static struct sim_process process_buffer[SIM_MAX_PROCESSES];

/* ---- helpers on the state ----------------------------------------------------------------- */

static unsigned int gi_memory_mask(const struct sim_gi *g)
{
    unsigned int size = sim_gi_profiles[g->kind].memory_slices;
    return ((1U << size) - 1U) << g->start;
}

struct gpu_usage {
    unsigned int memory_mask;
    unsigned int compute_slices;
    unsigned int instances[GI_KIND_COUNT];
};

static struct gpu_usage gpu_usage(const struct sim_gpu *gpu)
{
    struct gpu_usage usage = {0};
    for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
        const struct sim_gi *g = &gpu->gi[gi];
        if (g->used) {
            usage.memory_mask |= gi_memory_mask(g);
            usage.compute_slices += sim_gi_profiles[g->kind].compute_slices;
            usage.instances[g->kind]++;
        }
    }
    return usage;
}

static int gi_has_cis(const struct sim_gi *g)
{
    for (unsigned int ci = 0; ci < SIM_MAX_CI; ci++) {
        if (g->ci[ci].used) {
            return 1;
        }
    }
    return 0;
}

static int gpu_has_gis(const struct sim_gpu *gpu)
{
    for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
        if (gpu->gi[gi].used) {
            return 1;
        }
    }
    return 0;
}

static unsigned int ci_slice_mask(unsigned int profile, unsigned int start)
{
    return ((1U << sim_ci_slices(profile)) - 1U) << start;
}

static unsigned int gi_compute_usage(const struct sim_gi *g)
{
    unsigned int mask = 0;
    for (unsigned int ci = 0; ci < SIM_MAX_CI; ci++) {
        if (g->ci[ci].used) {
            mask |= ci_slice_mask(g->ci[ci].profile, g->ci[ci].start);
        }
    }
    return mask;
}

/* Live processes on a GPU that sit in (gi, ci); NVML_VALUE_NOT_AVAILABLE_UINT matches any. */
static int busy(unsigned int gpu, unsigned int gi, unsigned int ci)
{
    int count = sim_live_processes(process_buffer, SIM_MAX_PROCESSES);
    if (count < 0) {
        return -1;
    }
    for (int i = 0; i < count; i++) {
        const struct sim_process *p = &process_buffer[i];
        if (p->gpu == gpu && (gi == NVML_VALUE_NOT_AVAILABLE_UINT || p->gi == gi) &&
            (ci == NVML_VALUE_NOT_AVAILABLE_UINT || p->ci == ci)) {
            return 1;
        }
    }
    return 0;
}

/* ---- MIG mode ----------------------------------------------------------------------------- */

SIM_API(nvmlDeviceGetMigMode, (nvmlDevice_t device, unsigned int *currentMode,
                               unsigned int *pendingMode),
        (device, currentMode, pendingMode))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (currentMode == NULL || pendingMode == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *currentMode = sim.state.gpu[gpu].mig_current;
    *pendingMode = sim.state.gpu[gpu].mig_pending;
    return NVML_SUCCESS;
}

struct set_mig_request {
    nvmlDevice_t device;
    unsigned int mode;
    nvmlReturn_t *activation_status;
};

static nvmlReturn_t set_mig_mode(struct sim_state *st, void *ctx, int *changed)
{
    struct set_mig_request *req = ctx;
    unsigned int gpu;
    SIM_CHECK(sim_resolve_gpu(st, req->device, &gpu));
    if (req->activation_status == NULL || req->mode > NVML_DEVICE_MIG_ENABLE) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    struct sim_gpu *g = &st->gpu[gpu];
    /* The MIG user guide: GPU instances must be destroyed before MIG mode is disabled. */
    if (req->mode == NVML_DEVICE_MIG_DISABLE && g->mig_current && gpu_has_gis(g)) {
        return NVML_ERROR_IN_USE;
    }
    if (g->mig_pending != req->mode) {
        g->mig_pending = req->mode;
        *changed = 1;
    }
    /* The new mode becomes current at the next GPU reset (nvmlSimResetGpu here). */
    *req->activation_status =
        g->mig_pending == g->mig_current ? NVML_SUCCESS : NVML_ERROR_RESET_REQUIRED;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceSetMigMode, (nvmlDevice_t device, unsigned int mode,
                               nvmlReturn_t *activationStatus),
        (device, mode, activationStatus))
{
    struct set_mig_request req = {device, mode, activationStatus};
    return sim_mutate(1, set_mig_mode, &req);
}

struct reset_request {
    unsigned int gpu;
};

static nvmlReturn_t reset_gpu(struct sim_state *st, void *ctx, int *changed)
{
    struct reset_request *req = ctx;
    if (req->gpu >= st->gpu_count) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    /* A GPU that fell off the bus needs a reboot (or `lost 0` in DIR/health), not a reset. */
    SIM_CHECK(sim_check_gpu_reachable(req->gpu));
    int in_use = busy(req->gpu, NVML_VALUE_NOT_AVAILABLE_UINT, NVML_VALUE_NOT_AVAILABLE_UINT);
    if (in_use < 0) {
        return NVML_ERROR_UNKNOWN;
    }
    if (in_use) {
        return NVML_ERROR_IN_USE; /* nvidia-smi -r refuses while processes use the GPU */
    }
    struct sim_gpu *g = &st->gpu[req->gpu];
    g->mig_current = g->mig_pending;
    memset(g->gi, 0, sizeof g->gi);
    *changed = 1;
    return NVML_SUCCESS;
}

/* Sim-only "GPU reset": applies the pending MIG mode and destroys every MIG instance. */
SIM_EXPORT int nvmlSimResetGpu(unsigned int index);
SIM_EXPORT int nvmlSimResetGpu(unsigned int index)
{
    sim_api_lock();
    struct reset_request req = {index};
    nvmlReturn_t r = sim_mutate(0, reset_gpu, &req);
    sim_api_unlock();
    return (int)r;
}

/* ---- GPU-instance profiles ---------------------------------------------------------------- */

static void fill_gi_profile(int model, int kind, nvmlGpuInstanceProfileInfo_t *out)
{
    const struct gi_profile *p = &sim_gi_profiles[kind];
    const struct gi_profile_resources *res = &sim_models[model].profiles[kind];
    memset(out, 0, sizeof *out);
    out->id = p->id;
    out->isP2pSupported = 0;
    out->sliceCount = p->compute_slices;
    out->instanceCount = p->max_instances;
    out->multiprocessorCount = res->multiprocessors;
    out->copyEngineCount = res->copy_engines;
    out->decoderCount = res->decoders;
    out->encoderCount = res->encoders;
    out->jpegCount = res->jpegs;
    out->ofaCount = res->ofas;
    out->memorySizeMB = res->memory_mb;
}

/* Resolves a GPU in MIG mode and a GI profile index. */
static nvmlReturn_t gi_profile_by_index(nvmlDevice_t device, unsigned int profile,
                                        const void *info, unsigned int *gpu, int *kind)
{
    SIM_CHECK(sim_synced_mig_gpu(device, gpu));
    if (info == NULL || profile >= NVML_GPU_INSTANCE_PROFILE_COUNT) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *kind = sim_gi_kind_by_index(profile);
    return *kind < 0 ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetGpuInstanceProfileInfo,
        (nvmlDevice_t device, unsigned int profile, nvmlGpuInstanceProfileInfo_t *info),
        (device, profile, info))
{
    unsigned int gpu;
    int kind;
    SIM_CHECK(gi_profile_by_index(device, profile, info, &gpu, &kind));
    fill_gi_profile(sim.state.gpu[gpu].model, kind, info);
    return NVML_SUCCESS;
}

static void gi_profile_name(int model, int kind, char *out, size_t len)
{
    snprintf(out, len, "MIG %s", sim_models[model].profiles[kind].name);
}

/* Versioned info: v2 (what pynvml sends) or v3. */
static nvmlReturn_t fill_gi_profile_versioned(int model, int kind, void *info)
{
    nvmlGpuInstanceProfileInfo_t base;
    fill_gi_profile(model, kind, &base);
    unsigned int version = *(unsigned int *)info;
    if (version == nvmlGpuInstanceProfileInfo_v2) {
        nvmlGpuInstanceProfileInfo_v2_t *out = info;
        memset(out, 0, sizeof *out);
        out->version = version;
        out->id = base.id;
        out->isP2pSupported = base.isP2pSupported;
        out->sliceCount = base.sliceCount;
        out->instanceCount = base.instanceCount;
        out->multiprocessorCount = base.multiprocessorCount;
        out->copyEngineCount = base.copyEngineCount;
        out->decoderCount = base.decoderCount;
        out->encoderCount = base.encoderCount;
        out->jpegCount = base.jpegCount;
        out->ofaCount = base.ofaCount;
        out->memorySizeMB = base.memorySizeMB;
        gi_profile_name(model, kind, out->name, sizeof out->name);
        return NVML_SUCCESS;
    }
    if (version == nvmlGpuInstanceProfileInfo_v3) {
        nvmlGpuInstanceProfileInfo_v3_t *out = info;
        memset(out, 0, sizeof *out);
        out->version = version;
        out->id = base.id;
        out->sliceCount = base.sliceCount;
        out->instanceCount = base.instanceCount;
        out->multiprocessorCount = base.multiprocessorCount;
        out->copyEngineCount = base.copyEngineCount;
        out->decoderCount = base.decoderCount;
        out->encoderCount = base.encoderCount;
        out->jpegCount = base.jpegCount;
        out->ofaCount = base.ofaCount;
        out->memorySizeMB = base.memorySizeMB;
        gi_profile_name(model, kind, out->name, sizeof out->name);
        out->capabilities = 0; /* no P2P, no graphics */
        return NVML_SUCCESS;
    }
    return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
}

SIM_API(nvmlDeviceGetGpuInstanceProfileInfoV,
        (nvmlDevice_t device, unsigned int profile, void *info), (device, profile, info))
{
    unsigned int gpu;
    int kind;
    SIM_CHECK(gi_profile_by_index(device, profile, info, &gpu, &kind));
    return fill_gi_profile_versioned(sim.state.gpu[gpu].model, kind, info);
}

SIM_API(nvmlDeviceGetGpuInstanceProfileInfoByIdV,
        (nvmlDevice_t device, unsigned int profileId, void *info), (device, profileId, info))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_mig_gpu(device, &gpu));
    int kind = sim_gi_kind_by_id(profileId);
    if (info == NULL || kind < 0) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return fill_gi_profile_versioned(sim.state.gpu[gpu].model, kind, info);
}

static unsigned int popcount(unsigned int mask)
{
    return (unsigned int)__builtin_popcount(mask);
}

/* nvml.h: "returns all the possible placements for the given profile regardless of whether MIG
 * is enabled or not". `count` is output only; the buffer must hold them all. */
SIM_API(nvmlDeviceGetGpuInstancePossiblePlacements_v2,
        (nvmlDevice_t device, unsigned int profileId, nvmlGpuInstancePlacement_t *placements,
         unsigned int *count),
        (device, profileId, placements, count))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    int kind = sim_gi_kind_by_id(profileId);
    if (count == NULL || kind < 0) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct gi_profile *p = &sim_gi_profiles[kind];
    if (placements == NULL) {
        *count = popcount(p->starts_mask);
        return NVML_SUCCESS;
    }
    unsigned int n = 0;
    for (unsigned int start = 0; start < SIM_MEMORY_SLICES; start++) {
        if (p->starts_mask & (1U << start)) {
            placements[n].start = start;
            placements[n].size = p->memory_slices;
            n++;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

/* Placement starts of `kind` that are free on `gpu` now, lowest first, as a mask. */
static unsigned int free_gi_starts(const struct sim_gpu *gpu, int kind)
{
    const struct gi_profile *p = &sim_gi_profiles[kind];
    struct gpu_usage usage = gpu_usage(gpu);
    unsigned int remaining_instances = p->max_instances > usage.instances[kind]
                                           ? p->max_instances - usage.instances[kind]
                                           : 0;
    unsigned int remaining_compute = SIM_COMPUTE_SLICES - usage.compute_slices;
    unsigned int mask = 0;
    unsigned int taken_memory = usage.memory_mask;
    for (unsigned int start = 0; start < SIM_MEMORY_SLICES; start++) {
        if (!(p->starts_mask & (1U << start))) {
            continue;
        }
        unsigned int slices = ((1U << p->memory_slices) - 1U) << start;
        if ((slices & taken_memory) || remaining_instances == 0 ||
            remaining_compute < p->compute_slices) {
            continue;
        }
        /* Counting several instances at once: placements of one profile never overlap each
         * other, so taking each free one greedily gives the maximum. */
        mask |= 1U << start;
        taken_memory |= slices;
        remaining_instances--;
        remaining_compute -= p->compute_slices;
    }
    return mask;
}

SIM_API(nvmlDeviceGetGpuInstanceRemainingCapacity,
        (nvmlDevice_t device, unsigned int profileId, unsigned int *count),
        (device, profileId, count))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_mig_gpu(device, &gpu));
    int kind = sim_gi_kind_by_id(profileId);
    if (count == NULL || kind < 0) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = popcount(free_gi_starts(&sim.state.gpu[gpu], kind));
    return NVML_SUCCESS;
}

/* ---- GPU instances ------------------------------------------------------------------------ */

struct create_gi_request {
    nvmlDevice_t device;
    unsigned int profile_id;
    const nvmlGpuInstancePlacement_t *placement; /* NULL: lowest free start */
    int with_placement;
    int out_given;
    unsigned int gpu;
    unsigned int gi;
};

static nvmlReturn_t create_gi(struct sim_state *st, void *ctx, int *changed)
{
    struct create_gi_request *req = ctx;
    unsigned int gpu;
    SIM_CHECK(sim_resolve_mig_gpu(st, req->device, &gpu));
    int kind = sim_gi_kind_by_id(req->profile_id);
    if (!req->out_given || kind < 0 || (req->with_placement && req->placement == NULL)) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct gi_profile *p = &sim_gi_profiles[kind];
    struct sim_gpu *g = &st->gpu[gpu];
    unsigned int start;
    if (req->with_placement) {
        start = req->placement->start;
        if (start >= SIM_MEMORY_SLICES || !(p->starts_mask & (1U << start)) ||
            req->placement->size != p->memory_slices) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        struct gpu_usage usage = gpu_usage(g);
        unsigned int slices = ((1U << p->memory_slices) - 1U) << start;
        if (usage.instances[kind] >= p->max_instances ||
            usage.compute_slices + p->compute_slices > SIM_COMPUTE_SLICES ||
            (usage.memory_mask & slices)) {
            return NVML_ERROR_INSUFFICIENT_RESOURCES;
        }
    } else {
        unsigned int free_starts = free_gi_starts(g, kind);
        if (free_starts == 0) {
            return NVML_ERROR_INSUFFICIENT_RESOURCES;
        }
        start = (unsigned int)__builtin_ctz(free_starts);
    }
    unsigned int gi = sim_gi_id_for(kind, start);
    if (g->gi[gi].used) { /* unreachable: equal ids imply overlapping placements */
        return NVML_ERROR_INSUFFICIENT_RESOURCES;
    }
    memset(&g->gi[gi], 0, sizeof g->gi[gi]);
    g->gi[gi].used = 1;
    g->gi[gi].kind = kind;
    g->gi[gi].start = start;
    g->gi[gi].serial = ++st->serial;
    req->gpu = gpu;
    req->gi = gi;
    *changed = 1;
    return NVML_SUCCESS;
}

static nvmlReturn_t create_gi_api(struct create_gi_request *req, nvmlGpuInstance_t *gpuInstance)
{
    req->out_given = gpuInstance != NULL;
    SIM_CHECK(sim_mutate(1, create_gi, req));
    *gpuInstance = sim_gi_handle(&sim.state, req->gpu, req->gi);
    return *gpuInstance == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
}

SIM_API(nvmlDeviceCreateGpuInstance,
        (nvmlDevice_t device, unsigned int profileId, nvmlGpuInstance_t *gpuInstance),
        (device, profileId, gpuInstance))
{
    struct create_gi_request req = {.device = device, .profile_id = profileId};
    return create_gi_api(&req, gpuInstance);
}

SIM_API(nvmlDeviceCreateGpuInstanceWithPlacement,
        (nvmlDevice_t device, unsigned int profileId, const nvmlGpuInstancePlacement_t *placement,
         nvmlGpuInstance_t *gpuInstance),
        (device, profileId, placement, gpuInstance))
{
    struct create_gi_request req = {
        .device = device, .profile_id = profileId, .placement = placement, .with_placement = 1};
    return create_gi_api(&req, gpuInstance);
}

struct destroy_gi_request {
    nvmlGpuInstance_t handle;
};

static nvmlReturn_t destroy_gi(struct sim_state *st, void *ctx, int *changed)
{
    struct destroy_gi_request *req = ctx;
    unsigned int gpu, gi;
    SIM_CHECK(sim_resolve_gi(st, req->handle, &gpu, &gi));
    if (gi_has_cis(&st->gpu[gpu].gi[gi])) {
        return NVML_ERROR_IN_USE;
    }
    int in_use = busy(gpu, gi, NVML_VALUE_NOT_AVAILABLE_UINT);
    if (in_use < 0) {
        return NVML_ERROR_UNKNOWN;
    }
    if (in_use) {
        return NVML_ERROR_IN_USE;
    }
    memset(&st->gpu[gpu].gi[gi], 0, sizeof st->gpu[gpu].gi[gi]);
    *changed = 1;
    return NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceDestroy, (nvmlGpuInstance_t gpuInstance), (gpuInstance))
{
    struct destroy_gi_request req = {gpuInstance};
    return sim_mutate(1, destroy_gi, &req);
}

/* nvml.h: the buffer must hold every instance the profile allows; `count` is output only. */
SIM_API(nvmlDeviceGetGpuInstances,
        (nvmlDevice_t device, unsigned int profileId, nvmlGpuInstance_t *gpuInstances,
         unsigned int *count),
        (device, profileId, gpuInstances, count))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_mig_gpu(device, &gpu));
    int kind = sim_gi_kind_by_id(profileId);
    if (gpuInstances == NULL || count == NULL || kind < 0) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    unsigned int n = 0;
    for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
        const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
        if (g->used && g->kind == kind) {
            nvmlGpuInstance_t handle = sim_gi_handle(&sim.state, gpu, gi);
            if (handle == NULL) {
                return NVML_ERROR_MEMORY;
            }
            gpuInstances[n++] = handle;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetGpuInstanceById,
        (nvmlDevice_t device, unsigned int id, nvmlGpuInstance_t *gpuInstance),
        (device, id, gpuInstance))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_mig_gpu(device, &gpu));
    if (gpuInstance == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (id >= SIM_MAX_GI || !sim.state.gpu[gpu].gi[id].used) {
        return NVML_ERROR_NOT_FOUND;
    }
    *gpuInstance = sim_gi_handle(&sim.state, gpu, id);
    return *gpuInstance == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceGetInfo, (nvmlGpuInstance_t gpuInstance, nvmlGpuInstanceInfo_t *info),
        (gpuInstance, info))
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(gpuInstance, &gpu, &gi));
    if (info == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
    memset(info, 0, sizeof *info);
    info->device = sim_device_handle(gpu);
    info->id = gi;
    info->profileId = sim_gi_profiles[g->kind].id;
    info->placement.start = g->start;
    info->placement.size = sim_gi_profiles[g->kind].memory_slices;
    return NVML_SUCCESS;
}

/* ---- compute-instance profiles ------------------------------------------------------------ */

struct ci_profile_values {
    unsigned int slices;
    unsigned int instances;
    unsigned int multiprocessors;
    const struct gi_profile_resources *gi_resources;
    unsigned int gi_slices;
};

/* SMs of a compute instance smaller than its GPU instance: one 1g share per slice (an
 * estimate; a CI spanning the whole GI has exactly the GI's SMs). */
static struct ci_profile_values ci_profile_values(unsigned int gpu, unsigned int gi,
                                                  unsigned int profile)
{
    const struct sim_gpu *g = &sim.state.gpu[gpu];
    const struct sim_gi *instance = &g->gi[gi];
    struct ci_profile_values v;
    v.gi_resources = &sim_models[g->model].profiles[instance->kind];
    v.gi_slices = sim_gi_profiles[instance->kind].compute_slices;
    v.slices = sim_ci_slices(profile);
    v.instances = popcount(sim_ci_starts_mask(v.gi_slices, profile));
    v.multiprocessors = v.slices == v.gi_slices
                            ? v.gi_resources->multiprocessors
                            : v.slices * sim_models[g->model].profiles[GI_1G].multiprocessors;
    return v;
}

static void ci_profile_name(const struct ci_profile_values *v, char *out, size_t len)
{
    if (v->slices == v->gi_slices) {
        snprintf(out, len, "MIG %s", v->gi_resources->name);
    } else {
        snprintf(out, len, "MIG %uc.%s", v->slices, v->gi_resources->name);
    }
}

static nvmlReturn_t ci_profile_lookup(nvmlGpuInstance_t handle, unsigned int profile,
                                      unsigned int engProfile, const void *info,
                                      struct ci_profile_values *values)
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(handle, &gpu, &gi));
    if (info == NULL || profile >= NVML_COMPUTE_INSTANCE_PROFILE_COUNT ||
        engProfile >= NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_COUNT) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
    if (!sim_ci_allowed(sim_gi_profiles[g->kind].compute_slices, profile)) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    *values = ci_profile_values(gpu, gi, profile);
    return NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceGetComputeInstanceProfileInfo,
        (nvmlGpuInstance_t gpuInstance, unsigned int profile, unsigned int engProfile,
         nvmlComputeInstanceProfileInfo_t *info),
        (gpuInstance, profile, engProfile, info))
{
    struct ci_profile_values v;
    SIM_CHECK(ci_profile_lookup(gpuInstance, profile, engProfile, info, &v));
    memset(info, 0, sizeof *info);
    info->id = profile; /* compute-instance profile ids equal their indices */
    info->sliceCount = v.slices;
    info->instanceCount = v.instances;
    info->multiprocessorCount = v.multiprocessors;
    info->sharedCopyEngineCount = v.gi_resources->copy_engines;
    info->sharedDecoderCount = v.gi_resources->decoders;
    info->sharedEncoderCount = v.gi_resources->encoders;
    info->sharedJpegCount = v.gi_resources->jpegs;
    info->sharedOfaCount = v.gi_resources->ofas;
    return NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceGetComputeInstanceProfileInfoV,
        (nvmlGpuInstance_t gpuInstance, unsigned int profile, unsigned int engProfile,
         void *info),
        (gpuInstance, profile, engProfile, info))
{
    struct ci_profile_values v;
    SIM_CHECK(ci_profile_lookup(gpuInstance, profile, engProfile, info, &v));
    unsigned int version = *(unsigned int *)info;
    nvmlComputeInstanceProfileInfo_v3_t out;
    memset(&out, 0, sizeof out);
    out.version = version;
    out.id = profile;
    out.sliceCount = v.slices;
    out.instanceCount = v.instances;
    out.multiprocessorCount = v.multiprocessors;
    out.sharedCopyEngineCount = v.gi_resources->copy_engines;
    out.sharedDecoderCount = v.gi_resources->decoders;
    out.sharedEncoderCount = v.gi_resources->encoders;
    out.sharedJpegCount = v.gi_resources->jpegs;
    out.sharedOfaCount = v.gi_resources->ofas;
    ci_profile_name(&v, out.name, sizeof out.name);
    /* v2 is v3 without the trailing capabilities word: same prefix, shorter copy. */
    if (version == nvmlComputeInstanceProfileInfo_v2) {
        memcpy(info, &out, sizeof(nvmlComputeInstanceProfileInfo_v2_t));
        return NVML_SUCCESS;
    }
    if (version == nvmlComputeInstanceProfileInfo_v3) {
        memcpy(info, &out, sizeof out);
        return NVML_SUCCESS;
    }
    return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
}

/* A compute-instance profile id valid for this GI: INVALID_ARGUMENT when out of range,
 * NOT_SUPPORTED when the GI does not offer it. */
static nvmlReturn_t ci_profile_check(const struct sim_gi *g, unsigned int profileId)
{
    if (profileId >= NVML_COMPUTE_INSTANCE_PROFILE_COUNT) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return sim_ci_allowed(sim_gi_profiles[g->kind].compute_slices, profileId)
               ? NVML_SUCCESS
               : NVML_ERROR_NOT_SUPPORTED;
}

static unsigned int free_ci_starts(const struct sim_gi *g, unsigned int profile)
{
    unsigned int used = gi_compute_usage(g);
    unsigned int starts = sim_ci_starts_mask(sim_gi_profiles[g->kind].compute_slices, profile);
    unsigned int mask = 0;
    for (unsigned int start = 0; start < SIM_COMPUTE_SLICES; start++) {
        if ((starts & (1U << start)) && !(ci_slice_mask(profile, start) & used)) {
            mask |= 1U << start; /* placements of one CI profile never overlap each other */
        }
    }
    return mask;
}

SIM_API(nvmlGpuInstanceGetComputeInstanceRemainingCapacity,
        (nvmlGpuInstance_t gpuInstance, unsigned int profileId, unsigned int *count),
        (gpuInstance, profileId, count))
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(gpuInstance, &gpu, &gi));
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
    SIM_CHECK(ci_profile_check(g, profileId));
    unsigned int free_ids = 0;
    for (unsigned int ci = 0; ci < SIM_MAX_CI; ci++) {
        free_ids += !g->ci[ci].used;
    }
    unsigned int n = popcount(free_ci_starts(g, profileId));
    *count = n < free_ids ? n : free_ids;
    return NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceGetComputeInstancePossiblePlacements,
        (nvmlGpuInstance_t gpuInstance, unsigned int profileId,
         nvmlComputeInstancePlacement_t *placements, unsigned int *count),
        (gpuInstance, profileId, placements, count))
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(gpuInstance, &gpu, &gi));
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
    SIM_CHECK(ci_profile_check(g, profileId));
    unsigned int starts = sim_ci_starts_mask(sim_gi_profiles[g->kind].compute_slices, profileId);
    if (placements == NULL) {
        *count = popcount(starts);
        return NVML_SUCCESS;
    }
    unsigned int n = 0;
    for (unsigned int start = 0; start < SIM_COMPUTE_SLICES; start++) {
        if (starts & (1U << start)) {
            placements[n].start = start;
            placements[n].size = sim_ci_slices(profileId);
            n++;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

/* ---- compute instances -------------------------------------------------------------------- */

struct create_ci_request {
    nvmlGpuInstance_t handle;
    unsigned int profile_id;
    const nvmlComputeInstancePlacement_t *placement;
    int with_placement;
    int out_given;
    unsigned int gpu;
    unsigned int gi;
    unsigned int ci;
};

static nvmlReturn_t create_ci(struct sim_state *st, void *ctx, int *changed)
{
    struct create_ci_request *req = ctx;
    unsigned int gpu, gi;
    SIM_CHECK(sim_resolve_gi(st, req->handle, &gpu, &gi));
    if (!req->out_given || (req->with_placement && req->placement == NULL)) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    struct sim_gi *g = &st->gpu[gpu].gi[gi];
    SIM_CHECK(ci_profile_check(g, req->profile_id));
    unsigned int profile = req->profile_id;
    unsigned int start;
    if (req->with_placement) {
        unsigned int starts = sim_ci_starts_mask(sim_gi_profiles[g->kind].compute_slices, profile);
        start = req->placement->start;
        if (start >= SIM_COMPUTE_SLICES || !(starts & (1U << start)) ||
            req->placement->size != sim_ci_slices(profile)) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
        if (ci_slice_mask(profile, start) & gi_compute_usage(g)) {
            return NVML_ERROR_INSUFFICIENT_RESOURCES;
        }
    } else {
        unsigned int free_starts = free_ci_starts(g, profile);
        if (free_starts == 0) {
            return NVML_ERROR_INSUFFICIENT_RESOURCES;
        }
        start = (unsigned int)__builtin_ctz(free_starts);
    }
    unsigned int ci = 0;
    while (ci < SIM_MAX_CI && g->ci[ci].used) {
        ci++;
    }
    if (ci == SIM_MAX_CI) {
        return NVML_ERROR_INSUFFICIENT_RESOURCES;
    }
    g->ci[ci].used = 1;
    g->ci[ci].profile = profile;
    g->ci[ci].start = start;
    g->ci[ci].serial = ++st->serial;
    req->gpu = gpu;
    req->gi = gi;
    req->ci = ci;
    *changed = 1;
    return NVML_SUCCESS;
}

static nvmlReturn_t create_ci_api(struct create_ci_request *req,
                                  nvmlComputeInstance_t *computeInstance)
{
    req->out_given = computeInstance != NULL;
    SIM_CHECK(sim_mutate(1, create_ci, req));
    *computeInstance = sim_ci_handle(&sim.state, req->gpu, req->gi, req->ci);
    return *computeInstance == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceCreateComputeInstance,
        (nvmlGpuInstance_t gpuInstance, unsigned int profileId,
         nvmlComputeInstance_t *computeInstance),
        (gpuInstance, profileId, computeInstance))
{
    struct create_ci_request req = {.handle = gpuInstance, .profile_id = profileId};
    return create_ci_api(&req, computeInstance);
}

SIM_API(nvmlGpuInstanceCreateComputeInstanceWithPlacement,
        (nvmlGpuInstance_t gpuInstance, unsigned int profileId,
         const nvmlComputeInstancePlacement_t *placement, nvmlComputeInstance_t *computeInstance),
        (gpuInstance, profileId, placement, computeInstance))
{
    struct create_ci_request req = {.handle = gpuInstance,
                                    .profile_id = profileId,
                                    .placement = placement,
                                    .with_placement = 1};
    return create_ci_api(&req, computeInstance);
}

struct destroy_ci_request {
    nvmlComputeInstance_t handle;
};

static nvmlReturn_t destroy_ci(struct sim_state *st, void *ctx, int *changed)
{
    struct destroy_ci_request *req = ctx;
    unsigned int gpu, gi, ci;
    SIM_CHECK(sim_resolve_ci(st, req->handle, &gpu, &gi, &ci));
    int in_use = busy(gpu, gi, ci);
    if (in_use < 0) {
        return NVML_ERROR_UNKNOWN;
    }
    if (in_use) {
        return NVML_ERROR_IN_USE;
    }
    memset(&st->gpu[gpu].gi[gi].ci[ci], 0, sizeof st->gpu[gpu].gi[gi].ci[ci]);
    *changed = 1;
    return NVML_SUCCESS;
}

SIM_API(nvmlComputeInstanceDestroy, (nvmlComputeInstance_t computeInstance), (computeInstance))
{
    struct destroy_ci_request req = {computeInstance};
    return sim_mutate(1, destroy_ci, &req);
}

SIM_API(nvmlGpuInstanceGetComputeInstances,
        (nvmlGpuInstance_t gpuInstance, unsigned int profileId,
         nvmlComputeInstance_t *computeInstances, unsigned int *count),
        (gpuInstance, profileId, computeInstances, count))
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(gpuInstance, &gpu, &gi));
    if (computeInstances == NULL || count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
    SIM_CHECK(ci_profile_check(g, profileId));
    unsigned int n = 0;
    for (unsigned int ci = 0; ci < SIM_MAX_CI; ci++) {
        if (g->ci[ci].used && g->ci[ci].profile == profileId) {
            nvmlComputeInstance_t handle = sim_ci_handle(&sim.state, gpu, gi, ci);
            if (handle == NULL) {
                return NVML_ERROR_MEMORY;
            }
            computeInstances[n++] = handle;
        }
    }
    *count = n;
    return NVML_SUCCESS;
}

SIM_API(nvmlGpuInstanceGetComputeInstanceById,
        (nvmlGpuInstance_t gpuInstance, unsigned int id, nvmlComputeInstance_t *computeInstance),
        (gpuInstance, id, computeInstance))
{
    unsigned int gpu, gi;
    SIM_CHECK(sim_synced_gi(gpuInstance, &gpu, &gi));
    if (computeInstance == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (id >= SIM_MAX_CI || !sim.state.gpu[gpu].gi[gi].ci[id].used) {
        return NVML_ERROR_NOT_FOUND;
    }
    *computeInstance = sim_ci_handle(&sim.state, gpu, gi, id);
    return *computeInstance == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
}

/* v1 of the info struct ends before `placement`; v2 appended it. */
static nvmlReturn_t ci_info(nvmlComputeInstance_t computeInstance, nvmlComputeInstanceInfo_t *info,
                            int with_placement)
{
    unsigned int gpu, gi, ci;
    SIM_CHECK(sim_synced_ci(computeInstance, &gpu, &gi, &ci));
    if (info == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    nvmlGpuInstance_t gi_handle = sim_gi_handle(&sim.state, gpu, gi);
    if (gi_handle == NULL) {
        return NVML_ERROR_MEMORY;
    }
    const struct sim_ci *c = &sim.state.gpu[gpu].gi[gi].ci[ci];
    info->device = sim_device_handle(gpu);
    info->gpuInstance = gi_handle;
    info->id = ci;
    info->profileId = c->profile;
    if (with_placement) {
        info->placement.start = c->start;
        info->placement.size = sim_ci_slices(c->profile);
    }
    return NVML_SUCCESS;
}

SIM_API(nvmlComputeInstanceGetInfo_v2,
        (nvmlComputeInstance_t computeInstance, nvmlComputeInstanceInfo_t *info),
        (computeInstance, info))
{
    return ci_info(computeInstance, info, 1);
}

SIM_API(nvmlComputeInstanceGetInfo,
        (nvmlComputeInstance_t computeInstance, nvmlComputeInstanceInfo_t *info),
        (computeInstance, info))
{
    return ci_info(computeInstance, info, 0);
}

/* ---- MIG device handles ------------------------------------------------------------------- */

/* nvml.h: "Returns zero if MIG is not supported or enabled." */
SIM_API(nvmlDeviceGetMaxMigDeviceCount, (nvmlDevice_t device, unsigned int *count),
        (device, count))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = sim.state.gpu[gpu].mig_current ? SIM_MAX_MIG_DEVICES : 0U;
    return NVML_SUCCESS;
}

/* MIG devices are numbered in (GI id, CI id) order. */
SIM_API(nvmlDeviceGetMigDeviceHandleByIndex,
        (nvmlDevice_t device, unsigned int index, nvmlDevice_t *migDevice),
        (device, index, migDevice))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_mig_gpu(device, &gpu));
    if (migDevice == NULL || index >= SIM_MAX_MIG_DEVICES) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    unsigned int n = 0;
    for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
        const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
        for (unsigned int ci = 0; g->used && ci < SIM_MAX_CI; ci++) {
            if (g->ci[ci].used && n++ == index) {
                *migDevice = sim_mig_handle(&sim.state, gpu, gi, ci);
                return *migDevice == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
            }
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

SIM_API(nvmlDeviceGetDeviceHandleFromMigDeviceHandle,
        (nvmlDevice_t migDevice, nvmlDevice_t *device), (migDevice, device))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(migDevice, &d));
    if (device == NULL || !d->is_mig) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *device = sim_device_handle(d->gpu);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceIsMigDeviceHandle, (nvmlDevice_t device, unsigned int *isMigDevice),
        (device, isMigDevice))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (isMigDevice == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *isMigDevice = d->is_mig ? 1U : 0U;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetGpuInstanceId, (nvmlDevice_t device, unsigned int *id), (device, id))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (id == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (!d->is_mig) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    *id = d->gi;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetComputeInstanceId, (nvmlDevice_t device, unsigned int *id), (device, id))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (id == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    if (!d->is_mig) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    *id = d->ci;
    return NVML_SUCCESS;
}
