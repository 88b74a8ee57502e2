/*
 * vNPUs: dcmi_create_vdevice, dcmi_set_destroy_vdevice, the DCMI_MAIN_CMD_VDEV_MNG queries of
 * dcmi_get_device_info, and the simulated memory a vNPU owns.
 *
 * Rules, with their sources (docs/dcmi-sim.md, "vNPUs"):
 *  - ids: vNPU k of the chip with physical id p is device 100 + 16 * p + k, k = 0..15 (driver:
 *    VDAVINCI_VDEV_OFFSET 100, VDAVINCI_MAX_VFID_NUM 16; "vnpu_id ... [phy_id*16+100, ...]" in
 *    npu-smi's create-vnpu guide). Without a requested id the lowest free k is taken.
 *  - capacity: the AI Cores of a chip's vNPUs add up to at most the chip's (driver: "check aicore
 *    num failed" -> -EINVAL), at most 16 vNPUs, and memory and (910B) AI CPUs add up the same
 *    way. A create that does not fit fails with DCMI_ERR_CODE_INVALID_PARAMETER, which is what
 *    the driver's -EINVAL becomes (errno EINVAL -> DRV_ERROR_PARA_ERROR -> DCMI -8001).
 *  - destroy: an unknown id is DCMI_ERR_CODE_DEVICE_NOT_EXIST (driver -ENODEV); another chip's
 *    vNPU or an id out of every range is DCMI_ERR_CODE_INVALID_PARAMETER (driver -EINVAL);
 *    0xFFFF destroys every vNPU of the chip (driver DEVDRV_DESTROY_ALL_VDEVICE).
 *  - memory: a chip's memory is one unit per AI Core; a vNPU owns as many units as it has AI
 *    Cores, the lowest free contiguous run that fits, else the lowest free units.
 */
#include <string.h>

#include "sim.h"

static unsigned int vdev_id_of(const struct sim_npu *npu, unsigned int slot)
{
    return SIM_VDEV_ID_BASE + npu->phy_id * SIM_VNPUS_PER_NPU + slot;
}

/* The slot of `vdev_id` on `npu`, or -1 when the id is outside the chip's range. */
static int slot_of(const struct sim_npu *npu, unsigned int vdev_id)
{
    unsigned int first = vdev_id_of(npu, 0);
    if (vdev_id < first || vdev_id >= first + SIM_VNPUS_PER_NPU) {
        return -1;
    }
    return (int)(vdev_id - first);
}

static uint64_t all_units(const struct sim_model *model)
{
    return model->aicore >= 64 ? ~0ULL : (1ULL << model->aicore) - 1ULL;
}

/* Units for a new vNPU of `count` AI Cores given the units in use; 0 when they do not fit. */
static uint64_t place_units(const struct sim_model *model, uint64_t used, unsigned int count)
{
    uint64_t free_units = all_units(model) & ~used;
    if ((unsigned int)__builtin_popcountll(free_units) < count || count == 0) {
        return 0;
    }
    uint64_t run = count >= 64 ? ~0ULL : (1ULL << count) - 1ULL;
    for (unsigned int start = 0; start + count <= model->aicore; start++) {
        if (((run << start) & free_units) == (run << start)) {
            return run << start;
        }
    }
    /* Fragmented: the driver splits memory by AI Core count, never refusing for placement. */
    uint64_t picked = 0;
    for (unsigned int u = 0; u < model->aicore && count > 0; u++) {
        if ((free_units >> u) & 1U) {
            picked |= 1ULL << u;
            count--;
        }
    }
    return picked;
}

/* ---- create ------------------------------------------------------------------------------- */

struct create_request {
    int card_id;
    int device_id;
    const struct dcmi_create_vdev_res_stru *vdev;
    struct dcmi_create_vdev_out *out;
};

static int create_vnpu(struct sim_state *state, void *ctx, int *changed)
{
    struct create_request *req = ctx;
    if (req->vdev == NULL || req->out == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    unsigned int logic;
    SIM_CHECK(sim_resolve(state, req->card_id, req->device_id, &logic));
    if (sim_npu_lost(logic)) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    struct sim_npu *npu = &state->npu[logic];
    const struct sim_model *model = &sim_models[npu->model];
    char name[TEMPLATE_NAME_LEN];
    if (memchr(req->vdev->template_name, '\0', TEMPLATE_NAME_LEN) == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    memcpy(name, req->vdev->template_name, TEMPLATE_NAME_LEN);
    int t = sim_template_by_name(model, name);
    if (t < 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    int slot = -1;
    if (req->vdev->vdev_id == DCMI_VDEV_ID_AUTO) {
        for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
            if (!npu->vnpu[k].used) {
                slot = (int)k;
                break;
            }
        }
    } else {
        slot = slot_of(npu, req->vdev->vdev_id);
        if (slot >= 0 && npu->vnpu[slot].used) {
            slot = -1;
        }
    }
    if (slot < 0) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    const struct sim_template *tpl = &model->templates[t];
    struct sim_usage usage = sim_npu_usage(npu);
    if (usage.aicore + tpl->aicore > model->aicore ||
        usage.aicpu + (tpl->aicpu_counted ? tpl->aicpu : 0) > model->aicpu ||
        usage.memory_mb + sim_template_memory_mb(model, tpl) > model->hbm_mb) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    uint64_t units = place_units(model, usage.units, tpl->aicore);
    if (units == 0 || state->serial == ~0ULL - 1) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_vnpu *v = &npu->vnpu[slot];
    v->used = 1;
    v->template_index = (unsigned int)t;
    v->units = units;
    v->serial = ++state->serial;
    *changed = 1;
    memset(req->out, 0, sizeof *req->out);
    req->out->vdev_id = vdev_id_of(npu, (unsigned int)slot);
    /* pcie_bus, pcie_device, pcie_func are reserved: the driver leaves them all-ones. */
    req->out->pcie_bus = 0xFFFFFFFFU;
    req->out->pcie_device = 0xFFFFFFFFU;
    req->out->pcie_func = 0xFFFFFFFFU;
    req->out->vfg_id = (unsigned int)slot;
    return DCMI_OK;
}

SIM_API(dcmi_create_vdevice,
        (int card_id, int device_id, struct dcmi_create_vdev_res_stru *vdev,
         struct dcmi_create_vdev_out *out),
        (card_id, device_id, vdev, out))
{
    struct create_request req = {card_id, device_id, vdev, out};
    return sim_mutate(create_vnpu, &req);
}

/* ---- destroy ------------------------------------------------------------------------------ */

struct destroy_request {
    int card_id;
    int device_id;
    unsigned int vdev_id;
};

static int destroy_vnpu(struct sim_state *state, void *ctx, int *changed)
{
    struct destroy_request *req = ctx;
    unsigned int logic;
    SIM_CHECK(sim_resolve(state, req->card_id, req->device_id, &logic));
    if (sim_npu_lost(logic)) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    struct sim_npu *npu = &state->npu[logic];
    if (req->vdev_id == DCMI_VDEV_ID_ALL) {
        for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
            if (npu->vnpu[k].used) {
                memset(&npu->vnpu[k], 0, sizeof npu->vnpu[k]);
                *changed = 1;
            }
        }
        return DCMI_OK;
    }
    unsigned int last = SIM_VDEV_ID_BASE + (SIM_MAX_PHY_ID + 1) * SIM_VNPUS_PER_NPU - 1;
    if (req->vdev_id < SIM_VDEV_ID_BASE || req->vdev_id > last) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    int slot = slot_of(npu, req->vdev_id);
    if (slot >= 0) {
        if (!npu->vnpu[slot].used) {
            return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
        }
        memset(&npu->vnpu[slot], 0, sizeof npu->vnpu[slot]);
        *changed = 1;
        return DCMI_OK;
    }
    for (unsigned int i = 0; i < state->npu_count; i++) {
        int other = slot_of(&state->npu[i], req->vdev_id);
        if (other >= 0 && state->npu[i].vnpu[other].used) {
            return DCMI_ERR_CODE_INVALID_PARAMETER;
        }
    }
    return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
}

SIM_API(dcmi_set_destroy_vdevice, (int card_id, int device_id, unsigned int vdevid),
        (card_id, device_id, vdevid))
{
    struct destroy_request req = {card_id, device_id, vdevid};
    return sim_mutate(destroy_vnpu, &req);
}

/* ---- queries ------------------------------------------------------------------------------ */

static void fill_computing(unsigned int aicore, unsigned int aicpu, unsigned long long memory_mb,
                           struct dcmi_computing_resource *out)
{
    out->aic = (float)aicore;
    out->memory_size = memory_mb;
    out->device_aicpu = (unsigned short)aicpu;
}

static int query_vnpu(const struct sim_npu *npu, struct dcmi_vdev_query_stru *query)
{
    int slot = slot_of(npu, query->vdev_id);
    if (slot < 0 || !npu->vnpu[slot].used) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    const struct sim_model *model = &sim_models[npu->model];
    const struct sim_template *t = &model->templates[npu->vnpu[slot].template_index];
    unsigned long long memory_mb = sim_template_memory_mb(model, t);
    struct dcmi_vdev_query_info *info = &query->query_info;
    memset(info, 0, sizeof *info);
    size_t name_len = strlen(t->name);
    memcpy(info->name, t->name, name_len < sizeof info->name ? name_len : sizeof info->name - 1);
    info->vfid = (unsigned int)slot + 1; /* the driver's VF ids start at 1 */
    info->vfg_id = (unsigned int)slot;
    info->base.vfg_id = (unsigned int)slot;
    fill_computing(t->aicore, t->aicpu, memory_mb, &info->computing);
    info->computing.vdev_memory_total = memory_mb;
    info->computing.vdev_memory_free = memory_mb;
    return DCMI_OK;
}

static void total_resource(const struct sim_npu *npu, struct dcmi_soc_total_resource *out)
{
    const struct sim_model *model = &sim_models[npu->model];
    memset(out, 0, sizeof *out);
    for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
        if (npu->vnpu[k].used) {
            out->vdev_id[out->vdev_num++] = vdev_id_of(npu, k);
            out->vfg_bitmap |= 1U << k;
        }
    }
    out->vfg_num = out->vdev_num;
    fill_computing(model->aicore, model->aicpu, model->hbm_mb, &out->computing);
}

static void free_resource(const struct sim_npu *npu, struct dcmi_soc_free_resource *out)
{
    const struct sim_model *model = &sim_models[npu->model];
    struct sim_usage usage = sim_npu_usage(npu);
    memset(out, 0, sizeof *out);
    for (unsigned int k = 0; k < SIM_VNPUS_PER_NPU; k++) {
        if (!npu->vnpu[k].used) {
            out->vfg_num++;
            out->vfg_bitmap |= 1U << k;
        }
    }
    /* AI CPUs the 910 templates do not count stay free in this view. */
    fill_computing(model->aicore - usage.aicore, model->aicpu - usage.aicpu,
                   model->hbm_mb - usage.memory_mb, &out->computing);
}

SIM_API(dcmi_get_device_info,
        (int card_id, int device_id, enum dcmi_main_cmd main_cmd, unsigned int sub_cmd, void *buf,
         unsigned int *size),
        (card_id, device_id, main_cmd, sub_cmd, buf, size))
{
    if (buf == NULL || size == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    if (main_cmd != DCMI_MAIN_CMD_VDEV_MNG) {
        return DCMI_ERR_CODE_NOT_SUPPORT;
    }
    const struct sim_npu *npu = &state.npu[logic];
    /* Built in local structures and copied out: `buf` need not be aligned for them. */
    switch (sub_cmd) {
    case DCMI_VMNG_SUB_CMD_GET_VDEV_RESOURCE: {
        struct dcmi_vdev_query_stru query = {0};
        if (*size < sizeof query) {
            return DCMI_ERR_CODE_INVALID_PARAMETER;
        }
        memcpy(&query.vdev_id, buf, sizeof query.vdev_id);
        SIM_CHECK(query_vnpu(npu, &query));
        memcpy(buf, &query, sizeof query);
        *size = sizeof query;
        return DCMI_OK;
    }
    case DCMI_VMNG_SUB_CMD_GET_TOTAL_RESOURCE: {
        struct dcmi_soc_total_resource total;
        if (*size < sizeof total) {
            return DCMI_ERR_CODE_INVALID_PARAMETER;
        }
        total_resource(npu, &total);
        memcpy(buf, &total, sizeof total);
        *size = sizeof total;
        return DCMI_OK;
    }
    case DCMI_VMNG_SUB_CMD_GET_FREE_RESOURCE: {
        struct dcmi_soc_free_resource free_res;
        if (*size < sizeof free_res) {
            return DCMI_ERR_CODE_INVALID_PARAMETER;
        }
        free_resource(npu, &free_res);
        memcpy(buf, &free_res, sizeof free_res);
        *size = sizeof free_res;
        return DCMI_OK;
    }
    default:
        return DCMI_ERR_CODE_NOT_SUPPORT;
    }
}

/* ---- simulated memory --------------------------------------------------------------------- */

SIM_API(dcmisim_get_vdevice_units,
        (int card_id, int device_id, unsigned int vdev_id, unsigned long long *unit_mask,
         unsigned int *unit_count),
        (card_id, device_id, vdev_id, unit_mask, unit_count))
{
    if (unit_mask == NULL || unit_count == NULL) {
        return DCMI_ERR_CODE_INVALID_PARAMETER;
    }
    struct sim_state state;
    unsigned int logic;
    SIM_CHECK(sim_load_and_resolve(&state, card_id, device_id, &logic));
    const struct sim_npu *npu = &state.npu[logic];
    int slot = slot_of(npu, vdev_id);
    if (slot < 0 || !npu->vnpu[slot].used) {
        return DCMI_ERR_CODE_DEVICE_NOT_EXIST;
    }
    *unit_mask = npu->vnpu[slot].units;
    *unit_count = sim_models[npu->model].aicore;
    return DCMI_OK;
}
