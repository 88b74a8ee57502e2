/*
 * The simulated Ascend chips and their vNPU templates (docs/dcmi-sim.md, "Simulated NPUs").
 *
 * Template names and AI Core / AI CPU counts: Huawei's DCMI template tables (driver source,
 * dcmi_virtual_intf.c and dcmi_inner_info_get.c; npu-smi's help lists the same names) and the
 * MindCluster virtualization guide ("vir02, vir04, vir08, vir16" for Atlas training products;
 * 30 or 32 AI Cores). Chip totals: CANN platform configuration (Ascend910A: 32 AI Cores) and
 * HAMi's published Ascend device config (910B2/B3/B4: AI Cores, AI CPUs, memory).
 */
#include <string.h>

#include "sim.h"

/* AI CPUs are a capacity only where the template name states them ("_3c_"): on the 910 the
 * MindCluster guide allows 16 vNPUs on a 32-core chip, which 16 x 1 AI CPU of vir02 would not
 * fit into the chip's 14 if they were counted. */
#define T910(name, aic, cpu) {name, aic, cpu, 0}
#define T910B(name, aic, cpu) {name, aic, cpu, 1}

const struct sim_model sim_models[] = {
    {"910A", "910A", 32, 14, 32768, 16384, 1200, 4,
     {T910("vir02", 2, 1), T910("vir04", 4, 1), T910("vir08", 8, 3), T910("vir16", 16, 7)}},
    {"910ProB", "910ProB", 30, 14, 32768, 16384, 1200, 4,
     {T910("vir02", 2, 1), T910("vir04", 4, 1), T910("vir08", 8, 3), T910("vir16", 16, 7)}},
    {"910B2", "910B2", 24, 6, 65536, 0, 1600, 2,
     {T910B("vir12_3c_32g", 12, 3), T910B("vir06_1c_16g", 6, 1)}},
    {"910B3", "910B3", 20, 7, 65536, 0, 1600, 2,
     {T910B("vir10_3c_32g", 10, 3), T910B("vir05_1c_16g", 5, 1)}},
    {"910B4", "910B4", 20, 7, 32768, 0, 1600, 4,
     {T910B("vir10_3c_16g", 10, 3), T910B("vir10_4c_16g_m", 10, 4),
      T910B("vir10_3c_16g_nm", 10, 3), T910B("vir05_1c_8g", 5, 1)}},
};

const unsigned int sim_model_count = sizeof sim_models / sizeof sim_models[0];

int sim_model_by_key(const char *key)
{
    for (unsigned int i = 0; i < sim_model_count; i++) {
        if (strcmp(sim_models[i].key, key) == 0) {
            return (int)i;
        }
    }
    return -1;
}

int sim_template_by_name(const struct sim_model *model, const char *name)
{
    for (unsigned int i = 0; i < model->template_count; i++) {
        if (strcmp(model->templates[i].name, name) == 0) {
            return (int)i;
        }
    }
    return -1;
}

unsigned long long sim_template_memory_mb(const struct sim_model *model,
                                          const struct sim_template *t)
{
    return model->hbm_mb * t->aicore / model->aicore;
}
