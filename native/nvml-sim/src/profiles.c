/*
 * MIG geometry of the simulated models. Sources (see docs/nvml-sim.md for the full table):
 * profile indices and IDs from nvml.h's NVML_GPU_INSTANCE_PROFILE_* and `nvidia-smi mig -lgip`;
 * placements, instance counts and engine counts from the NVIDIA MIG user guide ("Supported MIG
 * profiles"); memory sizes and SM counts from published `nvidia-smi mig -lgip` listings, some
 * estimated (marked in the docs).
 */
#include <string.h>

#include "sim.h"

/* Starts are memory-slice indices. 1g+me shares the 1g placements; 1g.2x-mem takes two slices. */
const struct gi_profile sim_gi_profiles[GI_KIND_COUNT] = {
    [GI_1G] = {.index = 0, .id = 19, .compute_slices = 1, .memory_slices = 1,
               .max_instances = 7, .starts_mask = 0x7F},
    [GI_2G] = {.index = 1, .id = 14, .compute_slices = 2, .memory_slices = 2,
               .max_instances = 3, .starts_mask = 0x15},
    [GI_3G] = {.index = 2, .id = 9, .compute_slices = 3, .memory_slices = 4,
               .max_instances = 2, .starts_mask = 0x11},
    [GI_4G] = {.index = 3, .id = 5, .compute_slices = 4, .memory_slices = 4,
               .max_instances = 1, .starts_mask = 0x01},
    [GI_7G] = {.index = 4, .id = 0, .compute_slices = 7, .memory_slices = 8,
               .max_instances = 1, .starts_mask = 0x01},
    [GI_1G_ME] = {.index = 7, .id = 20, .compute_slices = 1, .memory_slices = 1,
                  .max_instances = 1, .starts_mask = 0x7F},
    [GI_1G_2X] = {.index = 9, .id = 15, .compute_slices = 1, .memory_slices = 2,
                  .max_instances = 4, .starts_mask = 0x55},
};

const struct sim_model_info sim_models[MODEL_COUNT] = {
    [MODEL_H100_80GB] =
        {
            .key = "H100-80GB",
            .name = "NVIDIA H100 80GB HBM3",
            .memory_mib = 81559,
            .pci_device_id = 0x233010DE,
            .pci_subsystem_id = 0x16C110DE,
            .architecture = NVML_DEVICE_ARCH_HOPPER,
            .profiles =
                {
                    [GI_1G] = {"1g.10gb", 9984, 16, 1, 1, 0, 1, 0},
                    [GI_1G_ME] = {"1g.10gb+me", 9984, 16, 1, 1, 0, 1, 1},
                    [GI_1G_2X] = {"1g.20gb", 20096, 26, 1, 1, 0, 1, 0},
                    [GI_2G] = {"2g.20gb", 20096, 32, 2, 2, 0, 2, 0},
                    [GI_3G] = {"3g.40gb", 40448, 60, 3, 3, 0, 3, 0},
                    [GI_4G] = {"4g.40gb", 40448, 64, 4, 4, 0, 4, 0},
                    [GI_7G] = {"7g.80gb", 80896, 132, 8, 7, 0, 7, 1},
                },
        },
    [MODEL_A100_40GB] =
        {
            .key = "A100-40GB",
            .name = "NVIDIA A100-SXM4-40GB",
            .memory_mib = 40960,
            .pci_device_id = 0x20B010DE,
            .pci_subsystem_id = 0x134F10DE,
            .architecture = NVML_DEVICE_ARCH_AMPERE,
            .profiles =
                {
                    [GI_1G] = {"1g.5gb", 4864, 14, 1, 0, 0, 0, 0},
                    [GI_1G_ME] = {"1g.5gb+me", 4864, 14, 1, 1, 0, 1, 1},
                    [GI_1G_2X] = {"1g.10gb", 9856, 14, 1, 1, 0, 0, 0},
                    [GI_2G] = {"2g.10gb", 9856, 28, 2, 1, 0, 0, 0},
                    [GI_3G] = {"3g.20gb", 19968, 42, 3, 2, 0, 0, 0},
                    [GI_4G] = {"4g.20gb", 19968, 56, 4, 2, 0, 0, 0},
                    [GI_7G] = {"7g.40gb", 40192, 98, 7, 5, 0, 1, 1},
                },
        },
    [MODEL_A100_80GB] =
        {
            .key = "A100-80GB",
            .name = "NVIDIA A100-SXM4-80GB",
            .memory_mib = 81920,
            .pci_device_id = 0x20B210DE,
            .pci_subsystem_id = 0x147F10DE,
            .architecture = NVML_DEVICE_ARCH_AMPERE,
            .profiles =
                {
                    [GI_1G] = {"1g.10gb", 9728, 14, 1, 0, 0, 0, 0},
                    [GI_1G_ME] = {"1g.10gb+me", 9728, 14, 1, 1, 0, 1, 1},
                    [GI_1G_2X] = {"1g.20gb", 19968, 14, 1, 1, 0, 0, 0},
                    [GI_2G] = {"2g.20gb", 19968, 28, 2, 1, 0, 0, 0},
                    [GI_3G] = {"3g.40gb", 40192, 42, 3, 2, 0, 0, 0},
                    [GI_4G] = {"4g.40gb", 40192, 56, 4, 2, 0, 0, 0},
                    [GI_7G] = {"7g.80gb", 80896, 98, 7, 5, 0, 1, 1},
                },
        },
};

int sim_model_by_key(const char *key)
{
    for (int model = 0; model < MODEL_COUNT; model++) {
        if (strcmp(sim_models[model].key, key) == 0) {
            return model;
        }
    }
    return -1;
}

int sim_gi_kind_by_index(unsigned int profile_index)
{
    for (int kind = 0; kind < GI_KIND_COUNT; kind++) {
        if (sim_gi_profiles[kind].index == profile_index) {
            return kind;
        }
    }
    return -1;
}

int sim_gi_kind_by_id(unsigned int profile_id)
{
    for (int kind = 0; kind < GI_KIND_COUNT; kind++) {
        if (sim_gi_profiles[kind].id == profile_id) {
            return kind;
        }
    }
    return -1;
}

/* GI ids follow the placement as the driver assigns them on A100/H100: one id per
 * (profile size, start), so overlapping placements may share an id but can never coexist. */
unsigned int sim_gi_id_for(int kind, unsigned int start)
{
    switch (kind) {
    case GI_7G:
        return 0;
    case GI_4G:
        return 1;
    case GI_3G:
        return start == 0 ? 1U : 2U;
    case GI_2G:
    case GI_1G_2X:
        return 3U + start / 2U;
    default: /* GI_1G, GI_1G_ME */
        return 7U + start;
    }
}

static const unsigned int ci_slices[SIM_CI_PROFILE_KINDS] = {1, 2, 3, 4, 7};

unsigned int sim_ci_slices(unsigned int ci_profile)
{
    return ci_profile < SIM_CI_PROFILE_KINDS ? ci_slices[ci_profile] : 0U;
}

/* Which compute-instance profiles a GPU instance offers (`nvidia-smi mig -lcip`): those that
 * fit its compute slices, except that a 4-slice GI has no 3-slice CI profile. */
int sim_ci_allowed(unsigned int gi_slices, unsigned int ci_profile)
{
    unsigned int slices = sim_ci_slices(ci_profile);
    if (slices == 0 || slices > gi_slices) {
        return 0;
    }
    return !(gi_slices == 4 && slices == 3);
}

/* Compute-instance placements inside a GI: aligned to the CI size (a 3-slice CI to 4, which
 * leaves {0, 4} in a 7-slice GI) and wholly inside the GI. */
unsigned int sim_ci_starts_mask(unsigned int gi_slices, unsigned int ci_profile)
{
    if (!sim_ci_allowed(gi_slices, ci_profile)) {
        return 0;
    }
    unsigned int slices = sim_ci_slices(ci_profile);
    unsigned int align = slices == 3 ? 4U : slices;
    unsigned int mask = 0;
    for (unsigned int start = 0; start + slices <= gi_slices; start += align) {
        mask |= 1U << start;
    }
    return mask;
}
