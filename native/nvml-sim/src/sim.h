/* nvml-sim internals shared by the source files; nothing here is exported from the library. */
#ifndef NVML_SIM_SIM_H
#define NVML_SIM_SIM_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <time.h>

#include "nvml_abi.h"

#define SIM_EXPORT __attribute__((visibility("default")))

#define SIM_MAX_GPUS 8U
#define SIM_MEMORY_SLICES 8U
#define SIM_COMPUTE_SLICES 7U
/* GI ids are a function of profile and placement (see gi_id_for); the largest is 1g@6 -> 13. */
#define SIM_MAX_GI 14U
/* A 7g GPU instance holds at most seven 1-slice compute instances. */
#define SIM_MAX_CI 8U
/* One MIG device per compute instance; at most seven per GPU on A100/H100. */
#define SIM_MAX_MIG_DEVICES 7U

/* ---- models and profiles (profiles.c) ---------------------------------------------------- */

enum sim_model { MODEL_H100_80GB, MODEL_A100_40GB, MODEL_A100_80GB, MODEL_COUNT };

enum gi_kind { GI_1G, GI_2G, GI_3G, GI_4G, GI_7G, GI_1G_ME, GI_1G_2X, GI_KIND_COUNT };

struct gi_profile {
    unsigned int index;          /* NVML_GPU_INSTANCE_PROFILE_* */
    unsigned int id;             /* profile ID used by create/placement calls */
    unsigned int compute_slices; /* sliceCount */
    unsigned int memory_slices;  /* placement size */
    unsigned int max_instances;  /* instanceCount */
    unsigned int starts_mask;    /* bit s set: start s is a valid placement */
};

struct gi_profile_resources {
    const char *name; /* without the "MIG " prefix, e.g. "3g.40gb" */
    unsigned long long memory_mb;
    unsigned int multiprocessors;
    unsigned int copy_engines;
    unsigned int decoders;
    unsigned int encoders;
    unsigned int jpegs;
    unsigned int ofas;
};

struct sim_model_info {
    const char *key;  /* topology spelling, e.g. "H100-80GB" */
    const char *name; /* nvmlDeviceGetName */
    unsigned long long memory_mib;
    unsigned int pci_device_id;
    unsigned int pci_subsystem_id;
    unsigned int architecture;
    struct gi_profile_resources profiles[GI_KIND_COUNT];
};

extern const struct gi_profile sim_gi_profiles[GI_KIND_COUNT];
extern const struct sim_model_info sim_models[MODEL_COUNT];

int sim_model_by_key(const char *key);
int sim_gi_kind_by_index(unsigned int profile_index);
int sim_gi_kind_by_id(unsigned int profile_id);
unsigned int sim_gi_id_for(int kind, unsigned int start);

/* Compute-instance profiles: index == id, slice counts 1,2,3,4,7. */
#define SIM_CI_PROFILE_KINDS 5U
unsigned int sim_ci_slices(unsigned int ci_profile);
int sim_ci_allowed(unsigned int gi_slices, unsigned int ci_profile);
unsigned int sim_ci_starts_mask(unsigned int gi_slices, unsigned int ci_profile);

/* ---- state (state.c) ---------------------------------------------------------------------- */

struct sim_ci {
    int used;
    unsigned int profile; /* compute-instance profile id */
    unsigned int start;
    uint64_t serial;
};

struct sim_gi {
    int used;
    int kind;
    unsigned int start;
    uint64_t serial;
    struct sim_ci ci[SIM_MAX_CI];
};

struct sim_gpu {
    int model;
    unsigned int mig_current;
    unsigned int mig_pending;
    struct sim_gi gi[SIM_MAX_GI];
};

struct sim_state {
    uint64_t id;     /* random, new whenever the state file is created: tells stale handles apart */
    uint64_t serial; /* creation counter; every GI and CI takes the next value */
    unsigned int gpu_count;
    struct sim_gpu gpu[SIM_MAX_GPUS];
};

struct sim_topology {
    unsigned int gpu_count;
    int model[SIM_MAX_GPUS];
    unsigned int mig[SIM_MAX_GPUS];
};

int sim_parse_topology(const char *text, size_t len, struct sim_topology *out, char *why,
                       size_t why_len);
int sim_parse_state(const char *text, size_t len, struct sim_state *out, char *why,
                    size_t why_len);
char *sim_format_state(const struct sim_state *state, size_t *len);
void sim_state_from_topology(const struct sim_topology *topology, struct sim_state *out);
int sim_state_matches_topology(const struct sim_state *state, const struct sim_topology *t);

/* ---- files (files.c) ---------------------------------------------------------------------- */

struct file_key {
    int valid;
    dev_t dev;
    ino_t ino;
    off_t size;
    struct timespec mtime;
    struct timespec ctime;
};

/* Reads a whole file; returns 0, or -errno (-ENOENT when absent). *data is NUL-terminated. */
int sim_read_file(const char *path, char **data, size_t *len, struct file_key *key);
/* Writes `path` via `path.tmp` + optional fdatasync + rename; fills *key with the new file's key. */
int sim_write_file_atomic(const char *path, const char *data, size_t len, int sync,
                          struct file_key *key);
int sim_file_key(const char *path, struct file_key *key);
int sim_file_key_equal(const struct file_key *a, const struct file_key *b);

/* Iterates complete lines ('\n'-terminated, or the last one when `allow_unterminated`):
 * calls fn(line, line_len, offset_of_line_start, offset_after_newline, ctx). fn returns
 * nonzero to stop. Returns the offset just past the last line handed out. */
typedef int (*sim_line_fn)(const char *line, size_t len, size_t start, size_t end, void *ctx);
size_t sim_for_each_line(const char *text, size_t len, int allow_unterminated, sim_line_fn fn,
                         void *ctx);
/* Splits a line (comments after '#' removed) into at most `max` whitespace-separated tokens,
 * copied into `buf`. Returns the token count, or -1 when the line has more than `max` tokens,
 * a NUL byte, or does not fit in `buf`. */
int sim_tokenize(const char *line, size_t len, char *buf, size_t buf_len, char **tokens,
                 int max);
int sim_parse_u64(const char *s, unsigned long long max, unsigned long long *out);
/* Like sim_parse_u64, but also accepts "-1", returned as `minus_one`. */
int sim_parse_u64_or_minus_one(const char *s, unsigned long long max,
                               unsigned long long minus_one, unsigned long long *out);

/* DIR/processes */
struct sim_process {
    unsigned int pid;
    unsigned int gpu;
    unsigned int gi; /* NVML_VALUE_NOT_AVAILABLE_UINT for a whole-GPU process */
    unsigned int ci;
    unsigned long long used_bytes;
};
/* Live processes listed in DIR/processes; returns the count (<= max) or -1 on read error. */
int sim_live_processes(struct sim_process *out, int max);

/* DIR/health */
enum health_key {
    HEALTH_TEMPERATURE_C,
    HEALTH_POWER_MW,
    HEALTH_ECC_VOLATILE_CORRECTED,
    HEALTH_ECC_VOLATILE_UNCORRECTED,
    HEALTH_ECC_AGGREGATE_CORRECTED,
    HEALTH_ECC_AGGREGATE_UNCORRECTED,
    HEALTH_REMAPPED_CORRECTABLE,
    HEALTH_REMAPPED_UNCORRECTABLE,
    HEALTH_REMAPPING_PENDING,
    HEALTH_REMAPPING_FAILURE,
    HEALTH_CLOCKS_EVENT_REASONS,
    HEALTH_LOST,
    HEALTH_KEY_COUNT
};
unsigned long long sim_health_value(unsigned int gpu, enum health_key key);
/* Whether DIR/health says the GPU has fallen off the bus (`<gpu> lost 1`). */
int sim_gpu_lost(unsigned int gpu);

/* ---- the library's global session (core.c) ------------------------------------------------ */

struct sim_session {
    int refcount;
    int sync_writes;
    char dir[PATH_MAX];
    char state_path[PATH_MAX + 16];
    char lock_path[PATH_MAX + 16];
    char processes_path[PATH_MAX + 16];
    char xid_path[PATH_MAX + 16];
    char counters_path[PATH_MAX + 16];
    char health_path[PATH_MAX + 16];
    struct sim_topology topology;
    struct sim_state state;
    struct file_key state_key;
    int state_key_settled;
    int state_error_reported;
};

extern struct sim_session sim;

void sim_api_lock(void);
void sim_api_unlock(void);

/* Every public entry point runs under one process-wide mutex. */
#define SIM_API(name, params, args)                     \
    static nvmlReturn_t name##_locked params;           \
    SIM_EXPORT nvmlReturn_t name params;                \
    SIM_EXPORT nvmlReturn_t name params                 \
    {                                                   \
        sim_api_lock();                                 \
        nvmlReturn_t result_ = name##_locked args;      \
        sim_api_unlock();                               \
        return result_;                                 \
    }                                                   \
    static nvmlReturn_t name##_locked params

/* NVML_ERROR_UNINITIALIZED before nvmlInit; otherwise brings `sim.state` up to date with
 * DIR/state when another process (or this one) has replaced it. */
nvmlReturn_t sim_sync(void);
nvmlReturn_t sim_require_init(void);

/* The one way a function checks its preconditions -- initialisation, handles, a versioned
 * struct's version word -- and fails: returns the check's result from the calling function
 * unless it is NVML_SUCCESS. The checks are sim_require_init, sim_sync, the sim_synced_* and
 * sim_resolve_* handle resolvers (handles.c), sim_check_gpu_reachable and sim_check_version. */
#define SIM_CHECK(check)                     \
    do {                                     \
        nvmlReturn_t check_ = (check);       \
        if (check_ != NVML_SUCCESS) {        \
            return check_;                   \
        }                                    \
    } while (0)

/* NVML_ERROR_ARGUMENT_VERSION_MISMATCH unless a versioned struct's version word is `expected`. */
static inline nvmlReturn_t sim_check_version(unsigned int version, unsigned int expected)
{
    return version == expected ? NVML_SUCCESS : NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
}

/* Read-modify-write of the state under the exclusive flock on DIR/state.lock. `mutation` sees
 * the freshest state; when it returns NVML_SUCCESS with *changed set, the state is written
 * (temp file + fdatasync + rename). `counted` adds one to DIR/counters first. */
typedef nvmlReturn_t (*sim_mutation_fn)(struct sim_state *state, void *ctx, int *changed);
nvmlReturn_t sim_mutate(int counted, sim_mutation_fn mutation, void *ctx);

/* Runs `fn` while holding the exclusive flock, without touching the state (DIR/processes
 * readers that must not race a writer). */
int sim_lock_state_file(void);
void sim_unlock_state_file(int fd);

/* ---- handles (handles.c) ------------------------------------------------------------------ */

struct nvmlDevice_st {
    uint32_t magic;
    int is_mig;
    unsigned int gpu;
    unsigned int gi; /* MIG handles only */
    unsigned int ci;
    uint64_t serial; /* the compute instance's creation serial */
    uint64_t state_id;
};

struct nvmlGpuInstance_st {
    uint32_t magic;
    unsigned int gpu;
    unsigned int gi;
    uint64_t serial;
    uint64_t state_id;
};

struct nvmlComputeInstance_st {
    uint32_t magic;
    unsigned int gpu;
    unsigned int gi;
    unsigned int ci;
    uint64_t serial;
    uint64_t state_id;
};

nvmlDevice_t sim_device_handle(unsigned int gpu);
nvmlDevice_t sim_mig_handle(const struct sim_state *state, unsigned int gpu, unsigned int gi,
                            unsigned int ci);
nvmlGpuInstance_t sim_gi_handle(const struct sim_state *state, unsigned int gpu, unsigned int gi);
nvmlComputeInstance_t sim_ci_handle(const struct sim_state *state, unsigned int gpu,
                                    unsigned int gi, unsigned int ci);

/* Resolve handles against `state`. All return NVML_ERROR_INVALID_ARGUMENT for a NULL, foreign,
 * or stale (destroyed, or from another state file) handle, and NVML_ERROR_GPU_IS_LOST for a
 * handle on (or inside) a GPU that DIR/health marks lost. */
nvmlReturn_t sim_resolve_device(const struct sim_state *state, nvmlDevice_t device,
                                const struct nvmlDevice_st **out);
/* NVML_ERROR_GPU_IS_LOST while DIR/health marks the GPU lost, else NVML_SUCCESS: what every
 * handle lookup and handle use checks. */
nvmlReturn_t sim_check_gpu_reachable(unsigned int gpu);
/* A parent GPU handle; a MIG device handle gives NVML_ERROR_NOT_SUPPORTED. */
nvmlReturn_t sim_resolve_gpu(const struct sim_state *state, nvmlDevice_t device,
                             unsigned int *gpu);
/* A parent GPU handle of a GPU in MIG mode (NVML_ERROR_NOT_SUPPORTED otherwise). */
nvmlReturn_t sim_resolve_mig_gpu(const struct sim_state *state, nvmlDevice_t device,
                                 unsigned int *gpu);
nvmlReturn_t sim_resolve_gi(const struct sim_state *state, nvmlGpuInstance_t handle,
                            unsigned int *gpu, unsigned int *gi);
nvmlReturn_t sim_resolve_ci(const struct sim_state *state, nvmlComputeInstance_t handle,
                            unsigned int *gpu, unsigned int *gi, unsigned int *ci);

/* sim_sync, then the sim_resolve_* of the same name against the up-to-date `sim.state`: what an
 * entry point that takes a handle checks first. */
nvmlReturn_t sim_synced_device(nvmlDevice_t device, const struct nvmlDevice_st **out);
nvmlReturn_t sim_synced_gpu(nvmlDevice_t device, unsigned int *gpu);
nvmlReturn_t sim_synced_mig_gpu(nvmlDevice_t device, unsigned int *gpu);
nvmlReturn_t sim_synced_gi(nvmlGpuInstance_t handle, unsigned int *gpu, unsigned int *gi);
nvmlReturn_t sim_synced_ci(nvmlComputeInstance_t handle, unsigned int *gpu, unsigned int *gi,
                           unsigned int *ci);

/* ---- identity (identity.c) ---------------------------------------------------------------- */

void sim_gpu_uuid(unsigned int gpu, char *out, size_t len);
void sim_mig_uuid(unsigned int gpu, unsigned int gi, unsigned int ci, uint64_t serial, char *out,
                  size_t len);
void sim_gpu_serial(unsigned int gpu, char *out, size_t len);
unsigned int sim_gpu_pci_bus(unsigned int gpu);
void sim_gpu_bus_id(unsigned int gpu, int legacy, char *out, size_t len);
nvmlReturn_t sim_copy_string(const char *value, char *buffer, unsigned int length);

#endif /* NVML_SIM_SIM_H */
