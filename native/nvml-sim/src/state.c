/*
 * DIR/topology (read-only input) and DIR/state (our persistent state) formats.
 *
 * state, one record per line, written whole and replaced atomically:
 *   nvml-sim-state 1
 *   id <16 hex digits>
 *   serial <last creation serial>
 *   gpu <index> <model> <mig current 0|1> <mig pending 0|1>
 *   gi <gpu> <gi id> <profile id> <start> <size> <serial>
 *   ci <gpu> <gi id> <ci id> <ci profile id> <start> <size> <serial>
 *   end
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "sim.h"

static void explain(char *why, size_t why_len, const char *format, ...)
    __attribute__((format(printf, 3, 4)));

static void explain(char *why, size_t why_len, const char *format, ...)
{
    if (why == NULL || why_len == 0) {
        return;
    }
    va_list args;
    va_start(args, format);
    vsnprintf(why, why_len, format, args);
    va_end(args);
}

/* ---- topology ----------------------------------------------------------------------------- */

struct topology_scan {
    struct sim_topology *out;
    unsigned int line_number;
    unsigned int seen_mask;
    int failed;
    char *why;
    size_t why_len;
};

static int topology_line(const char *line, size_t len, size_t start, size_t end, void *ctx)
{
    (void)start;
    (void)end;
    struct topology_scan *scan = ctx;
    scan->line_number++;
    char buf[512];
    char *tok[4];
    int count = sim_tokenize(line, len, buf, sizeof buf, tok, 4);
    if (count == 0) {
        return 0;
    }
    unsigned long long index;
    if (count != 4 || strcmp(tok[0], "gpu") != 0) {
        explain(scan->why, scan->why_len,
                "line %u: expected 'gpu <index> <model> mig=<0|1>'", scan->line_number);
        scan->failed = 1;
        return 1;
    }
    if (sim_parse_u64(tok[1], SIM_MAX_GPUS - 1, &index) != 0) {
        explain(scan->why, scan->why_len, "line %u: GPU index must be 0..%u", scan->line_number,
                SIM_MAX_GPUS - 1);
        scan->failed = 1;
        return 1;
    }
    int model = sim_model_by_key(tok[2]);
    if (model < 0) {
        explain(scan->why, scan->why_len,
                "line %u: unknown model (expected H100-80GB, A100-40GB or A100-80GB)",
                scan->line_number);
        scan->failed = 1;
        return 1;
    }
    unsigned int mig;
    if (strcmp(tok[3], "mig=0") == 0) {
        mig = 0;
    } else if (strcmp(tok[3], "mig=1") == 0) {
        mig = 1;
    } else {
        explain(scan->why, scan->why_len, "line %u: expected mig=0 or mig=1",
                scan->line_number);
        scan->failed = 1;
        return 1;
    }
    if (scan->seen_mask & (1U << index)) {
        explain(scan->why, scan->why_len, "line %u: GPU %llu listed twice", scan->line_number,
                index);
        scan->failed = 1;
        return 1;
    }
    scan->seen_mask |= 1U << index;
    scan->out->model[index] = model;
    scan->out->mig[index] = mig;
    return 0;
}

int sim_parse_topology(const char *text, size_t len, struct sim_topology *out, char *why,
                       size_t why_len)
{
    memset(out, 0, sizeof *out);
    struct topology_scan scan = {.out = out, .why = why, .why_len = why_len};
    sim_for_each_line(text, len, 1, topology_line, &scan);
    if (scan.failed) {
        return -1;
    }
    /* NVML indices are dense: GPUs 0..n-1. */
    unsigned int count = 0;
    while (count < SIM_MAX_GPUS && (scan.seen_mask & (1U << count))) {
        count++;
    }
    if (scan.seen_mask != (1U << count) - 1U) {
        explain(why, why_len, "GPU indices must be 0..n-1 without gaps");
        return -1;
    }
    out->gpu_count = count;
    return 0;
}

/* ---- state -------------------------------------------------------------------------------- */

static uint64_t fresh_state_id(void)
{
    uint64_t id = 0;
    if (getrandom(&id, sizeof id, GRND_NONBLOCK) != (ssize_t)sizeof id) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        id = ((uint64_t)now.tv_sec * 1000000000ULL + (uint64_t)now.tv_nsec) ^
             ((uint64_t)getpid() << 32);
    }
    return id == 0 ? 1 : id;
}

void sim_state_from_topology(const struct sim_topology *topology, struct sim_state *out)
{
    memset(out, 0, sizeof *out);
    out->id = fresh_state_id();
    out->gpu_count = topology->gpu_count;
    for (unsigned int gpu = 0; gpu < topology->gpu_count; gpu++) {
        out->gpu[gpu].model = topology->model[gpu];
        out->gpu[gpu].mig_current = topology->mig[gpu];
        out->gpu[gpu].mig_pending = topology->mig[gpu];
    }
}

int sim_state_matches_topology(const struct sim_state *state, const struct sim_topology *t)
{
    if (state->gpu_count != t->gpu_count) {
        return 0;
    }
    for (unsigned int gpu = 0; gpu < t->gpu_count; gpu++) {
        if (state->gpu[gpu].model != t->model[gpu]) {
            return 0;
        }
    }
    return 1;
}

struct state_scan {
    struct sim_state *out;
    unsigned int line_number;
    int phase; /* 0: header, 1: id, 2: serial, 3: records, 4: after "end" */
    unsigned int next_gpu;
    int failed;
    char *why;
    size_t why_len;
};

static int fail_line(struct state_scan *scan, const char *what)
{
    explain(scan->why, scan->why_len, "line %u: %s", scan->line_number, what);
    scan->failed = 1;
    return 1;
}

static int parse_hex64(const char *s, uint64_t *out)
{
    if (strlen(s) != 16) {
        return -1;
    }
    uint64_t value = 0;
    for (const char *p = s; *p != '\0'; p++) {
        unsigned int digit;
        if (*p >= '0' && *p <= '9') {
            digit = (unsigned int)(*p - '0');
        } else if (*p >= 'a' && *p <= 'f') {
            digit = (unsigned int)(*p - 'a' + 10);
        } else {
            return -1;
        }
        value = (value << 4) | digit;
    }
    *out = value;
    return 0;
}

static int state_gi_line(struct state_scan *scan, char **tok)
{
    struct sim_state *st = scan->out;
    unsigned long long gpu, gi, profile_id, start, size, serial;
    if (sim_parse_u64(tok[1], SIM_MAX_GPUS - 1, &gpu) != 0 || gpu >= st->gpu_count ||
        sim_parse_u64(tok[2], SIM_MAX_GI - 1, &gi) != 0 ||
        sim_parse_u64(tok[3], 0xFFFFFFFFULL, &profile_id) != 0 ||
        sim_parse_u64(tok[4], SIM_MEMORY_SLICES - 1, &start) != 0 ||
        sim_parse_u64(tok[5], SIM_MEMORY_SLICES, &size) != 0 ||
        sim_parse_u64(tok[6], ~0ULL, &serial) != 0) {
        return fail_line(scan, "malformed gi record");
    }
    int kind = sim_gi_kind_by_id((unsigned int)profile_id);
    if (kind < 0 || !(sim_gi_profiles[kind].starts_mask & (1U << start)) ||
        sim_gi_profiles[kind].memory_slices != size ||
        sim_gi_id_for(kind, (unsigned int)start) != gi) {
        return fail_line(scan, "gi record does not match its profile's placements");
    }
    struct sim_gi *g = &st->gpu[gpu].gi[gi];
    if (g->used || !st->gpu[gpu].mig_current || serial == 0 || serial > st->serial) {
        return fail_line(scan, "gi record duplicated, on a non-MIG GPU, or with a bad serial");
    }
    g->used = 1;
    g->kind = kind;
    g->start = (unsigned int)start;
    g->serial = serial;
    return 0;
}

static int state_ci_line(struct state_scan *scan, char **tok)
{
    struct sim_state *st = scan->out;
    unsigned long long gpu, gi, ci, profile, start, size, serial;
    if (sim_parse_u64(tok[1], SIM_MAX_GPUS - 1, &gpu) != 0 || gpu >= st->gpu_count ||
        sim_parse_u64(tok[2], SIM_MAX_GI - 1, &gi) != 0 ||
        sim_parse_u64(tok[3], SIM_MAX_CI - 1, &ci) != 0 ||
        sim_parse_u64(tok[4], SIM_CI_PROFILE_KINDS - 1, &profile) != 0 ||
        sim_parse_u64(tok[5], SIM_COMPUTE_SLICES - 1, &start) != 0 ||
        sim_parse_u64(tok[6], SIM_COMPUTE_SLICES, &size) != 0 ||
        sim_parse_u64(tok[7], ~0ULL, &serial) != 0) {
        return fail_line(scan, "malformed ci record");
    }
    struct sim_gi *g = &st->gpu[gpu].gi[gi];
    if (!g->used) {
        return fail_line(scan, "ci record for a GPU instance that does not exist");
    }
    unsigned int gi_slices = sim_gi_profiles[g->kind].compute_slices;
    if (!(sim_ci_starts_mask(gi_slices, (unsigned int)profile) & (1U << start)) ||
        sim_ci_slices((unsigned int)profile) != size) {
        return fail_line(scan, "ci record does not match its profile's placements");
    }
    struct sim_ci *c = &g->ci[ci];
    if (c->used || serial == 0 || serial > st->serial) {
        return fail_line(scan, "ci record duplicated or with a bad serial");
    }
    c->used = 1;
    c->profile = (unsigned int)profile;
    c->start = (unsigned int)start;
    c->serial = serial;
    return 0;
}

static int state_line(const char *line, size_t len, size_t start, size_t end, void *ctx)
{
    (void)start;
    (void)end;
    struct state_scan *scan = ctx;
    struct sim_state *st = scan->out;
    scan->line_number++;
    char buf[256];
    char *tok[8];
    int count = sim_tokenize(line, len, buf, sizeof buf, tok, 8);
    if (count <= 0) {
        return fail_line(scan, "empty or unreadable line");
    }
    unsigned long long value;
    switch (scan->phase) {
    case 0:
        if (count != 2 || strcmp(tok[0], "nvml-sim-state") != 0 || strcmp(tok[1], "1") != 0) {
            return fail_line(scan, "not an nvml-sim state file (version 1)");
        }
        scan->phase = 1;
        return 0;
    case 1:
        if (count != 2 || strcmp(tok[0], "id") != 0 || parse_hex64(tok[1], &st->id) != 0 ||
            st->id == 0) {
            return fail_line(scan, "expected 'id <16 hex digits>'");
        }
        scan->phase = 2;
        return 0;
    case 2:
        if (count != 2 || strcmp(tok[0], "serial") != 0 ||
            sim_parse_u64(tok[1], ~0ULL, &value) != 0) {
            return fail_line(scan, "expected 'serial <n>'");
        }
        st->serial = value;
        scan->phase = 3;
        return 0;
    case 3:
        break;
    default:
        return fail_line(scan, "data after 'end'");
    }
    if (count == 1 && strcmp(tok[0], "end") == 0) {
        scan->phase = 4;
        return 0;
    }
    if (count == 5 && strcmp(tok[0], "gpu") == 0) {
        unsigned long long index, current, pending;
        int model = sim_model_by_key(tok[2]);
        if (sim_parse_u64(tok[1], SIM_MAX_GPUS - 1, &index) != 0 || index != scan->next_gpu ||
            model < 0 || sim_parse_u64(tok[3], 1, &current) != 0 ||
            sim_parse_u64(tok[4], 1, &pending) != 0) {
            return fail_line(scan, "malformed gpu record (GPUs must be listed in index order)");
        }
        st->gpu[index].model = model;
        st->gpu[index].mig_current = (unsigned int)current;
        st->gpu[index].mig_pending = (unsigned int)pending;
        scan->next_gpu++;
        st->gpu_count = scan->next_gpu;
        return 0;
    }
    if (count == 7 && strcmp(tok[0], "gi") == 0) {
        return state_gi_line(scan, tok);
    }
    if (count == 8 && strcmp(tok[0], "ci") == 0) {
        return state_ci_line(scan, tok);
    }
    return fail_line(scan, "unknown record");
}

int sim_parse_state(const char *text, size_t len, struct sim_state *out, char *why,
                    size_t why_len)
{
    memset(out, 0, sizeof *out);
    struct state_scan scan = {.out = out, .why = why, .why_len = why_len};
    size_t consumed = sim_for_each_line(text, len, 0, state_line, &scan);
    if (scan.failed) {
        return -1;
    }
    if (scan.phase != 4 || consumed != len) {
        explain(why, why_len, "truncated (no 'end' line)");
        return -1;
    }
    return 0;
}

char *sim_format_state(const struct sim_state *st, size_t *len)
{
    /* Generous bound: header + per GPU one gpu line, 14 gi lines and 14*8 ci lines. */
    size_t capacity = 256 + (size_t)SIM_MAX_GPUS * (64 + SIM_MAX_GI * (80 + SIM_MAX_CI * 96));
    char *text = malloc(capacity);
    if (text == NULL) {
        return NULL;
    }
    size_t used = 0;
#define EMIT(...)                                                                   \
    do {                                                                            \
        int n_ = snprintf(text + used, capacity - used, __VA_ARGS__);               \
        if (n_ < 0 || (size_t)n_ >= capacity - used) {                              \
            free(text);                                                             \
            return NULL;                                                            \
        }                                                                           \
        used += (size_t)n_;                                                         \
    } while (0)
    EMIT("nvml-sim-state 1\nid %016llx\nserial %llu\n", (unsigned long long)st->id,
         (unsigned long long)st->serial);
    for (unsigned int gpu = 0; gpu < st->gpu_count; gpu++) {
        const struct sim_gpu *g = &st->gpu[gpu];
        EMIT("gpu %u %s %u %u\n", gpu, sim_models[g->model].key, g->mig_current, g->mig_pending);
    }
    for (unsigned int gpu = 0; gpu < st->gpu_count; gpu++) {
        for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
            const struct sim_gi *g = &st->gpu[gpu].gi[gi];
            if (!g->used) {
                continue;
            }
            const struct gi_profile *p = &sim_gi_profiles[g->kind];
            EMIT("gi %u %u %u %u %u %llu\n", gpu, gi, p->id, g->start, p->memory_slices,
                 (unsigned long long)g->serial);
            for (unsigned int ci = 0; ci < SIM_MAX_CI; ci++) {
                const struct sim_ci *c = &g->ci[ci];
                if (c->used) {
                    EMIT("ci %u %u %u %u %u %u %llu\n", gpu, gi, ci, c->profile, c->start,
                         sim_ci_slices(c->profile), (unsigned long long)c->serial);
                }
            }
        }
    }
    EMIT("end\n");
#undef EMIT
    *len = used;
    return text;
}
