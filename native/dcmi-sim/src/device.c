/*
 * Card and chip enumeration, the id mappings (card/device, logic id, physical id), chip and
 * die identity, health and error codes, temperature, power, memory and HBM.
 *
 * Each simulated card holds one NPU chip, device id 0, with no MCU (dcmi_get_device_id_in_card:
 * mcu_id and cpu_id -1), as on Atlas 800 / 800T A2 servers where every NPU is a card of its own.
 */
#include <stdio.h>
#include <string.h>

#include "sim.h"

static const struct sim_model *model_of(const struct sim_state *state, unsigned int logic)
{
    return &sim_models[state->npu[logic].model];
}

static int is_910b(const struct sim_model *model)
{
    return strncmp(model->key, "910B", 4) == 0;
}

/* ---- enumeration -------------------------------------------------------------------------- */

static int card_list(int *card_num, int *card_list, int list_len)
{
    if (card_num == NULL || card_list == NULL || list_len <= 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    int result = sim_load_state(&state);
    /* The DCMI source answers an uninitialised card list with an internal error. */
    if (result == DCMI_ERR_CODE_NOT_REDAY) {
        return DCMI_ERR_CODE_INNER_ERR;
    }
    SIM_CHECK(result);
    if ((unsigned int)list_len < state.npu_count) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    for (unsigned int i = 0; i < state.npu_count; i++) {
        card_list[i] = (int)state.npu[i].card_id;
    }
    *card_num = (int)state.npu_count;
    return DCMI_OK;
}

SIM_API(dcmi_get_card_list, (int *card_num, int *card_list_out, int list_len),
        (card_num, card_list_out, list_len))
{
    return card_list(card_num, card_list_out, list_len);
}

/* The older name of dcmi_get_card_list ("will be deleted from later versions"). */
SIM_API(dcmi_get_card_num_list, (int *card_num, int *card_list_out, int list_len),
        (card_num, card_list_out, list_len))
{
    return card_list(card_num, card_list_out, list_len);
}

static int find_card(const struct sim_state *state, int card_id)
{
    for (unsigned int i = 0; i < state->npu_count; i++) {
        if (card_id >= 0 && state->npu[i].card_id == (unsigned int)card_id) {
            return (int)i;
        }
    }
    return -1;
}

SIM_API(dcmi_get_device_num_in_card, (int card_id, int *device_num), (card_id, device_num))
{
    if (device_num == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    int result = sim_load_state(&state);
    /* Before dcmi_init the DCMI source reports no chips rather than an error. */
    if (result == DCMI_ERR_CODE_NOT_REDAY) {
        *device_num = 0;
        return DCMI_OK;
    }
    SIM_CHECK(result);
    if (find_card(&state, card_id) < 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    *device_num = 1;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_id_in_card, (int card_id, int *device_id_max, int *mcu_id, int *cpu_id),
        (card_id, device_id_max, mcu_id, cpu_id))
{
    if (device_id_max == NULL || mcu_id == NULL || cpu_id == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    *mcu_id = -1;
    *cpu_id = -1;
    struct sim_state state;
    int result = sim_load_state(&state);
    if (result == DCMI_ERR_CODE_NOT_REDAY) {
        *device_id_max = 0;
        return DCMI_OK;
    }
    SIM_CHECK(result);
    if (find_card(&state, card_id) < 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    *device_id_max = 1;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_type, (int card_id, int device_id, enum dcmi_unit_type *device_type),
        (card_id, device_id, device_type))
{
    if (device_type == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_state(&state));
    SIM_CHECK(sim_resolve(&state, card_id, device_id, &logic));
    *device_type = NPU_TYPE;
    return DCMI_OK;
}

/* ---- id mappings -------------------------------------------------------------------------- */

SIM_API(dcmi_get_device_logic_id, (int *device_logic_id, int card_id, int device_id),
        (device_logic_id, card_id, device_id))
{
    if (device_logic_id == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_state(&state));
    SIM_CHECK(sim_resolve(&state, card_id, device_id, &logic));
    *device_logic_id = (int)logic;
    return DCMI_OK;
}

static int logic_by_phy(const struct sim_state *state, unsigned int phy_id)
{
    for (unsigned int i = 0; i < state->npu_count; i++) {
        if (state->npu[i].phy_id == phy_id) {
            return (int)i;
        }
    }
    return -1;
}

SIM_API(dcmi_get_device_phyid_from_logicid, (unsigned int logicid, unsigned int *phyid),
        (logicid, phyid))
{
    if (phyid == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    SIM_CHECK(sim_load_state(&state));
    if (logicid >= state.npu_count) {
        return DCMI_ERR_CODE_INVALID_DEVICE_ID;
    }
    *phyid = state.npu[logicid].phy_id;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_logicid_from_phyid, (unsigned int phyid, unsigned int *logicid),
        (phyid, logicid))
{
    if (logicid == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    SIM_CHECK(sim_load_state(&state));
    int logic = logic_by_phy(&state, phyid);
    if (logic < 0) {
        return DCMI_ERR_CODE_INVALID_DEVICE_ID;
    }
    *logicid = (unsigned int)logic;
    return DCMI_OK;
}

SIM_API(dcmi_get_card_id_device_id_from_logicid,
        (int *card_id, int *device_id, unsigned int device_logic_id),
        (card_id, device_id, device_logic_id))
{
    if (card_id == NULL || device_id == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    SIM_CHECK(sim_load_state(&state));
    if (device_logic_id >= state.npu_count) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    *card_id = (int)state.npu[device_logic_id].card_id;
    *device_id = 0;
    return DCMI_OK;
}

SIM_API(dcmi_get_card_id_device_id_from_phyid,
        (int *card_id, int *device_id, unsigned int device_phy_id),
        (card_id, device_id, device_phy_id))
{
    if (card_id == NULL || device_id == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    SIM_CHECK(sim_load_state(&state));
    int logic = logic_by_phy(&state, device_phy_id);
    if (logic < 0) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    *card_id = (int)state.npu[logic].card_id;
    *device_id = 0;
    return DCMI_OK;
}

/* ---- chip identity ------------------------------------------------------------------------ */

static void copy_name(unsigned char *field, const char *value)
{
    memset(field, 0, MAX_CHIP_NAME_LEN);
    snprintf((char *)field, MAX_CHIP_NAME_LEN, "%s", value);
}

static void fill_chip_info(const struct sim_model *model, struct dcmi_chip_info *info)
{
    copy_name(info->chip_type, "Ascend");
    copy_name(info->chip_name, model->key);
    copy_name(info->chip_ver, "V1");
    info->aicore_cnt = model->aicore;
}

SIM_API(dcmi_get_device_chip_info, (int card_id, int device_id, struct dcmi_chip_info *chip_info),
        (card_id, device_id, chip_info))
{
    if (chip_info == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    fill_chip_info(model_of(&state, logic), chip_info);
    return DCMI_OK;
}

SIM_API(dcmi_get_device_chip_info_v2,
        (int card_id, int device_id, struct dcmi_chip_info_v2 *chip_info),
        (card_id, device_id, chip_info))
{
    if (chip_info == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_model *model = model_of(&state, logic);
    struct dcmi_chip_info v1;
    fill_chip_info(model, &v1);
    memcpy(chip_info->chip_type, v1.chip_type, MAX_CHIP_NAME_LEN);
    memcpy(chip_info->chip_name, v1.chip_name, MAX_CHIP_NAME_LEN);
    memcpy(chip_info->chip_ver, v1.chip_ver, MAX_CHIP_NAME_LEN);
    chip_info->aicore_cnt = v1.aicore_cnt;
    copy_name(chip_info->npu_name, model->npu_name);
    return DCMI_OK;
}

/* splitmix64: stable, well-mixed words for the die ids. */
static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

SIM_API(dcmi_get_device_die_v2,
        (int card_id, int device_id, enum dcmi_die_type input_type, struct dcmi_die_id *die_id),
        (card_id, device_id, input_type, die_id))
{
    if (die_id == NULL || (input_type != NDIE && input_type != VDIE)) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_model *model = model_of(&state, logic);
    /* MindCluster: "NDIE NDie ID, only Ascend910 has". */
    if (input_type == NDIE && is_910b(model)) {
        return DCMI_ERR_CODE_NOT_SUPPORT;
    }
    /* A fixed function of the chip's physical id, model and die type: the same chip keeps its
     * die id across processes and directories, as a real chip does. */
    uint64_t seed = 0x64636D692D73696DULL ^ ((uint64_t)state.npu[logic].phy_id << 8) ^
                    (uint64_t)input_type ^ ((uint64_t)state.npu[logic].model << 16);
    for (unsigned int i = 0; i < DIE_ID_COUNT; i++) {
        die_id->soc_die[i] = (unsigned int)mix(seed + i);
    }
    return DCMI_OK;
}

/* ---- health ------------------------------------------------------------------------------- */

SIM_API(dcmi_get_device_health, (int card_id, int device_id, unsigned int *health),
        (card_id, device_id, health))
{
    if (health == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_state(&state));
    SIM_CHECK(sim_resolve(&state, card_id, device_id, &logic));
    struct sim_health h;
    sim_read_health(logic, &h);
    /* The reference: "0xFFFFFFFF: The device does not exist." */
    *health = h.lost ? DCMI_HEALTH_DEVICE_NOT_EXIST : h.health;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_errorcode_v2,
        (int card_id, int device_id, int *error_count, unsigned int *error_code_list,
         unsigned int list_len),
        (card_id, device_id, error_count, error_code_list, list_len))
{
    if (error_count == NULL || error_code_list == NULL || list_len == 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    struct sim_health h;
    sim_read_health(logic, &h);
    /* The DCMI source refuses a list that cannot hold every code. */
    if (h.error_count > list_len) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    memcpy(error_code_list, h.errors, h.error_count * sizeof h.errors[0]);
    *error_count = (int)h.error_count;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_errorcode_string,
        (int card_id, int device_id, unsigned int error_code, unsigned char *error_info,
         int buf_size),
        (card_id, device_id, error_code, error_info, buf_size))
{
    if (error_info == NULL || buf_size < DCMI_MIN_ERR_INFO_LEN) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    snprintf((char *)error_info, (size_t)buf_size, "dcmi-sim injected fault 0x%08X", error_code);
    return DCMI_OK;
}

SIM_API(dcmi_get_device_temperature, (int card_id, int device_id, int *temperature),
        (card_id, device_id, temperature))
{
    if (temperature == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    struct sim_health h;
    sim_read_health(logic, &h);
    *temperature = h.temperature_c;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_power_info, (int card_id, int device_id, int *power),
        (card_id, device_id, power))
{
    if (power == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    struct sim_health h;
    sim_read_health(logic, &h);
    *power = h.power_dw;
    return DCMI_OK;
}

/* ---- memory ------------------------------------------------------------------------------- */

/* DDR of the chip's control CPUs. The DCMI source answers the memory-info calls on 910B with
 * DCMI_ERR_CODE_NOT_SUPPORT: there the HBM query is the one that reports device memory. */
#define SIM_DDR_FREQ_MHZ 3200
#define SIM_HUGEPAGE_KB 2048

SIM_API(dcmi_get_memory_info,
        (int card_id, int device_id, struct dcmi_memory_info_stru *device_memory_info),
        (card_id, device_id, device_memory_info))
{
    if (device_memory_info == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_model *model = model_of(&state, logic);
    if (model->ddr_mb == 0) {
        return DCMI_ERR_CODE_NOT_SUPPORT;
    }
    device_memory_info->memory_size = model->ddr_mb;
    device_memory_info->freq = SIM_DDR_FREQ_MHZ;
    device_memory_info->utiliza = 0;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_memory_info_v3,
        (int card_id, int device_id, struct dcmi_get_memory_info_stru *memory_info),
        (card_id, device_id, memory_info))
{
    if (memory_info == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_model *model = model_of(&state, logic);
    if (model->ddr_mb == 0) {
        return DCMI_ERR_CODE_NOT_SUPPORT;
    }
    memset(memory_info, 0, sizeof *memory_info);
    memory_info->memory_size = model->ddr_mb;
    memory_info->memory_available = model->ddr_mb;
    memory_info->freq = SIM_DDR_FREQ_MHZ;
    memory_info->hugepagesize = SIM_HUGEPAGE_KB;
    return DCMI_OK;
}

SIM_API(dcmi_get_device_hbm_info, (int card_id, int device_id, struct dcmi_hbm_info *hbm_info),
        (card_id, device_id, hbm_info))
{
    if (hbm_info == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_model *model = model_of(&state, logic);
    struct sim_health h;
    sim_read_health(logic, &h);
    memset(hbm_info, 0, sizeof *hbm_info);
    hbm_info->memory_size = model->hbm_mb;
    hbm_info->freq = model->hbm_freq_mhz;
    hbm_info->memory_usage = 0;
    hbm_info->temp = h.temperature_c;
    hbm_info->bandwith_util_rate = 0;
    return DCMI_OK;
}
