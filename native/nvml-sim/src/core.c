/* Library lifetime (nvmlInit, nvmlInitWithFlags, nvmlShutdown), the state cache, locked
 * read-modify-write of the state file, DIR/counters, and the system-level queries. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim.h"

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

/* Reported by the system queries; a current R570 datacenter driver with CUDA 12.8. */
#define SIM_DRIVER_VERSION "570.124.06"
#define SIM_NVML_VERSION "12.570.124.06"
#define SIM_CUDA_DRIVER_VERSION 12080

/* A file written less than this long ago may be replaced again within the same coarse
 * timestamp tick with the same size and a recycled inode; its key is not trusted until then
 * (the "racy clean" problem git's index has, solved the same way). */
#define SIM_SETTLE_NS 100000000LL

/* Room for two paths and an explanation. */
#define SIM_MESSAGE_MAX (3 * PATH_MAX)

static long long timespec_ns(const struct timespec *t)
{
    return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static int key_settled(const struct file_key *key)
{
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    return timespec_ns(&now) - timespec_ns(&key->mtime) > SIM_SETTLE_NS &&
           timespec_ns(&now) - timespec_ns(&key->ctime) > SIM_SETTLE_NS;
}

static void report(const char *format, const char *detail)
{
    fprintf(stderr, "nvml-sim: ");
    fprintf(stderr, format, detail);
    fputc('\n', stderr);
}

/* ---- state cache -------------------------------------------------------------------------- */

/* Loads DIR/state into `out` when its file key differs from `key` (or the key is not settled).
 * Returns 0 (unchanged), 1 (loaded), or -errno / -EINVAL with `why` set. */
static int load_state_if_changed(struct sim_state *out, struct file_key *key, int *settled,
                                 char *why, size_t why_len)
{
    struct file_key current;
    int error = sim_file_key(sim.state_path, &current);
    if (error != 0) {
        snprintf(why, why_len, "cannot stat %s: %s", sim.state_path, strerror(-error));
        return error;
    }
    if (*settled && sim_file_key_equal(&current, key)) {
        return 0;
    }
    char *text;
    size_t len;
    error = sim_read_file(sim.state_path, &text, &len, &current);
    if (error != 0) {
        snprintf(why, why_len, "cannot read %s: %s", sim.state_path, strerror(-error));
        return error;
    }
    struct sim_state parsed;
    char detail[160] = "";
    int bad = sim_parse_state(text, len, &parsed, detail, sizeof detail);
    free(text);
    if (bad) {
        snprintf(why, why_len, "%s is corrupt: %s", sim.state_path, detail);
        return -EINVAL;
    }
    if (!sim_state_matches_topology(&parsed, &sim.topology)) {
        snprintf(why, why_len, "%s describes other GPUs than %s/topology", sim.state_path,
                 sim.dir);
        return -EINVAL;
    }
    *out = parsed;
    *key = current;
    *settled = key_settled(&current);
    return 1;
}

nvmlReturn_t sim_require_init(void)
{
    return sim.refcount > 0 ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

nvmlReturn_t sim_sync(void)
{
    if (sim.refcount == 0) {
        return NVML_ERROR_UNINITIALIZED;
    }
    char why[SIM_MESSAGE_MAX];
    int result = load_state_if_changed(&sim.state, &sim.state_key, &sim.state_key_settled, why,
                                       sizeof why);
    if (result < 0) {
        if (!sim.state_error_reported) {
            report("%s", why);
            sim.state_error_reported = 1;
        }
        sim.state_key.valid = 0;
        return NVML_ERROR_UNKNOWN;
    }
    sim.state_error_reported = 0;
    return NVML_SUCCESS;
}

/* ---- locking and mutation ----------------------------------------------------------------- */

int sim_lock_state_file(void)
{
    /* Opened per use, never with O_TRUNC: other tools lock the same file, and a lock held on a
     * file that was since replaced would exclude nobody. */
    int fd = open(sim.lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
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

void sim_unlock_state_file(int fd)
{
    if (fd >= 0) {
        close(fd); /* releases the flock */
    }
}

static void count_mutating_call(void)
{
    unsigned long long calls = 0;
    char *text;
    size_t len;
    if (sim_read_file(sim.counters_path, &text, &len, NULL) == 0) {
        char name[32];
        if (sscanf(text, "%31s %llu", name, &calls) != 2 || strcmp(name, "mutating_calls") != 0) {
            calls = 0;
        }
        free(text);
    }
    char line[64];
    int n = snprintf(line, sizeof line, "mutating_calls %llu\n", calls + 1);
    /* Not fsynced: the counter is a test observable, not state worth a disk flush. */
    if (sim_write_file_atomic(sim.counters_path, line, (size_t)n, 0, NULL) != 0) {
        report("cannot update %s", sim.counters_path);
    }
}

nvmlReturn_t sim_mutate(int counted, sim_mutation_fn mutation, void *ctx)
{
    if (sim.refcount == 0) {
        return NVML_ERROR_UNINITIALIZED;
    }
    int lock = sim_lock_state_file();
    if (lock < 0) {
        report("cannot lock %s", sim.lock_path);
        return NVML_ERROR_UNKNOWN;
    }
    if (counted) {
        count_mutating_call();
    }
    nvmlReturn_t result = sim_sync();
    if (result == NVML_SUCCESS) {
        struct sim_state next = sim.state;
        int changed = 0;
        result = mutation(&next, ctx, &changed);
        if (result == NVML_SUCCESS && changed) {
            size_t len;
            char *text = sim_format_state(&next, &len);
            struct file_key key;
            int error = text == NULL ? -ENOMEM
                                     : sim_write_file_atomic(sim.state_path, text, len,
                                                             sim.sync_writes, &key);
            free(text);
            if (error != 0) {
                report("cannot write the state file: %s", strerror(-error));
                result = NVML_ERROR_UNKNOWN;
            } else {
                sim.state = next;
                sim.state_key = key;
                sim.state_key_settled = 0;
            }
        }
    }
    sim_unlock_state_file(lock);
    return result;
}

/* ---- init / shutdown ---------------------------------------------------------------------- */

struct pending_session {
    char dir[PATH_MAX];
    struct sim_topology topology;
};

static int join(char *out, size_t out_len, const char *dir, const char *name)
{
    int n = snprintf(out, out_len, "%s/%s", dir, name);
    return n < 0 || (size_t)n >= out_len ? -1 : 0;
}

static void set_paths(const char *dir)
{
    snprintf(sim.dir, sizeof sim.dir, "%s", dir);
    join(sim.state_path, sizeof sim.state_path, dir, "state");
    join(sim.lock_path, sizeof sim.lock_path, dir, "state.lock");
    join(sim.processes_path, sizeof sim.processes_path, dir, "processes");
    join(sim.xid_path, sizeof sim.xid_path, dir, "xid");
    join(sim.counters_path, sizeof sim.counters_path, dir, "counters");
    join(sim.health_path, sizeof sim.health_path, dir, "health");
}

/* Reads NVML_SIM_DIR and its topology; prints why and returns nonzero when unusable. */
static int read_configuration(struct pending_session *out)
{
    const char *dir = getenv("NVML_SIM_DIR");
    if (dir == NULL || dir[0] == '\0') {
        report("%s", "NVML_SIM_DIR is not set; point it at a directory made by "
                     "'accelguard sim init'");
        return -1;
    }
    struct stat st;
    if (strlen(dir) >= sizeof out->dir - 32) {
        report("%s", "NVML_SIM_DIR is too long");
        return -1;
    }
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        report("NVML_SIM_DIR=%s is not a directory", dir);
        return -1;
    }
    snprintf(out->dir, sizeof out->dir, "%s", dir);
    char path[PATH_MAX + 16];
    join(path, sizeof path, dir, "topology");
    char *text;
    size_t len;
    int error = sim_read_file(path, &text, &len, NULL);
    if (error != 0) {
        char line[SIM_MESSAGE_MAX];
        snprintf(line, sizeof line, "%s: %s", path, strerror(-error));
        report("cannot read the topology %s", line);
        return -1;
    }
    char why[160] = "";
    int bad = sim_parse_topology(text, len, &out->topology, why, sizeof why);
    free(text);
    if (bad) {
        char line[SIM_MESSAGE_MAX];
        snprintf(line, sizeof line, "%s: %s", path, why);
        report("invalid topology %s", line);
        return -1;
    }
    return 0;
}

/* Makes DIR/state exist and agree with the topology, under the state lock. */
static int open_state(void)
{
    int lock = sim_lock_state_file();
    if (lock < 0) {
        report("cannot create or lock %s", sim.lock_path);
        return -1;
    }
    char why[SIM_MESSAGE_MAX] = "";
    struct sim_state loaded;
    struct file_key key = {0};
    int settled = 0;
    int result = load_state_if_changed(&loaded, &key, &settled, why, sizeof why);
    int rebuild = 0;
    if (result == -ENOENT) {
        rebuild = 1;
    } else if (result < 0) {
        /* A state that disagrees with the topology belongs to a previous `sim init`. */
        if (result == -EINVAL && strstr(why, "describes other GPUs") != NULL) {
            report("%s; starting from the topology", why);
            rebuild = 1;
        } else {
            report("%s", why);
            sim_unlock_state_file(lock);
            return -1;
        }
    }
    if (rebuild) {
        sim_state_from_topology(&sim.topology, &loaded);
        size_t len;
        char *text = sim_format_state(&loaded, &len);
        int error = text == NULL ? -ENOMEM
                                 : sim_write_file_atomic(sim.state_path, text, len,
                                                         sim.sync_writes, &key);
        free(text);
        if (error != 0) {
            report("cannot create the state file: %s", strerror(-error));
            sim_unlock_state_file(lock);
            return -1;
        }
        settled = 0;
    }
    sim.state = loaded;
    sim.state_key = key;
    sim.state_key_settled = settled;
    sim.state_error_reported = 0;
    sim_unlock_state_file(lock);
    return 0;
}

static nvmlReturn_t init_locked(void)
{
    struct pending_session pending;
    if (read_configuration(&pending) != 0) {
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    /* NVML_SIM_DIR is read at every init; a nested init naming another directory switches this
     * process to it, exactly as a shutdown + init would. */
    static struct sim_session saved; /* large; init runs under the API mutex */
    saved = sim;
    set_paths(pending.dir);
    sim.topology = pending.topology;
    const char *sync_env = getenv("NVML_SIM_FSYNC");
    sim.sync_writes = !(sync_env != NULL && strcmp(sync_env, "0") == 0);
    if (open_state() != 0) {
        sim = saved;
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    sim.refcount++;
    return NVML_SUCCESS;
}

SIM_API(nvmlInit_v2, (void), ())
{
    return init_locked();
}

SIM_API(nvmlInit, (void), ())
{
    return init_locked();
}

SIM_API(nvmlInitWithFlags, (unsigned int flags), (flags))
{
    (void)flags; /* NO_GPUS / NO_ATTACH change nothing for simulated GPUs */
    return init_locked();
}

SIM_API(nvmlShutdown, (void), ())
{
    if (sim.refcount == 0) {
        return NVML_ERROR_UNINITIALIZED;
    }
    sim.refcount--;
    return NVML_SUCCESS;
}

/* ---- error strings and system queries ----------------------------------------------------- */

SIM_EXPORT const char *nvmlErrorString(nvmlReturn_t result);
SIM_EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_ALREADY_INITIALIZED: return "Already Initialized";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_INSUFFICIENT_POWER: return "Insufficient External Power";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_IRQ_ISSUE: return "Interrupt Request Issue";
    case NVML_ERROR_LIBRARY_NOT_FOUND: return "NVML Shared Library Not Found";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_CORRUPTED_INFOROM: return "Corrupted infoROM";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_OPERATING_SYSTEM: return "The operating system has blocked the request.";
    case NVML_ERROR_LIB_RM_VERSION_MISMATCH: return "RM has detected an NVML/RM version mismatch.";
    case NVML_ERROR_IN_USE: return "In use by another client";
    case NVML_ERROR_MEMORY: return "Insufficient Memory";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_VGPU_ECC_NOT_SUPPORTED: return "vGPU ECC not supported";
    case NVML_ERROR_INSUFFICIENT_RESOURCES: return "Insufficient resources";
    case NVML_ERROR_FREQ_NOT_SUPPORTED: return "Frequency not supported";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    case NVML_ERROR_DEPRECATED: return "Deprecated";
    case NVML_ERROR_NOT_READY: return "Not ready";
    case NVML_ERROR_GPU_NOT_FOUND: return "GPU not found";
    case NVML_ERROR_INVALID_STATE: return "Invalid state";
    case NVML_ERROR_RESET_TYPE_NOT_SUPPORTED: return "Reset type not supported";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    }
    return "Unknown Error";
}

SIM_API(nvmlSystemGetDriverVersion, (char *version, unsigned int length), (version, length))
{
    SIM_CHECK(sim_require_init());
    return sim_copy_string(SIM_DRIVER_VERSION, version, length);
}

SIM_API(nvmlSystemGetNVMLVersion, (char *version, unsigned int length), (version, length))
{
    /* Like the real library, this one answers before nvmlInit. */
    return sim_copy_string(SIM_NVML_VERSION, version, length);
}

SIM_API(nvmlSystemGetCudaDriverVersion, (int *cudaDriverVersion), (cudaDriverVersion))
{
    if (cudaDriverVersion == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *cudaDriverVersion = SIM_CUDA_DRIVER_VERSION;
    return NVML_SUCCESS;
}

SIM_API(nvmlSystemGetCudaDriverVersion_v2, (int *cudaDriverVersion), (cudaDriverVersion))
{
    if (cudaDriverVersion == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *cudaDriverVersion = SIM_CUDA_DRIVER_VERSION;
    return NVML_SUCCESS;
}
