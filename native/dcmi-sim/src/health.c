/*
 * DIR/health: what tests and `accelguard sim inject` tell the simulator about a chip's health.
 * Other tools own the file, so a line that cannot be read is skipped, never fatal.
 *
 *   <logic id> health <0|1|2|3|4294967295>   last valid line wins (dcmi_get_device_health)
 *   <logic id> error <code>                  adds a code (decimal or 0x hex), at most 128
 *   <logic id> error clear                   forgets the codes of earlier lines
 *   <logic id> lost <0|1>                    the chip has fallen off the bus
 *   <logic id> temperature_c <0..1000>       dcmi_get_device_temperature, hbm temp
 *   <logic id> power_dw <0..1000000>         dcmi_get_device_power_info, in 0.1 W
 */
#include <stdlib.h>
#include <string.h>

#include "sim.h"

/* An idle Atlas training NPU as MindCluster's NPU exporter sample shows it: 46 C, 73.9 W. */
#define SIM_DEFAULT_TEMPERATURE_C 46
#define SIM_DEFAULT_POWER_DW 739

struct health_scan {
    unsigned int logic_id;
    struct sim_health *out;
};

static void add_error(struct sim_health *h, unsigned int code)
{
    for (unsigned int i = 0; i < h->error_count; i++) {
        if (h->errors[i] == code) {
            return;
        }
    }
    if (h->error_count < DCMI_ERROR_CODE_MAX_COUNT) {
        h->errors[h->error_count++] = code;
    }
}

static int health_line(const char *line, size_t len, void *ctx)
{
    struct health_scan *scan = ctx;
    struct sim_health *h = scan->out;
    char buf[SIM_MAX_LINE];
    char *tok[3];
    unsigned long long logic, value;
    if (sim_tokenize(line, len, buf, sizeof buf, tok, 3) != 3 ||
        sim_parse_u64(tok[0], SIM_MAX_NPUS - 1, &logic) != 0 || logic != scan->logic_id) {
        return 0;
    }
    const char *key = tok[1];
    const char *text = tok[2];
    if (strcmp(key, "health") == 0) {
        if (sim_parse_u64(text, 0xFFFFFFFFULL, &value) == 0 &&
            (value <= 3 || value == DCMI_HEALTH_DEVICE_NOT_EXIST)) {
            h->health = (unsigned int)value;
        }
    } else if (strcmp(key, "error") == 0) {
        if (strcmp(text, "clear") == 0) {
            h->error_count = 0;
        } else if (sim_parse_u64_any(text, 0xFFFFFFFFULL, &value) == 0) {
            add_error(h, (unsigned int)value);
        }
    } else if (strcmp(key, "lost") == 0) {
        if (sim_parse_u64(text, 1, &value) == 0) {
            h->lost = (int)value;
        }
    } else if (strcmp(key, "temperature_c") == 0) {
        if (sim_parse_u64(text, 1000, &value) == 0) {
            h->temperature_c = (int)value;
        }
    } else if (strcmp(key, "power_dw") == 0) {
        if (sim_parse_u64(text, 1000000, &value) == 0) {
            h->power_dw = (int)value;
        }
    }
    return 0;
}

void sim_read_health(unsigned int logic_id, struct sim_health *out)
{
    memset(out, 0, sizeof *out);
    out->temperature_c = SIM_DEFAULT_TEMPERATURE_C;
    out->power_dw = SIM_DEFAULT_POWER_DW;
    char *text;
    size_t len;
    if (sim_read_file(sim.health_path, &text, &len) != 0) {
        return;
    }
    struct health_scan scan = {.logic_id = logic_id, .out = out};
    sim_for_each_line(text, len, health_line, &scan);
    free(text);
}

int sim_npu_lost(unsigned int logic_id)
{
    struct sim_health h;
    sim_read_health(logic_id, &h);
    return h.lost;
}
