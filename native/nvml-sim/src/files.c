/* File plumbing: whole-file reads, atomic replacement, line and token splitting, and the
 * control files other tools write (DIR/processes, DIR/health). */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim.h"

static void key_from_stat(const struct stat *st, struct file_key *key)
{
    key->valid = 1;
    key->dev = st->st_dev;
    key->ino = st->st_ino;
    key->size = st->st_size;
    key->mtime = st->st_mtim;
    key->ctime = st->st_ctim;
}

int sim_file_key(const char *path, struct file_key *key)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        key->valid = 0;
        return -errno;
    }
    key_from_stat(&st, key);
    return 0;
}

int sim_file_key_equal(const struct file_key *a, const struct file_key *b)
{
    return a->valid && b->valid && a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
           a->mtime.tv_sec == b->mtime.tv_sec && a->mtime.tv_nsec == b->mtime.tv_nsec &&
           a->ctime.tv_sec == b->ctime.tv_sec && a->ctime.tv_nsec == b->ctime.tv_nsec;
}

int sim_read_file(const char *path, char **data, size_t *len, struct file_key *key)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -errno;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    size_t capacity = st.st_size > 0 ? (size_t)st.st_size + 1 : 4096;
    char *buffer = malloc(capacity + 1);
    if (buffer == NULL) {
        close(fd);
        return -ENOMEM;
    }
    size_t used = 0;
    for (;;) {
        if (used == capacity) {
            char *bigger = realloc(buffer, capacity * 2 + 1);
            if (bigger == NULL) {
                free(buffer);
                close(fd);
                return -ENOMEM;
            }
            buffer = bigger;
            capacity *= 2;
        }
        ssize_t got = read(fd, buffer + used, capacity - used);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            int error = errno;
            free(buffer);
            close(fd);
            return -error;
        }
        if (got == 0) {
            break;
        }
        used += (size_t)got;
        /* A short read of a regular file means end of file: saves a read(2) per file. */
        if (S_ISREG(st.st_mode) && used < capacity) {
            break;
        }
    }
    buffer[used] = '\0';
    if (key != NULL) {
        key_from_stat(&st, key);
    }
    close(fd);
    *data = buffer;
    *len = used;
    return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t done = write(fd, data, len);
        if (done < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        data += done;
        len -= (size_t)done;
    }
    return 0;
}

/* A reader sees either the old file or the new one, never a mix, and a writer killed at any
 * point leaves the old file in place: rename(2) replaces the name atomically. */
int sim_write_file_atomic(const char *path, const char *data, size_t len, int sync,
                          struct file_key *key)
{
    char tmp[PATH_MAX + 32];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        return -ENAMETOOLONG;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
        /* Left by a writer killed mid-write; callers hold the state lock, so no live writer
         * owns it. Unlinking instead of O_TRUNC also avoids ext4's flush-on-truncate. */
        unlink(tmp);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    }
    if (fd < 0) {
        return -errno;
    }
    int error = write_all(fd, data, len);
    /* fdatasync flushes the data and the size needed to read it back -- all a rename needs to
     * publish a complete file -- without fsync's journal commit of timestamps. */
    if (error == 0 && sync && fdatasync(fd) != 0) {
        error = -errno;
    }
    struct stat st;
    if (error == 0 && key != NULL) {
        if (fstat(fd, &st) != 0) {
            error = -errno;
        }
    }
    if (close(fd) != 0 && error == 0) {
        error = -errno;
    }
    if (error == 0 && rename(tmp, path) != 0) {
        error = -errno;
    }
    if (error != 0) {
        unlink(tmp);
        return error;
    }
    if (key != NULL) {
        /* rename keeps the inode but updates its ctime; re-stat for the key readers will see. */
        if (stat(path, &st) != 0) {
            key->valid = 0;
        } else {
            key_from_stat(&st, key);
        }
    }
    return 0;
}

size_t sim_for_each_line(const char *text, size_t len, int allow_unterminated, sim_line_fn fn,
                         void *ctx)
{
    size_t start = 0;
    while (start < len) {
        const char *newline = memchr(text + start, '\n', len - start);
        size_t end;
        size_t line_len;
        if (newline == NULL) {
            if (!allow_unterminated) {
                break;
            }
            line_len = len - start;
            end = len;
        } else {
            line_len = (size_t)(newline - (text + start));
            end = start + line_len + 1;
        }
        int stop = fn(text + start, line_len, start, end, ctx);
        start = end;
        if (stop) {
            break;
        }
    }
    return start;
}

int sim_tokenize(const char *line, size_t len, char *buf, size_t buf_len, char **tokens, int max)
{
    const char *hash = memchr(line, '#', len);
    if (hash != NULL) {
        len = (size_t)(hash - line);
    }
    if (len >= buf_len || memchr(line, '\0', len) != NULL) {
        return -1;
    }
    memcpy(buf, line, len);
    buf[len] = '\0';
    int count = 0;
    char *p = buf;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r') {
            p++;
        }
        if (*p == '\0') {
            return count;
        }
        if (count == max) {
            return -1;
        }
        tokens[count++] = p;
        while (*p != '\0' && *p != ' ' && *p != '\t' && *p != '\r') {
            p++;
        }
        if (*p != '\0') {
            *p++ = '\0';
        }
    }
}

/* Strict decimal: digits only, no sign, no leading '+', bounded. */
int sim_parse_u64(const char *s, unsigned long long max, unsigned long long *out)
{
    if (*s == '\0' || strlen(s) > 20) {
        return -1;
    }
    unsigned long long value = 0;
    for (const char *p = s; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        unsigned int digit = (unsigned int)(*p - '0');
        if (digit > max || value > (max - digit) / 10) {
            return -1;
        }
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

int sim_parse_u64_or_minus_one(const char *s, unsigned long long max,
                               unsigned long long minus_one, unsigned long long *out)
{
    if (strcmp(s, "-1") == 0) {
        *out = minus_one;
        return 0;
    }
    return sim_parse_u64(s, max, out);
}

/* ---- DIR/processes ------------------------------------------------------------------------ */

struct process_scan {
    struct sim_process *out;
    int max;
    int count;
};

/* kill(pid, 0) probes without signalling; EPERM still proves the pid exists. A zombie (state Z
 * in /proc/PID/stat) has exited and released its GPU context, so NVML does not list it: neither
 * do we, or a killed-but-unreaped workload would keep its instance "in use". */
static int pid_is_zombie(unsigned int pid)
{
    char path[64];
    char buffer[512];
    snprintf(path, sizeof path, "/proc/%u/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 0;
    }
    ssize_t got = read(fd, buffer, sizeof buffer - 1);
    close(fd);
    if (got <= 0) {
        return 0;
    }
    buffer[got] = '\0';
    /* The state follows the command name in parentheses, which may itself contain ')'. */
    const char *close_paren = strrchr(buffer, ')');
    return close_paren != NULL && close_paren[1] == ' ' &&
           (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

static int pid_alive(unsigned int pid)
{
    if (pid == 0 || pid > (unsigned int)INT32_MAX) {
        return 0;
    }
    if (!(kill((pid_t)pid, 0) == 0 || errno == EPERM)) {
        return 0;
    }
    return !pid_is_zombie(pid);
}

static int process_line(const char *line, size_t len, size_t start, size_t end, void *ctx)
{
    (void)start;
    (void)end;
    struct process_scan *scan = ctx;
    char buf[256];
    char *tok[5];
    if (sim_tokenize(line, len, buf, sizeof buf, tok, 5) != 5) {
        return 0; /* other tools own this file: a line we cannot read is skipped, not fatal */
    }
    unsigned long long pid, gpu, gi, ci, used;
    if (sim_parse_u64(tok[0], INT32_MAX, &pid) != 0 || sim_parse_u64(tok[1], 1000, &gpu) != 0 ||
        sim_parse_u64_or_minus_one(tok[2], SIM_MAX_GI, NVML_VALUE_NOT_AVAILABLE_UINT, &gi) != 0 ||
        sim_parse_u64_or_minus_one(tok[3], SIM_MAX_CI, NVML_VALUE_NOT_AVAILABLE_UINT, &ci) != 0 ||
        sim_parse_u64(tok[4], ~0ULL, &used) != 0) {
        return 0;
    }
    /* A process runs either in one compute instance or on the whole GPU. */
    if ((gi == NVML_VALUE_NOT_AVAILABLE_UINT) != (ci == NVML_VALUE_NOT_AVAILABLE_UINT)) {
        return 0;
    }
    if (!pid_alive((unsigned int)pid) || scan->count >= scan->max) {
        return 0;
    }
    struct sim_process *p = &scan->out[scan->count++];
    p->pid = (unsigned int)pid;
    p->gpu = (unsigned int)gpu;
    p->gi = (unsigned int)gi;
    p->ci = (unsigned int)ci;
    p->used_bytes = used;
    return 0;
}

int sim_live_processes(struct sim_process *out, int max)
{
    char *text;
    size_t len;
    int error = sim_read_file(sim.processes_path, &text, &len, NULL);
    if (error == -ENOENT) {
        return 0;
    }
    if (error != 0) {
        return -1;
    }
    struct process_scan scan = {.out = out, .max = max, .count = 0};
    sim_for_each_line(text, len, 1, process_line, &scan);
    free(text);
    return scan.count;
}

/* ---- DIR/health --------------------------------------------------------------------------- */

static const char *const health_names[HEALTH_KEY_COUNT] = {
    [HEALTH_TEMPERATURE_C] = "temperature_c",
    [HEALTH_POWER_MW] = "power_mw",
    [HEALTH_ECC_VOLATILE_CORRECTED] = "ecc_volatile_corrected",
    [HEALTH_ECC_VOLATILE_UNCORRECTED] = "ecc_volatile_uncorrected",
    [HEALTH_ECC_AGGREGATE_CORRECTED] = "ecc_aggregate_corrected",
    [HEALTH_ECC_AGGREGATE_UNCORRECTED] = "ecc_aggregate_uncorrected",
    [HEALTH_REMAPPED_CORRECTABLE] = "remapped_correctable",
    [HEALTH_REMAPPED_UNCORRECTABLE] = "remapped_uncorrectable",
    [HEALTH_REMAPPING_PENDING] = "remapping_pending",
    [HEALTH_REMAPPING_FAILURE] = "remapping_failure",
    [HEALTH_CLOCKS_EVENT_REASONS] = "clocks_event_reasons",
    [HEALTH_LOST] = "lost",
};

/* A healthy idle data-centre GPU. */
static unsigned long long health_default(enum health_key key)
{
    switch (key) {
    case HEALTH_TEMPERATURE_C:
        return 35;
    case HEALTH_POWER_MW:
        return 70000;
    default:
        return 0;
    }
}

struct health_scan {
    unsigned int gpu;
    enum health_key key;
    unsigned long long value;
};

static int health_line(const char *line, size_t len, size_t start, size_t end, void *ctx)
{
    (void)start;
    (void)end;
    struct health_scan *scan = ctx;
    char buf[256];
    char *tok[3];
    unsigned long long gpu, value;
    if (sim_tokenize(line, len, buf, sizeof buf, tok, 3) != 3 ||
        sim_parse_u64(tok[0], 1000, &gpu) != 0 || gpu != scan->gpu ||
        strcmp(tok[1], health_names[scan->key]) != 0) {
        return 0;
    }
    /* Counters and reasons are 64-bit; `lost` is a flag; the others are 32-bit in NVML. */
    unsigned long long max = ~0ULL;
    if (scan->key == HEALTH_LOST) {
        max = 1;
    } else if (scan->key != HEALTH_ECC_VOLATILE_CORRECTED &&
               scan->key != HEALTH_ECC_VOLATILE_UNCORRECTED &&
               scan->key != HEALTH_ECC_AGGREGATE_CORRECTED &&
               scan->key != HEALTH_ECC_AGGREGATE_UNCORRECTED &&
               scan->key != HEALTH_CLOCKS_EVENT_REASONS) {
        max = 0xFFFFFFFFULL;
    }
    if (sim_parse_u64(tok[2], max, &value) == 0) {
        scan->value = value; /* the last valid line wins */
    }
    return 0;
}

unsigned long long sim_health_value(unsigned int gpu, enum health_key key)
{
    struct health_scan scan = {.gpu = gpu, .key = key, .value = health_default(key)};
    char *text;
    size_t len;
    if (sim_read_file(sim.health_path, &text, &len, NULL) != 0) {
        return scan.value;
    }
    sim_for_each_line(text, len, 1, health_line, &scan);
    free(text);
    return scan.value;
}

int sim_gpu_lost(unsigned int gpu)
{
    return sim_health_value(gpu, HEALTH_LOST) != 0;
}
