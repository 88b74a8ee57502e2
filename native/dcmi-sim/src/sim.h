/* dcmi-sim internals shared by the source files; nothing here is exported from the library. */
#ifndef DCMI_SIM_SIM_H
#define DCMI_SIM_SIM_H

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

#include "dcmi_interface_api.h"

/* ---- limits ------------------------------------------------------------------------------- */

/* NPUs per simulated node (an Atlas 800 / 800T A2 server has 8; 16 leaves room). */
#define SIM_MAX_NPUS 16U
/* Card ids are at most 64 per node (dcmi_get_card_list: "Number of devices, up to 64"). */
#define SIM_MAX_CARD_ID 63U
/* Physical chip ids: the driver numbers a chip's vNPUs 100 + 16 * phy_id + k, and its largest
 * device number is 1123 (ascend_dev_num_910B.h: ASCEND_DEV_MAX_NUM 1124), so phy_id <= 63. */
#define SIM_MAX_PHY_ID 63U
/* vNPUs per chip (driver: VDAVINCI_MAX_VFID_NUM 16) and the first vNPU device id
 * (VDAVINCI_VDEV_OFFSET / ASCEND_VDEV_ID_START 100). */
#define SIM_VNPUS_PER_NPU 16U
#define SIM_VDEV_ID_BASE 100U
/* Memory units per chip = its AI Cores, at most this many. */
#define SIM_MAX_UNITS 64U
/* Hostile-input bounds for the files we read. */
#define SIM_MAX_FILE_BYTES (1U << 20)
#define SIM_MAX_LINE 512U

/* ---- models and templates (models.c) ------------------------------------------------------ */

struct sim_template {
    const char *name;     /* e.g. "vir10_3c_32g" */
    unsigned int aicore;  /* AI Cores */
    unsigned int aicpu;   /* AI CPUs reported */
    int aicpu_counted;    /* whether AI CPUs are a capacity on this chip (named in the template) */
};

#define SIM_MAX_TEMPLATES 4U

struct sim_model {
    const char *key;       /* topology spelling and chip_name, e.g. "910B3" */
    const char *npu_name;  /* dcmi_chip_info_v2.npu_name */
    unsigned int aicore;   /* AI Cores of the chip */
    unsigned int aicpu;    /* AI CPUs of the chip */
    unsigned long long hbm_mb;
    unsigned long long ddr_mb; /* 0: dcmi_get_memory_info* is DCMI_ERR_CODE_NOT_SUPPORT */
    unsigned int hbm_freq_mhz;
    unsigned int template_count;
    struct sim_template templates[SIM_MAX_TEMPLATES];
};

extern const struct sim_model sim_models[];
extern const unsigned int sim_model_count;

int sim_model_by_key(const char *key);
/* Index of `name` among the model's templates, or -1. */
int sim_template_by_name(const struct sim_model *model, const char *name);
/* A vNPU's memory: the chip's HBM split in proportion to AI Cores, as the driver does when
 * dcmi_create_vdevice passes memory_size 0. */
unsigned long long sim_template_memory_mb(const struct sim_model *model,
                                          const struct sim_template *t);

/* ---- state (state.c) ---------------------------------------------------------------------- */

struct sim_vnpu {
    int used;
    unsigned int template_index;
    uint64_t units;  /* memory units it owns, bit u = unit u */
    uint64_t serial; /* creation counter value */
};

struct sim_npu {
    int model;
    unsigned int card_id;
    unsigned int phy_id;
    struct sim_vnpu vnpu[SIM_VNPUS_PER_NPU]; /* slot k is vdev id 100 + 16 * phy_id + k */
};

struct sim_state {
    uint64_t id;     /* random, new whenever the state file is created */
    uint64_t serial; /* creation counter; every vNPU takes the next value */
    unsigned int npu_count;
    struct sim_npu npu[SIM_MAX_NPUS]; /* indexed by logic id */
};

struct sim_topology {
    unsigned int npu_count;
    int model[SIM_MAX_NPUS];
    unsigned int card_id[SIM_MAX_NPUS];
    unsigned int phy_id[SIM_MAX_NPUS];
};

int sim_parse_topology(const char *text, size_t len, struct sim_topology *out, char *why,
                       size_t why_len);
/* The topology text for a DCMI_SIM_TOPOLOGY preset such as "ascend910bx8"; NULL when unknown.
 * The caller frees it. */
char *sim_topology_from_preset(const char *preset, char *why, size_t why_len);
int sim_parse_state(const char *text, size_t len, struct sim_state *out, char *why,
                    size_t why_len);
char *sim_format_state(const struct sim_state *state, size_t *len);
void sim_state_from_topology(const struct sim_topology *topology, struct sim_state *out);
int sim_state_matches_topology(const struct sim_state *state, const struct sim_topology *t);

/* Usage of one chip, computed from its vNPUs. */
struct sim_usage {
    unsigned int vnpus;
    unsigned int aicore;
    unsigned int aicpu;
    unsigned long long memory_mb;
    uint64_t units;
};
struct sim_usage sim_npu_usage(const struct sim_npu *npu);

/* ---- files (files.c) ---------------------------------------------------------------------- */

/* Reads a whole regular file of at most SIM_MAX_FILE_BYTES; returns 0 or -errno (-ENOENT when
 * absent, -EFBIG when too large). *data is NUL-terminated; the caller frees it. */
int sim_read_file(const char *path, char **data, size_t *len);
/* Replaces `path` via `path.tmp` + optional fdatasync + rename. */
int sim_write_file_atomic(const char *path, const char *data, size_t len, int sync);

typedef int (*sim_line_fn)(const char *line, size_t len, void *ctx);
/* Calls fn for every line ('\n'-terminated, and the last one even without '\n'); stops early
 * when fn returns nonzero. */
void sim_for_each_line(const char *text, size_t len, sim_line_fn fn, void *ctx);
/* Splits a line (anything after '#' removed) into at most `max` whitespace-separated tokens
 * copied into `buf`. Returns the count, or -1 when the line is too long, holds a NUL byte or
 * has more than `max` tokens. */
int sim_tokenize(const char *line, size_t len, char *buf, size_t buf_len, char **tokens, int max);
/* Strict decimal, digits only, <= max. */
int sim_parse_u64(const char *s, unsigned long long max, unsigned long long *out);
/* Decimal, or hexadecimal with a 0x prefix, <= max. */
int sim_parse_u64_any(const char *s, unsigned long long max, unsigned long long *out);

/* ---- health (health.c) -------------------------------------------------------------------- */

struct sim_health {
    unsigned int health;     /* 0..3, or DCMI_HEALTH_DEVICE_NOT_EXIST */
    int lost;                /* the chip has fallen off the bus */
    int temperature_c;
    int power_dw;            /* 0.1 W */
    unsigned int error_count;
    unsigned int errors[DCMI_ERROR_CODE_MAX_COUNT];
};

/* DIR/health for one chip (by logic id); a missing or unreadable file is a healthy chip. */
void sim_read_health(unsigned int logic_id, struct sim_health *out);
int sim_npu_lost(unsigned int logic_id);

/* ---- the library's session (core.c) ------------------------------------------------------- */

struct sim_session {
    int initialised;
    int sync_writes;
    char dir[PATH_MAX];
    char topology_path[PATH_MAX + 16];
    char state_path[PATH_MAX + 16];
    char lock_path[PATH_MAX + 16];
    char counters_path[PATH_MAX + 16];
    char health_path[PATH_MAX + 16];
    struct sim_topology topology;
    int state_error_reported;
};

extern struct sim_session sim;

/* One line to stderr, prefixed "dcmi-sim: ". */
void sim_report(const char *format, ...) __attribute__((format(printf, 1, 2)));

void sim_api_lock(void);
void sim_api_unlock(void);

/* Every exported entry point runs under one process-wide mutex. */
#define SIM_API(name, params, args)                 \
    static int name##_locked params;               \
    DCMIDLLEXPORT int name params                   \
    {                                               \
        sim_api_lock();                             \
        int result_ = name##_locked args;           \
        sim_api_unlock();                           \
        return result_;                             \
    }                                               \
    static int name##_locked params

/* Returns from the calling function unless `check` is DCMI_OK. */
#define SIM_CHECK(check)               \
    do {                               \
        int check_ = (check);          \
        if (check_ != DCMI_OK) {       \
            return check_;             \
        }                              \
    } while (0)

/* Loads DIR/state (re-read on every call: another process may have changed it).
 * DCMI_ERR_CODE_NOT_REDAY before dcmi_init; DCMI_ERR_CODE_INNER_ERR (and one line on stderr)
 * when the file is missing, unreadable or corrupt. */
int sim_load_state(struct sim_state *out);

/* Resolves (card_id, device_id) to a logic id against `state`: DCMI_ERR_CODE_INVALID_PARAMETER
 * for a negative id, an unknown card or a device id other than 0 (one NPU chip per card, no MCU);
 * DCMI_ERR_CODE_DEVICE_NOT_EXIST when DIR/health marks the chip lost. */
int sim_resolve(const struct sim_state *state, int card_id, int device_id, unsigned int *logic);
/* sim_load_state + sim_resolve: what an entry point that names a chip does first. */
int sim_load_and_resolve(struct sim_state *state, int card_id, int device_id,
                         unsigned int *logic);

/* Read-modify-write of the state under the exclusive flock on DIR/state.lock: `mutation` sees
 * the freshest state; when it returns DCMI_OK with *changed set, the state is written
 * (temp file + fdatasync + rename). DIR/counters is incremented first. */
typedef int (*sim_mutation_fn)(struct sim_state *state, void *ctx, int *changed);
int sim_mutate(sim_mutation_fn mutation, void *ctx);

/* Copies a NUL-terminated string into a caller's buffer of `len` bytes; too small is
 * DCMI_ERR_CODE_INVALID_PARAMETER. */
int sim_copy_string(const char *value, char *buffer, size_t len);

#endif /* DCMI_SIM_SIM_H */
