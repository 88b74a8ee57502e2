/*
 * DIR/topology (input, written by `accelguard sim init` or from a DCMI_SIM_TOPOLOGY preset) and
 * DIR/state (ours), both documented in docs/dcmi-sim.md.
 *
 * topology, one NPU chip per line, logic ids 0..n-1 without gaps:
 *   npu <logic id> <model> [card=<card id>] [phy=<physical id>]
 *
 * state, written whole and replaced atomically:
 *   dcmi-sim-state 1
 *   id <16 hex digits>
 *   serial <last creation serial>
 *   npu <logic id> <model> <card id> <physical id>          (in logic id order)
 *   vnpu <logic id> <vdev id> <template> <unit mask 0x...> <serial>
 *   end
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
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

/* ---- usage -------------------------------------------------------------------------------- */

struct sim_usage sim_npu_usage(const struct sim_npu *npu)
{
    struct sim_usage usage = {0};
    const struct sim_model *model = &sim_models[npu->model];
    for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
        const struct sim_vnpu *v = &npu->vnpu[k];
        if (!v->used) {
            continue;
        }
        const struct sim_template *t = &model->templates[v->template_index];
        usage.vnpus++;
        usage.aicore += t->aicore;
        usage.aicpu += t->aicpu_counted ? t->aicpu : 0;
        usage.memory_mb += sim_template_memory_mb(model, t);
        usage.units |= v->units;
    }
    return usage;
}

/* ---- topology ----------------------------------------------------------------------------- */

struct topology_scan {
    struct sim_topology *out;
    unsigned int line_number;
    uint32_t seen_logic;
    uint64_t seen_card;
    uint64_t seen_phy;
    int explicit_ids;
    int failed;
    char *why;
    size_t why_len;
};

static int topology_fail(struct topology_scan *scan, const char *what)
{
    explain(scan->why, scan->why_len, "line %u: %s", scan->line_number, what);
    scan->failed = 1;
    return 1;
}

/* "card=<n>" / "phy=<n>": the value, or -1 when `token` is not that option or malformed. */
static long long option_value(const char *token, const char *name, unsigned long long max)
{
    size_t n = strlen(name);
    unsigned long long value;
    if (strncmp(token, name, n) != 0 || token[n] != '=' ||
        sim_parse_u64(token + n + 1, max, &value) != 0) {
        return -1;
    }
    return (long long)value;
}

static int topology_line(const char *line, size_t len, void *ctx)
{
    struct topology_scan *scan = ctx;
    scan->line_number++;
    char buf[SIM_MAX_LINE];
    char *tok[5];
    int count = sim_tokenize(line, len, buf, sizeof buf, tok, 5);
    if (count == 0) {
        return 0;
    }
    if (count < 3 || strcmp(tok[0], "npu") != 0) {
        return topology_fail(scan, "expected 'npu <logic id> <model> [card=<n>] [phy=<n>]'");
    }
    unsigned long long logic;
    if (sim_parse_u64(tok[1], SIM_MAX_NPUS - 1, &logic) != 0) {
        return topology_fail(scan, "logic id must be 0..15");
    }
    int model = sim_model_by_key(tok[2]);
    if (model < 0) {
        return topology_fail(scan, "unknown model (expected 910A, 910ProB, 910B2, 910B3, 910B4)");
    }
    long long card = -1;
    long long phy = -1;
    for (int i = 3; i < count; i++) {
        long long value = option_value(tok[i], "card", SIM_MAX_CARD_ID);
        if (value >= 0 && card < 0) {
            card = value;
            continue;
        }
        value = option_value(tok[i], "phy", SIM_MAX_PHY_ID);
        if (value >= 0 && phy < 0) {
            phy = value;
            continue;
        }
        return topology_fail(scan, "expected card=<0..63> or phy=<0..63>, each at most once");
    }
    if (scan->seen_logic & (1U << logic)) {
        return topology_fail(scan, "logic id listed twice");
    }
    scan->seen_logic |= 1U << logic;
    scan->out->model[logic] = model;
    /* -1 = default to the logic id, filled in once all lines are read. */
    scan->out->card_id[logic] = card < 0 ? UINT_MAX : (unsigned int)card;
    scan->out->phy_id[logic] = phy < 0 ? UINT_MAX : (unsigned int)phy;
    return 0;
}

int sim_parse_topology(const char *text, size_t len, struct sim_topology *out, char *why,
                       size_t why_len)
{
    memset(out, 0, sizeof *out);
    struct topology_scan scan = {.out = out, .why = why, .why_len = why_len};
    sim_for_each_line(text, len, topology_line, &scan);
    if (scan.failed) {
        return -1;
    }
    unsigned int count = 0;
    while (count < SIM_MAX_NPUS && (scan.seen_logic & (1U << count))) {
        count++;
    }
    if (count == 0 || scan.seen_logic != (1U << count) - 1U) {
        explain(why, why_len, "logic ids must be 0..n-1 without gaps, at least one NPU");
        return -1;
    }
    uint64_t cards = 0;
    uint64_t phys = 0;
    for (unsigned int i = 0; i < count; i++) {
        if (out->card_id[i] == UINT_MAX) {
            out->card_id[i] = i;
        }
        if (out->phy_id[i] == UINT_MAX) {
            out->phy_id[i] = i;
        }
        if ((cards >> out->card_id[i]) & 1U) {
            explain(why, why_len, "card id %u is used by two NPUs", out->card_id[i]);
            return -1;
        }
        if ((phys >> out->phy_id[i]) & 1U) {
            explain(why, why_len, "physical id %u is used by two NPUs", out->phy_id[i]);
            return -1;
        }
        cards |= 1ULL << out->card_id[i];
        phys |= 1ULL << out->phy_id[i];
    }
    out->npu_count = count;
    return 0;
}

/* ---- presets ------------------------------------------------------------------------------ */

static int preset_model(const char *name)
{
    /* The node shapes `accelguard sim init --topology` names, then the models themselves. */
    if (strcasecmp(name, "ascend910") == 0) {
        return sim_model_by_key("910A");
    }
    if (strcasecmp(name, "ascend910b") == 0) {
        return sim_model_by_key("910B3");
    }
    for (unsigned int i = 0; i < sim_model_count; i++) {
        if (strcasecmp(name, sim_models[i].key) == 0) {
            return (int)i;
        }
    }
    return -1;
}

char *sim_topology_from_preset(const char *preset, char *why, size_t why_len)
{
    size_t capacity = 128 + SIM_MAX_NPUS * 32;
    char *text = malloc(capacity);
    if (text == NULL) {
        explain(why, why_len, "out of memory");
        return NULL;
    }
    size_t used = (size_t)snprintf(text, capacity, "# written by dcmi-sim from DCMI_SIM_TOPOLOGY=%.64s\n",
                                   preset);
    if (used >= capacity) {
        used = capacity - 1;
    }
    unsigned int npus = 0;
    const char *item = preset;
    for (;;) {
        const char *end = strchr(item, ',');
        size_t item_len = end == NULL ? strlen(item) : (size_t)(end - item);
        char name[32];
        const char *x = NULL;
        for (size_t i = item_len; i > 0; i--) {
            if (item[i - 1] == 'x' || item[i - 1] == 'X') {
                x = item + i - 1;
                break;
            }
        }
        size_t name_len = x == NULL ? 0 : (size_t)(x - item);
        char number[8];
        size_t number_len = x == NULL ? 0 : item_len - name_len - 1;
        unsigned long long n = 0;
        int model = -1;
        if (x != NULL && name_len > 0 && name_len < sizeof name && number_len > 0 &&
            number_len < sizeof number) {
            memcpy(name, item, name_len);
            name[name_len] = '\0';
            memcpy(number, x + 1, number_len);
            number[number_len] = '\0';
            model = preset_model(name);
            if (sim_parse_u64(number, SIM_MAX_NPUS, &n) != 0) {
                n = 0;
            }
        }
        if (model < 0 || n == 0 || npus + n > SIM_MAX_NPUS) {
            explain(why, why_len,
                    "DCMI_SIM_TOPOLOGY: expected items like ascend910x8, ascend910bx8 or "
                    "910B4x2, comma-separated, at most %u NPUs in all",
                    SIM_MAX_NPUS);
            free(text);
            return NULL;
        }
        for (unsigned long long i = 0; i < n; i++) {
            int wrote = snprintf(text + used, capacity - used, "npu %u %s\n", npus++,
                                 sim_models[model].key);
            if (wrote < 0 || (size_t)wrote >= capacity - used) {
                explain(why, why_len, "DCMI_SIM_TOPOLOGY: too long");
                free(text);
                return NULL;
            }
            used += (size_t)wrote;
        }
        if (end == NULL) {
            break;
        }
        item = end + 1;
    }
    return text;
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
    out->npu_count = topology->npu_count;
    for (unsigned int i = 0; i < topology->npu_count; i++) {
        out->npu[i].model = topology->model[i];
        out->npu[i].card_id = topology->card_id[i];
        out->npu[i].phy_id = topology->phy_id[i];
    }
}

int sim_state_matches_topology(const struct sim_state *state, const struct sim_topology *t)
{
    if (state->npu_count != t->npu_count) {
        return 0;
    }
    for (unsigned int i = 0; i < t->npu_count; i++) {
        const struct sim_npu *n = &state->npu[i];
        if (n->model != t->model[i] || n->card_id != t->card_id[i] || n->phy_id != t->phy_id[i]) {
            return 0;
        }
    }
    return 1;
}

struct state_scan {
    struct sim_state *out;
    unsigned int line_number;
    int phase; /* 0: header, 1: id, 2: serial, 3: records, 4: after "end" */
    uint64_t cards;
    uint64_t phys;
    int failed;
    char *why;
    size_t why_len;
};

static int state_fail(struct state_scan *scan, const char *what)
{
    explain(scan->why, scan->why_len, "line %u: %s", scan->line_number, what);
    scan->failed = 1;
    return 1;
}

static int parse_hex64_exact(const char *s, uint64_t *out)
{
    if (strlen(s) != 16) {
        return -1;
    }
    uint64_t value = 0;
    for (const char *p = s; *p != '\0'; p++) {
        if (!isxdigit((unsigned char)*p) || isupper((unsigned char)*p)) {
            return -1;
        }
        value = (value << 4) | (uint64_t)(*p <= '9' ? *p - '0' : *p - 'a' + 10);
    }
    *out = value;
    return 0;
}

static int state_npu_line(struct state_scan *scan, char **tok)
{
    struct sim_state *st = scan->out;
    unsigned long long logic, card, phy;
    int model = sim_model_by_key(tok[2]);
    if (sim_parse_u64(tok[1], SIM_MAX_NPUS - 1, &logic) != 0 || logic != st->npu_count ||
        model < 0 || sim_parse_u64(tok[3], SIM_MAX_CARD_ID, &card) != 0 ||
        sim_parse_u64(tok[4], SIM_MAX_PHY_ID, &phy) != 0) {
        return state_fail(scan, "malformed npu record (NPUs must be listed in logic id order)");
    }
    if (((scan->cards >> card) & 1U) || ((scan->phys >> phy) & 1U)) {
        return state_fail(scan, "npu record repeats a card or physical id");
    }
    scan->cards |= 1ULL << card;
    scan->phys |= 1ULL << phy;
    struct sim_npu *n = &st->npu[st->npu_count++];
    n->model = model;
    n->card_id = (unsigned int)card;
    n->phy_id = (unsigned int)phy;
    return 0;
}

static int state_vnpu_line(struct state_scan *scan, char **tok)
{
    struct sim_state *st = scan->out;
    unsigned long long logic, vdev_id, units, serial;
    if (sim_parse_u64(tok[1], SIM_MAX_NPUS - 1, &logic) != 0 || logic >= st->npu_count ||
        sim_parse_u64(tok[2], 0xFFFFFFFFULL, &vdev_id) != 0 ||
        strncmp(tok[4], "0x", 2) != 0 || sim_parse_u64_any(tok[4], ~0ULL, &units) != 0 ||
        sim_parse_u64(tok[5], ~0ULL, &serial) != 0) {
        return state_fail(scan, "malformed vnpu record");
    }
    struct sim_npu *n = &st->npu[logic];
    const struct sim_model *model = &sim_models[n->model];
    unsigned long long first = SIM_VDEV_ID_BASE + (unsigned long long)n->phy_id * SIM_VNPUS_PER_NPU;
    if (vdev_id < first || vdev_id >= first + SIM_VNPUS_PER_NPU) {
        return state_fail(scan, "vnpu id outside its chip's range 100 + 16 * phy_id + 0..15");
    }
    struct sim_vnpu *v = &n->vnpu[vdev_id - first];
    int t = sim_template_by_name(model, tok[3]);
    if (v->used || t < 0) {
        return state_fail(scan, "vnpu record duplicated or with a template its chip lacks");
    }
    const struct sim_template *tpl = &model->templates[t];
    uint64_t all_units = model->aicore >= 64 ? ~0ULL : (1ULL << model->aicore) - 1ULL;
    struct sim_usage usage = sim_npu_usage(n);
    if ((units & ~all_units) != 0 || (unsigned int)__builtin_popcountll(units) != tpl->aicore ||
        (units & usage.units) != 0) {
        return state_fail(scan, "vnpu memory units outside the chip, of the wrong count, or "
                                "shared with another vnpu");
    }
    if (usage.aicore + tpl->aicore > model->aicore ||
        usage.aicpu + (tpl->aicpu_counted ? tpl->aicpu : 0) > model->aicpu ||
        usage.memory_mb + sim_template_memory_mb(model, tpl) > model->hbm_mb) {
        return state_fail(scan, "vnpus exceed their chip's resources");
    }
    if (serial == 0 || serial > st->serial) {
        return state_fail(scan, "vnpu serial is 0 or beyond the state's serial");
    }
    v->used = 1;
    v->template_index = (unsigned int)t;
    v->units = units;
    v->serial = serial;
    return 0;
}

static int state_line(const char *line, size_t len, void *ctx)
{
    struct state_scan *scan = ctx;
    struct sim_state *st = scan->out;
    scan->line_number++;
    char buf[SIM_MAX_LINE];
    char *tok[6];
    int count = sim_tokenize(line, len, buf, sizeof buf, tok, 6);
    if (count <= 0) {
        return state_fail(scan, "empty or unreadable line");
    }
    unsigned long long value;
    switch (scan->phase) {
    case 0:
        if (count != 2 || strcmp(tok[0], "dcmi-sim-state") != 0 || strcmp(tok[1], "1") != 0) {
            return state_fail(scan, "not a dcmi-sim state file (version 1)");
        }
        scan->phase = 1;
        return 0;
    case 1:
        if (count != 2 || strcmp(tok[0], "id") != 0 || parse_hex64_exact(tok[1], &st->id) != 0 ||
            st->id == 0) {
            return state_fail(scan, "expected 'id <16 hex digits>'");
        }
        scan->phase = 2;
        return 0;
    case 2:
        if (count != 2 || strcmp(tok[0], "serial") != 0 ||
            sim_parse_u64(tok[1], ~0ULL - 1, &value) != 0) {
            return state_fail(scan, "expected 'serial <n>'");
        }
        st->serial = value;
        scan->phase = 3;
        return 0;
    case 3:
        break;
    default:
        return state_fail(scan, "data after 'end'");
    }
    if (count == 1 && strcmp(tok[0], "end") == 0) {
        scan->phase = 4;
        return 0;
    }
    if (count == 5 && strcmp(tok[0], "npu") == 0) {
        return state_npu_line(scan, tok);
    }
    if (count == 6 && strcmp(tok[0], "vnpu") == 0) {
        return state_vnpu_line(scan, tok);
    }
    return state_fail(scan, "unknown record");
}

int sim_parse_state(const char *text, size_t len, struct sim_state *out, char *why,
                    size_t why_len)
{
    memset(out, 0, sizeof *out);
    struct state_scan scan = {.out = out, .why = why, .why_len = why_len};
    sim_for_each_line(text, len, state_line, &scan);
    if (scan.failed) {
        return -1;
    }
    /* Complete means "end" was the last line and it was newline-terminated. */
    if (scan.phase != 4 || len == 0 || text[len - 1] != '\n') {
        explain(why, why_len, "truncated (no final 'end' line)");
        return -1;
    }
    if (out->npu_count == 0) {
        explain(why, why_len, "no npu records");
        return -1;
    }
    return 0;
}

char *sim_format_state(const struct sim_state *st, size_t *len)
{
    size_t capacity = 256 + (size_t)SIM_MAX_NPUS * (64 + SIM_VNPUS_PER_NPU * 96);
    char *text = malloc(capacity);
    if (text == NULL) {
        return NULL;
    }
    size_t used = 0;
#define EMIT(...)                                                      \
    do {                                                               \
        int n_ = snprintf(text + used, capacity - used, __VA_ARGS__);  \
        if (n_ < 0 || (size_t)n_ >= capacity - used) {                 \
            free(text);                                                \
            return NULL;                                               \
        }                                                              \
        used += (size_t)n_;                                            \
    } while (0)
    EMIT("dcmi-sim-state 1\nid %016llx\nserial %llu\n", (unsigned long long)st->id,
         (unsigned long long)st->serial);
    for (unsigned int i = 0; i < st->npu_count; i++) {
        const struct sim_npu *n = &st->npu[i];
        EMIT("npu %u %s %u %u\n", i, sim_models[n->model].key, n->card_id, n->phy_id);
    }
    for (unsigned int i = 0; i < st->npu_count; i++) {
        const struct sim_npu *n = &st->npu[i];
        for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
            const struct sim_vnpu *v = &n->vnpu[k];
            if (v->used) {
                EMIT("vnpu %u %u %s 0x%llx %llu\n", i,
                     SIM_VDEV_ID_BASE + n->phy_id * SIM_VNPUS_PER_NPU + k,
                     sim_models[n->model].templates[v->template_index].name,
                     (unsigned long long)v->units, (unsigned long long)v->serial);
            }
        }
    }
    EMIT("end\n");
#undef EMIT
    *len = used;
    return text;
}
