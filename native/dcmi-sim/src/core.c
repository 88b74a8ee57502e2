/*
 * Library lifetime (dcmi_init), the simulation directory, loading and locked read-modify-write
 * of DIR/state, DIR/counters, and the version queries.
 *
 * Invariants: the state file is only ever replaced whole (temp file + rename) under the
 * exclusive flock on DIR/state.lock, after re-reading it under that lock; a corrupt state file
 * is reported and refused, never overwritten; every entry point runs under one process mutex.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim.h"

/* The ABI: sizes of the structures a caller allocates, as the reference lays them out on a
 * 64-bit Linux host (LP64). ctypes bindings are checked against the same numbers in the tests. */
_Static_assert(sizeof(struct dcmi_chip_info) == 100, "dcmi_chip_info layout");
_Static_assert(sizeof(struct dcmi_chip_info_v2) == 132, "dcmi_chip_info_v2 layout");
_Static_assert(sizeof(struct dcmi_die_id) == 20, "dcmi_die_id layout");
_Static_assert(sizeof(struct dcmi_memory_info_stru) == 16, "dcmi_memory_info_stru layout");
_Static_assert(sizeof(struct dcmi_get_memory_info_stru) == 112, "dcmi_get_memory_info_stru");
_Static_assert(sizeof(struct dcmi_hbm_info) == 32, "dcmi_hbm_info layout");
_Static_assert(sizeof(struct dcmi_base_resource) == 64, "dcmi_base_resource layout");
_Static_assert(sizeof(struct dcmi_computing_resource) == 96, "dcmi_computing_resource layout");
_Static_assert(sizeof(struct dcmi_media_resource) == 56, "dcmi_media_resource layout");
_Static_assert(sizeof(struct dcmi_create_vdev_res_stru) == 104, "dcmi_create_vdev_res_stru");
_Static_assert(sizeof(struct dcmi_create_vdev_out) == 52, "dcmi_create_vdev_out layout");
_Static_assert(sizeof(struct dcmi_vdev_query_info) == 256, "dcmi_vdev_query_info layout");
_Static_assert(sizeof(struct dcmi_vdev_query_stru) == 264, "dcmi_vdev_query_stru layout");
_Static_assert(sizeof(struct dcmi_soc_free_resource) == 224, "dcmi_soc_free_resource layout");
_Static_assert(sizeof(struct dcmi_soc_total_resource) == 360, "dcmi_soc_total_resource");

struct sim_session sim;

static pthread_mutex_t api_mutex = PTHREAD_MUTEX_INITIALIZER;

void sim_api_lock(void)
{
    pthread_mutex_lock(&api_mutex);
}

void sim_api_unlock(void)
{
    pthread_mutex_unlock(&api_mutex);
}

/* Reported by the version queries (approximation: a current Ascend HDK release). */
#define SIM_DCMI_VERSION "24.1.0"
#define SIM_DRIVER_VERSION "24.1.0"

void sim_report(const char *format, ...)
{
    char line[3 * PATH_MAX];
    va_list args;
    va_start(args, format);
    vsnprintf(line, sizeof line, format, args);
    va_end(args);
    fprintf(stderr, "dcmi-sim: %s\n", line);
}

int sim_copy_string(const char *value, char *buffer, size_t len)
{
    size_t need = strlen(value) + 1;
    if (buffer == NULL || len < need) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    memcpy(buffer, value, need);
    return DCMI_OK;
}

/* ---- locking ------------------------------------------------------------------------------ */

static int lock_state_file(const char *lock_path)
{
    /* Opened per use and never truncated: other tools lock the same file. */
    int fd = open(lock_path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, 0644);
    if (fd < 0) {
        return -1;
    }
    while (flock(fd, LOCK_EX) != 0) {
        if (errno != EINTR) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static void unlock_state_file(int fd)
{
    if (fd >= 0) {
        close(fd); /* releases the flock */
    }
}

/* ---- state -------------------------------------------------------------------------------- */

/* 0, -ENOENT (no file) or another -errno / -EINVAL with `why` set. */
static int read_state(const struct sim_session *session, struct sim_state *out, char *why,
                      size_t why_len)
{
    char *text;
    size_t len;
    int error = sim_read_file(session->state_path, &text, &len);
    if (error != 0) {
        snprintf(why, why_len, "cannot read %s: %s", session->state_path, strerror(-error));
        return error;
    }
    char detail[160] = "";
    int bad = sim_parse_state(text, len, out, detail, sizeof detail);
    free(text);
    if (bad) {
        snprintf(why, why_len, "%s is corrupt: %s", session->state_path, detail);
        return -EINVAL;
    }
    if (!sim_state_matches_topology(out, &session->topology)) {
        snprintf(why, why_len, "%s describes other NPUs than %s", session->state_path,
                 session->topology_path);
        return -ESTALE;
    }
    return 0;
}

int sim_load_state(struct sim_state *out)
{
    if (!sim.initialised) {
        return DCMI_ERR_CODE_NOT_REDAY;
    }
    char why[3 * PATH_MAX];
    if (read_state(&sim, out, why, sizeof why) != 0) {
        if (!sim.state_error_reported) {
            sim_report("%s", why);
            sim.state_error_reported = 1;
        }
        return DCMI_ERR_CODE_INNER_ERR;
    }
    sim.state_error_reported = 0;
    return DCMI_OK;
}

int sim_resolve(const struct sim_state *state, int card_id, int device_id, unsigned int *logic)
{
    if (card_id < 0 || device_id < 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    for (unsigned int i = 0; i < state->npu_count; i++) {
        if (state->npu[i].card_id == (unsigned int)card_id) {
            /* One NPU chip per card, device id 0; the simulated cards have no MCU. */
            if (device_id != 0) {
                return DCMI_ERR_CODE_INVALID_PARAMETER;
            }
            *logic = i;
            return DCMI_OK;
        }
    }
    return DCMI_ERR_CODE_INVALID_PARAMETER;
}

int sim_load_and_resolve(struct sim_state *state, int card_id, int device_id, unsigned int *logic)
{
    SIM_CHECK(sim_load_state(state));
    SIM_CHECK(sim_resolve(state, card_id, device_id, logic));
    return sim_npu_lost(*logic) ? DCMI_ERR_CODE_DEVICE_NOT_EXIST : DCMI_OK;
}

/* ---- mutation ----------------------------------------------------------------------------- */

static void count_mutating_call(void)
{
    unsigned long long calls = 0;
    char *text;
    size_t len;
    if (sim_read_file(sim.counters_path, &text, &len) == 0) {
        char name[32];
        if (sscanf(text, "%31s %llu", name, &calls) != 2 || strcmp(name, "mutating_calls") != 0) {
            calls = 0;
        }
        free(text);
    }
    char line[64];
    int n = snprintf(line, sizeof line, "mutating_calls %llu\n", calls + 1);
    /* Not flushed: the counter is a test observable, not state worth a disk flush. */
    if (sim_write_file_atomic(sim.counters_path, line, (size_t)n, 0) != 0) {
        sim_report("cannot update %s", sim.counters_path);
    }
}

int sim_mutate(sim_mutation_fn mutation, void *ctx)
{
    if (!sim.initialised) {
        return DCMI_ERR_CODE_NOT_REDAY;
    }
    int lock = lock_state_file(sim.lock_path);
    if (lock < 0) {
        sim_report("cannot lock %s: %s", sim.lock_path, strerror(errno));
        return DCMI_ERR_CODE_INNER_ERR;
    }
    count_mutating_call();
    static struct sim_state state; /* large; mutations run under the API mutex */
    int result = sim_load_state(&state);
    if (result == DCMI_OK) {
        int changed = 0;
        result = mutation(&state, ctx, &changed);
        if (result == DCMI_OK && changed) {
            size_t len;
            char *text = sim_format_state(&state, &len);
            int error = text == NULL ? -ENOMEM
                                     : sim_write_file_atomic(sim.state_path, text, len,
                                                             sim.sync_writes);
            free(text);
            if (error != 0) {
                sim_report("cannot write %s: %s", sim.state_path, strerror(-error));
                result = DCMI_ERR_CODE_INNER_ERR;
            }
        }
    }
    unlock_state_file(lock);
    return result;
}

/* ---- dcmi_init ---------------------------------------------------------------------------- */

static int join(char *out, size_t out_len, const char *dir, const char *name)
{
    int n = snprintf(out, out_len, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= out_len ? -1 : 0;
}

static int set_paths(struct sim_session *s, const char *dir)
{
    if (strlen(dir) >= sizeof s->dir) {
        return -1;
    }
    snprintf(s->dir, sizeof s->dir, "%s", dir);
    return join(s->topology_path, sizeof s->topology_path, dir, "topology") |
           join(s->state_path, sizeof s->state_path, dir, "state") |
           join(s->lock_path, sizeof s->lock_path, dir, "state.lock") |
           join(s->counters_path, sizeof s->counters_path, dir, "counters") |
           join(s->health_path, sizeof s->health_path, dir, "health");
}

/* Writes DIR/topology from DCMI_SIM_TOPOLOGY when the file does not exist yet. Returns 0 when
 * the file exists afterwards (written by us or by a racing process). */
static int topology_from_environment(const struct sim_session *s)
{
    const char *preset = getenv("DCMI_SIM_TOPOLOGY");
    if (preset == NULL || preset[0] == '\0') {
        sim_report("%s does not exist and DCMI_SIM_TOPOLOGY is not set; run 'accelguard sim "
                   "init' or set DCMI_SIM_TOPOLOGY=ascend910x8 (see docs/dcmi-sim.md)",
                   s->topology_path);
        return -1;
    }
    char why[256] = "";
    char *text = sim_topology_from_preset(preset, why, sizeof why);
    if (text == NULL) {
        sim_report("%s", why);
        return -1;
    }
    int lock = lock_state_file(s->lock_path);
    if (lock < 0) {
        sim_report("cannot lock %s: %s", s->lock_path, strerror(errno));
        free(text);
        return -1;
    }
    struct stat st;
    int error = 0;
    if (stat(s->topology_path, &st) != 0) {
        error = sim_write_file_atomic(s->topology_path, text, strlen(text), s->sync_writes);
    }
    unlock_state_file(lock);
    free(text);
    if (error != 0) {
        sim_report("cannot write %s: %s", s->topology_path, strerror(-error));
        return -1;
    }
    return 0;
}

static int read_topology(struct sim_session *s)
{
    char *text;
    size_t len;
    int error = sim_read_file(s->topology_path, &text, &len);
    if (error == -ENOENT) {
        if (topology_from_environment(s) != 0) {
            return -1;
        }
        error = sim_read_file(s->topology_path, &text, &len);
    }
    if (error != 0) {
        sim_report("cannot read %s: %s", s->topology_path, strerror(-error));
        return -1;
    }
    char why[160] = "";
    int bad = sim_parse_topology(text, len, &s->topology, why, sizeof why);
    free(text);
    if (bad) {
        sim_report("invalid topology %s: %s", s->topology_path, why);
        return -1;
    }
    return 0;
}

/* Makes DIR/state exist and agree with the topology, under the state lock. */
static int open_state(const struct sim_session *s)
{
    int lock = lock_state_file(s->lock_path);
    if (lock < 0) {
        sim_report("cannot create or lock %s: %s", s->lock_path, strerror(errno));
        return -1;
    }
    static struct sim_state state; /* large; init runs under the API mutex */
    char why[3 * PATH_MAX] = "";
    int result = read_state(s, &state, why, sizeof why);
    int status = 0;
    if (result == -ENOENT || result == -ESTALE) {
        /* A state for other NPUs belongs to a previous `sim init` of this directory. */
        if (result == -ESTALE) {
            sim_report("%s; starting from the topology", why);
        }
        sim_state_from_topology(&s->topology, &state);
        size_t len;
        char *text = sim_format_state(&state, &len);
        int error = text == NULL ? -ENOMEM
                                 : sim_write_file_atomic(s->state_path, text, len,
                                                         s->sync_writes);
        free(text);
        if (error != 0) {
            sim_report("cannot create %s: %s", s->state_path, strerror(-error));
            status = -1;
        }
    } else if (result != 0) {
        sim_report("%s", why);
        status = -1;
    }
    unlock_state_file(lock);
    return status;
}

SIM_API(dcmi_init, (void), ())
{
    /* DCMI_SIM_DIR is read at every dcmi_init; a failed one leaves the library uninitialised,
     * so no later call can act on a directory that was refused. */
    sim.initialised = 0;
    static struct sim_session pending; /* large; init runs under the API mutex */
    memset(&pending, 0, sizeof pending);
    const char *dir = getenv("DCMI_SIM_DIR");
    if (dir == NULL || dir[0] == '\0') {
        sim_report("DCMI_SIM_DIR is not set; point it at a directory made by "
                   "'accelguard sim init'");
        return DCMI_ERR_CODE_INNER_ERR;
    }
    struct stat st;
    if (strlen(dir) >= PATH_MAX) {
        sim_report("DCMI_SIM_DIR is too long");
        return DCMI_ERR_CODE_INNER_ERR;
    }
    /* Absolute, so a later chdir of the process does not move the node under it. */
    char absolute[PATH_MAX];
    if (realpath(dir, absolute) == NULL || stat(absolute, &st) != 0 || !S_ISDIR(st.st_mode)) {
        sim_report("DCMI_SIM_DIR=%s is not a directory", dir);
        return DCMI_ERR_CODE_INNER_ERR;
    }
    if (set_paths(&pending, absolute) != 0) {
        sim_report("DCMI_SIM_DIR is too long");
        return DCMI_ERR_CODE_INNER_ERR;
    }
    const char *sync_env = getenv("DCMI_SIM_FSYNC");
    pending.sync_writes = !(sync_env != NULL && strcmp(sync_env, "0") == 0);
    if (read_topology(&pending) != 0 || open_state(&pending) != 0) {
        return DCMI_ERR_CODE_INNER_ERR;
    }
    pending.initialised = 1;
    sim = pending;
    return DCMI_OK;
}

/* ---- versions (answered with or without dcmi_init) ---------------------------------------- */

SIM_API(dcmi_get_dcmi_version, (char *dcmi_ver, unsigned int len), (dcmi_ver, len))
{
    return sim_copy_string(SIM_DCMI_VERSION, dcmi_ver, len);
}

SIM_API(dcmi_get_driver_version, (char *driver_ver, unsigned int len), (driver_ver, len))
{
    return sim_copy_string(SIM_DRIVER_VERSION, driver_ver, len);
}
