/* Device enumeration, identity, memory, running processes and health getters. */
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "sim.h"

#define SIM_MAX_PROCESSES 1024

static struct sim_process process_buffer[SIM_MAX_PROCESSES];

/* ---- enumeration -------------------------------------------------------------------------- */

static nvmlReturn_t get_count(unsigned int *count)
{
    SIM_CHECK(sim_require_init());
    if (count == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *count = sim.topology.gpu_count;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetCount_v2, (unsigned int *deviceCount), (deviceCount))
{
    return get_count(deviceCount);
}

SIM_API(nvmlDeviceGetCount, (unsigned int *deviceCount), (deviceCount))
{
    return get_count(deviceCount);
}

/* A lookup that found GPU `gpu`. A lost GPU still counts in nvmlDeviceGetCount, but no lookup
 * hands out its handle: nvml.h lists NVML_ERROR_GPU_IS_LOST for every handle lookup, and
 * nvidia-smi's "Unable to determine the device handle for GPU <bus id>: GPU is lost" is that
 * error from the lookup by index. */
static nvmlReturn_t found_gpu(unsigned int gpu, nvmlDevice_t *device)
{
    SIM_CHECK(sim_check_gpu_reachable(gpu));
    *device = sim_device_handle(gpu);
    return NVML_SUCCESS;
}

static nvmlReturn_t get_handle_by_index(unsigned int index, nvmlDevice_t *device)
{
    SIM_CHECK(sim_require_init());
    if (device == NULL || index >= sim.topology.gpu_count) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return found_gpu(index, device);
}

SIM_API(nvmlDeviceGetHandleByIndex_v2, (unsigned int index, nvmlDevice_t *device),
        (index, device))
{
    return get_handle_by_index(index, device);
}

SIM_API(nvmlDeviceGetHandleByIndex, (unsigned int index, nvmlDevice_t *device), (index, device))
{
    return get_handle_by_index(index, device);
}

/* GPU UUIDs first, then the MIG device of every compute instance. */
static nvmlReturn_t find_by_uuid(const char *uuid, nvmlDevice_t *device)
{
    char candidate[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    for (unsigned int gpu = 0; gpu < sim.state.gpu_count; gpu++) {
        sim_gpu_uuid(gpu, candidate, sizeof candidate);
        if (strcmp(candidate, uuid) == 0) {
            return found_gpu(gpu, device);
        }
    }
    for (unsigned int gpu = 0; gpu < sim.state.gpu_count; gpu++) {
        if (!sim.state.gpu[gpu].mig_current) {
            continue;
        }
        for (unsigned int gi = 0; gi < SIM_MAX_GI; gi++) {
            const struct sim_gi *g = &sim.state.gpu[gpu].gi[gi];
            for (unsigned int ci = 0; g->used && ci < SIM_MAX_CI; ci++) {
                if (!g->ci[ci].used) {
                    continue;
                }
                sim_mig_uuid(gpu, gi, ci, g->ci[ci].serial, candidate, sizeof candidate);
                if (strcmp(candidate, uuid) == 0) {
                    SIM_CHECK(sim_check_gpu_reachable(gpu));
                    *device = sim_mig_handle(&sim.state, gpu, gi, ci);
                    return *device == NULL ? NVML_ERROR_MEMORY : NVML_SUCCESS;
                }
            }
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

SIM_API(nvmlDeviceGetHandleByUUID, (const char *uuid, nvmlDevice_t *device), (uuid, device))
{
    SIM_CHECK(sim_sync());
    if (uuid == NULL || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return find_by_uuid(uuid, device);
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

/* The 16 bytes behind "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (prefix and dashes dropped). */
static void uuid_bytes(const char *text, unsigned char *out)
{
    const char *p = strchr(text, '-');
    p = p == NULL ? text : p + 1;
    unsigned int n = 0;
    for (; *p != '\0' && n < 2 * NVML_DEVICE_UUID_BINARY_LEN; p++) {
        int v = hex_value(*p);
        if (v < 0) {
            continue;
        }
        if (n % 2 == 0) {
            out[n / 2] = (unsigned char)(v << 4);
        } else {
            out[n / 2] |= (unsigned char)v;
        }
        n++;
    }
}

SIM_API(nvmlDeviceGetHandleByUUIDV, (const nvmlUUID_t *uuid, nvmlDevice_t *device),
        (uuid, device))
{
    SIM_CHECK(sim_sync());
    if (uuid == NULL || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_version(uuid->version, nvmlUUID_v1));
    if (uuid->type == NVML_UUID_TYPE_ASCII) {
        char text[NVML_DEVICE_UUID_ASCII_LEN + 1];
        memcpy(text, uuid->value.str, NVML_DEVICE_UUID_ASCII_LEN);
        text[NVML_DEVICE_UUID_ASCII_LEN] = '\0';
        return find_by_uuid(text, device);
    }
    if (uuid->type != NVML_UUID_TYPE_BINARY) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    char candidate[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    unsigned char bytes[NVML_DEVICE_UUID_BINARY_LEN];
    for (unsigned int gpu = 0; gpu < sim.state.gpu_count; gpu++) {
        sim_gpu_uuid(gpu, candidate, sizeof candidate);
        uuid_bytes(candidate, bytes);
        if (memcmp(bytes, uuid->value.bytes, sizeof bytes) == 0) {
            return found_gpu(gpu, device);
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

SIM_API(nvmlDeviceGetHandleBySerial, (const char *serial, nvmlDevice_t *device),
        (serial, device))
{
    SIM_CHECK(sim_require_init());
    if (serial == NULL || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    char candidate[NVML_DEVICE_SERIAL_BUFFER_SIZE];
    for (unsigned int gpu = 0; gpu < sim.topology.gpu_count; gpu++) {
        sim_gpu_serial(gpu, candidate, sizeof candidate);
        if (strcmp(candidate, serial) == 0) {
            return found_gpu(gpu, device);
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

/* Accepts "domain:bus:device.function" with any domain width, or "bus:device.function". */
static nvmlReturn_t get_handle_by_pci(const char *bus_id, nvmlDevice_t *device)
{
    SIM_CHECK(sim_require_init());
    if (bus_id == NULL || device == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    unsigned int domain = 0, bus, dev, function;
    char extra;
    if (sscanf(bus_id, "%x:%x:%x.%x%c", &domain, &bus, &dev, &function, &extra) != 4) {
        domain = 0;
        if (sscanf(bus_id, "%x:%x.%x%c", &bus, &dev, &function, &extra) != 3) {
            return NVML_ERROR_INVALID_ARGUMENT;
        }
    }
    for (unsigned int gpu = 0; gpu < sim.topology.gpu_count; gpu++) {
        if (domain == 0 && bus == sim_gpu_pci_bus(gpu) && dev == 0 && function == 0) {
            return found_gpu(gpu, device);
        }
    }
    return NVML_ERROR_NOT_FOUND;
}

SIM_API(nvmlDeviceGetHandleByPciBusId_v2, (const char *pciBusId, nvmlDevice_t *device),
        (pciBusId, device))
{
    return get_handle_by_pci(pciBusId, device);
}

SIM_API(nvmlDeviceGetHandleByPciBusId, (const char *pciBusId, nvmlDevice_t *device),
        (pciBusId, device))
{
    return get_handle_by_pci(pciBusId, device);
}

/* ---- identity ----------------------------------------------------------------------------- */

static const struct gi_profile_resources *mig_resources(const struct nvmlDevice_st *d)
{
    const struct sim_gpu *g = &sim.state.gpu[d->gpu];
    return &sim_models[g->model].profiles[g->gi[d->gi].kind];
}

SIM_API(nvmlDeviceGetName, (nvmlDevice_t device, char *name, unsigned int length),
        (device, name, length))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    const char *model_name = sim_models[sim.state.gpu[d->gpu].model].name;
    if (!d->is_mig) {
        return sim_copy_string(model_name, name, length);
    }
    /* A MIG device is named after its compute instance: "<GPU> MIG 1c.3g.40gb", or
     * "<GPU> MIG 3g.40gb" when the compute instance spans the whole GPU instance. */
    const struct sim_gi *g = &sim.state.gpu[d->gpu].gi[d->gi];
    unsigned int ci_slices = sim_ci_slices(g->ci[d->ci].profile);
    char text[NVML_DEVICE_NAME_V2_BUFFER_SIZE * 2];
    if (ci_slices == sim_gi_profiles[g->kind].compute_slices) {
        snprintf(text, sizeof text, "%s MIG %s", model_name, mig_resources(d)->name);
    } else {
        snprintf(text, sizeof text, "%s MIG %uc.%s", model_name, ci_slices,
                 mig_resources(d)->name);
    }
    return sim_copy_string(text, name, length);
}

SIM_API(nvmlDeviceGetUUID, (nvmlDevice_t device, char *uuid, unsigned int length),
        (device, uuid, length))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    char text[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    if (d->is_mig) {
        sim_mig_uuid(d->gpu, d->gi, d->ci, d->serial, text, sizeof text);
    } else {
        sim_gpu_uuid(d->gpu, text, sizeof text);
    }
    return sim_copy_string(text, uuid, length);
}

SIM_API(nvmlDeviceGetSerial, (nvmlDevice_t device, char *serial, unsigned int length),
        (device, serial, length))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    char text[NVML_DEVICE_SERIAL_BUFFER_SIZE];
    sim_gpu_serial(gpu, text, sizeof text);
    return sim_copy_string(text, serial, length);
}

SIM_API(nvmlDeviceGetIndex, (nvmlDevice_t device, unsigned int *index), (device, index))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (index == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *index = gpu;
    return NVML_SUCCESS;
}

/* /dev/nvidiaN: the minor number is the index on a simulated node. */
SIM_API(nvmlDeviceGetMinorNumber, (nvmlDevice_t device, unsigned int *minorNumber),
        (device, minorNumber))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (minorNumber == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *minorNumber = gpu;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetPciInfo_v3, (nvmlDevice_t device, nvmlPciInfo_t *pci), (device, pci))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (pci == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    const struct sim_model_info *model = &sim_models[sim.state.gpu[gpu].model];
    memset(pci, 0, sizeof *pci);
    sim_gpu_bus_id(gpu, 1, pci->busIdLegacy, sizeof pci->busIdLegacy);
    sim_gpu_bus_id(gpu, 0, pci->busId, sizeof pci->busId);
    pci->domain = 0;
    pci->bus = sim_gpu_pci_bus(gpu);
    pci->device = 0;
    pci->pciDeviceId = model->pci_device_id;
    pci->pciSubSystemId = model->pci_subsystem_id;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetPciInfoExt, (nvmlDevice_t device, nvmlPciInfoExt_v1_t *pci),
        (device, pci))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (pci == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_version(pci->version, nvmlPciInfoExt_v1));
    const struct sim_model_info *model = &sim_models[sim.state.gpu[gpu].model];
    memset(pci, 0, sizeof *pci);
    pci->version = nvmlPciInfoExt_v1;
    pci->bus = sim_gpu_pci_bus(gpu);
    pci->pciDeviceId = model->pci_device_id;
    pci->pciSubSystemId = model->pci_subsystem_id;
    pci->baseClass = 0x3; /* display controller */
    pci->subClass = 0x2;  /* 3D controller: data-centre GPUs have no display */
    sim_gpu_bus_id(gpu, 0, pci->busId, sizeof pci->busId);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetArchitecture, (nvmlDevice_t device, unsigned int *arch), (device, arch))
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (arch == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *arch = sim_models[sim.state.gpu[d->gpu].model].architecture;
    return NVML_SUCCESS;
}

static nvmlReturn_t get_attributes(nvmlDevice_t device, nvmlDeviceAttributes_t *attributes)
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (attributes == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    /* nvml.h: "This API currently only supports MIG device handles." */
    if (!d->is_mig) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    const struct sim_gi *g = &sim.state.gpu[d->gpu].gi[d->gi];
    const struct gi_profile_resources *res = mig_resources(d);
    unsigned int gi_slices = sim_gi_profiles[g->kind].compute_slices;
    unsigned int ci_slices = sim_ci_slices(g->ci[d->ci].profile);
    const struct gi_profile_resources *one =
        &sim_models[sim.state.gpu[d->gpu].model].profiles[GI_1G];
    memset(attributes, 0, sizeof *attributes);
    attributes->multiprocessorCount =
        ci_slices == gi_slices ? res->multiprocessors : ci_slices * one->multiprocessors;
    attributes->sharedCopyEngineCount = res->copy_engines;
    attributes->sharedDecoderCount = res->decoders;
    attributes->sharedEncoderCount = res->encoders;
    attributes->sharedJpegCount = res->jpegs;
    attributes->sharedOfaCount = res->ofas;
    attributes->gpuInstanceSliceCount = gi_slices;
    attributes->computeInstanceSliceCount = ci_slices;
    attributes->memorySizeMB = res->memory_mb;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetAttributes_v2, (nvmlDevice_t device, nvmlDeviceAttributes_t *attributes),
        (device, attributes))
{
    return get_attributes(device, attributes);
}

SIM_API(nvmlDeviceGetAttributes, (nvmlDevice_t device, nvmlDeviceAttributes_t *attributes),
        (device, attributes))
{
    return get_attributes(device, attributes);
}

/* ---- processes and memory ----------------------------------------------------------------- */

/* Live processes on the device: all of the GPU's for a GPU handle, or those in the MIG
 * device's compute instance. With `whole_gi`, every process in the MIG device's GPU instance. */
static int device_processes(const struct nvmlDevice_st *d, int whole_gi, struct sim_process **out)
{
    int count = sim_live_processes(process_buffer, SIM_MAX_PROCESSES);
    if (count < 0) {
        return -1;
    }
    int kept = 0;
    for (int i = 0; i < count; i++) {
        const struct sim_process *p = &process_buffer[i];
        if (p->gpu != d->gpu) {
            continue;
        }
        if (d->is_mig && (p->gi != d->gi || (!whole_gi && p->ci != d->ci))) {
            continue;
        }
        process_buffer[kept++] = *p;
    }
    *out = process_buffer;
    return kept;
}

static nvmlReturn_t get_memory(nvmlDevice_t device, unsigned long long *total,
                               unsigned long long *used)
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    unsigned long long mib = d->is_mig ? mig_resources(d)->memory_mb
                                       : sim_models[sim.state.gpu[d->gpu].model].memory_mib;
    *total = mib << 20;
    struct sim_process *processes;
    int count = device_processes(d, 1, &processes);
    if (count < 0) {
        return NVML_ERROR_UNKNOWN;
    }
    *used = 0;
    for (int i = 0; i < count; i++) {
        unsigned long long before = *used;
        *used += processes[i].used_bytes;
        if (*used < before) {
            *used = ~0ULL; /* saturate; clamped to the total below */
        }
    }
    if (*used > *total) {
        *used = *total;
    }
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetMemoryInfo, (nvmlDevice_t device, nvmlMemory_t *memory), (device, memory))
{
    unsigned long long total, used;
    SIM_CHECK(get_memory(device, &total, &used));
    if (memory == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    memory->total = total;
    memory->used = used;
    memory->free = total - used;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetMemoryInfo_v2, (nvmlDevice_t device, nvmlMemory_v2_t *memory),
        (device, memory))
{
    unsigned long long total, used;
    SIM_CHECK(get_memory(device, &total, &used));
    if (memory == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_version(memory->version, nvmlMemory_v2));
    /* The simulated driver reserves nothing: free + used == total. */
    memory->total = total;
    memory->reserved = 0;
    memory->used = used;
    memory->free = total - used;
    return NVML_SUCCESS;
}

enum process_layout { LAYOUT_V1, LAYOUT_V2 };

/* nvml.h semantics: with too small a buffer (or none), *infoCount becomes the number needed and
 * the call fails with NVML_ERROR_INSUFFICIENT_SIZE; with no processes it succeeds with 0. */
static nvmlReturn_t running_processes(nvmlDevice_t device, unsigned int *infoCount, void *infos,
                                      enum process_layout layout, int compute)
{
    const struct nvmlDevice_st *d;
    SIM_CHECK(sim_synced_device(device, &d));
    if (infoCount == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    struct sim_process *processes = NULL;
    int count = 0;
    if (compute) { /* the simulated node runs no graphics or MPS clients */
        count = device_processes(d, 0, &processes);
        if (count < 0) {
            return NVML_ERROR_UNKNOWN;
        }
    }
    if (infos == NULL || *infoCount < (unsigned int)count) {
        *infoCount = (unsigned int)count;
        return count == 0 ? NVML_SUCCESS : NVML_ERROR_INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < count; i++) {
        if (layout == LAYOUT_V1) {
            nvmlProcessInfo_v1_t *out = (nvmlProcessInfo_v1_t *)infos + i;
            out->pid = processes[i].pid;
            out->usedGpuMemory = processes[i].used_bytes;
        } else {
            nvmlProcessInfo_v2_t *out = (nvmlProcessInfo_v2_t *)infos + i;
            out->pid = processes[i].pid;
            out->usedGpuMemory = processes[i].used_bytes;
            out->gpuInstanceId = processes[i].gi;
            out->computeInstanceId = processes[i].ci;
        }
    }
    *infoCount = (unsigned int)count;
    return NVML_SUCCESS;
}

#define PROCESS_API(name, layout, compute)                                                   \
    SIM_API(name, (nvmlDevice_t device, unsigned int *infoCount, void *infos),              \
            (device, infoCount, infos))                                                      \
    {                                                                                        \
        return running_processes(device, infoCount, infos, layout, compute);                 \
    }

PROCESS_API(nvmlDeviceGetComputeRunningProcesses, LAYOUT_V1, 1)
PROCESS_API(nvmlDeviceGetComputeRunningProcesses_v2, LAYOUT_V2, 1)
PROCESS_API(nvmlDeviceGetComputeRunningProcesses_v3, LAYOUT_V2, 1)
PROCESS_API(nvmlDeviceGetGraphicsRunningProcesses, LAYOUT_V1, 0)
PROCESS_API(nvmlDeviceGetGraphicsRunningProcesses_v2, LAYOUT_V2, 0)
PROCESS_API(nvmlDeviceGetGraphicsRunningProcesses_v3, LAYOUT_V2, 0)
PROCESS_API(nvmlDeviceGetMPSComputeRunningProcesses, LAYOUT_V1, 0)
PROCESS_API(nvmlDeviceGetMPSComputeRunningProcesses_v2, LAYOUT_V2, 0)
PROCESS_API(nvmlDeviceGetMPSComputeRunningProcesses_v3, LAYOUT_V2, 0)

/* ---- health ------------------------------------------------------------------------------- */

/* Health getters take a GPU handle; MIG device handles get NVML_ERROR_NOT_SUPPORTED. */
SIM_API(nvmlDeviceGetTemperature, (nvmlDevice_t device, unsigned int sensorType,
                                   unsigned int *temp),
        (device, sensorType, temp))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (temp == NULL || sensorType != NVML_TEMPERATURE_GPU) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *temp = (unsigned int)sim_health_value(gpu, HEALTH_TEMPERATURE_C);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetTemperatureV, (nvmlDevice_t device, nvmlTemperature_v1_t *temperature),
        (device, temperature))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (temperature == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    SIM_CHECK(sim_check_version(temperature->version, nvmlTemperature_v1));
    if (temperature->sensorType != NVML_TEMPERATURE_GPU) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    temperature->temperature = (int)sim_health_value(gpu, HEALTH_TEMPERATURE_C);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetPowerUsage, (nvmlDevice_t device, unsigned int *power), (device, power))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (power == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *power = (unsigned int)sim_health_value(gpu, HEALTH_POWER_MW);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetTotalEccErrors, (nvmlDevice_t device, unsigned int errorType,
                                      unsigned int counterType, unsigned long long *eccCounts),
        (device, errorType, counterType, eccCounts))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (eccCounts == NULL || errorType > NVML_MEMORY_ERROR_TYPE_UNCORRECTED ||
        counterType > NVML_AGGREGATE_ECC) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    static const enum health_key keys[2][2] = {
        [NVML_VOLATILE_ECC] = {HEALTH_ECC_VOLATILE_CORRECTED, HEALTH_ECC_VOLATILE_UNCORRECTED},
        [NVML_AGGREGATE_ECC] = {HEALTH_ECC_AGGREGATE_CORRECTED, HEALTH_ECC_AGGREGATE_UNCORRECTED},
    };
    *eccCounts = sim_health_value(gpu, keys[counterType][errorType]);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetRemappedRows, (nvmlDevice_t device, unsigned int *corrRows,
                                    unsigned int *uncRows, unsigned int *isPending,
                                    unsigned int *failureOccurred),
        (device, corrRows, uncRows, isPending, failureOccurred))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (corrRows == NULL || uncRows == NULL || isPending == NULL || failureOccurred == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *corrRows = (unsigned int)sim_health_value(gpu, HEALTH_REMAPPED_CORRECTABLE);
    *uncRows = (unsigned int)sim_health_value(gpu, HEALTH_REMAPPED_UNCORRECTABLE);
    *isPending = (unsigned int)sim_health_value(gpu, HEALTH_REMAPPING_PENDING);
    *failureOccurred = (unsigned int)sim_health_value(gpu, HEALTH_REMAPPING_FAILURE);
    return NVML_SUCCESS;
}

/* Page retirement is what GPUs before Ampere do with bad memory; A100 and H100 remap rows
 * instead (NVIDIA, "A100 GPU Memory Error Management": row-remapping statistics replace the page
 * retirement count), and nvidia-smi -q shows their "Retired Pages" as N/A. So these answer
 * NVML_ERROR_NOT_SUPPORTED (nvml.h: "if the device doesn't support this feature") after the
 * usual handle and argument checks. */
static nvmlReturn_t retired_pages(nvmlDevice_t device, unsigned int cause,
                                  const unsigned int *pageCount)
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (pageCount == NULL || cause >= NVML_PAGE_RETIREMENT_CAUSE_COUNT) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_ERROR_NOT_SUPPORTED;
}

SIM_API(nvmlDeviceGetRetiredPages, (nvmlDevice_t device, unsigned int cause,
                                    unsigned int *pageCount, unsigned long long *addresses),
        (device, cause, pageCount, addresses))
{
    (void)addresses;
    return retired_pages(device, cause, pageCount);
}

SIM_API(nvmlDeviceGetRetiredPages_v2,
        (nvmlDevice_t device, unsigned int cause, unsigned int *pageCount,
         unsigned long long *addresses, unsigned long long *timestamps),
        (device, cause, pageCount, addresses, timestamps))
{
    (void)addresses;
    (void)timestamps;
    return retired_pages(device, cause, pageCount);
}

SIM_API(nvmlDeviceGetRetiredPagesPendingStatus, (nvmlDevice_t device, unsigned int *isPending),
        (device, isPending))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (isPending == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    return NVML_ERROR_NOT_SUPPORTED;
}

static nvmlReturn_t clocks_reasons(nvmlDevice_t device, unsigned long long *reasons,
                                   int supported)
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (reasons == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *reasons = supported ? NVML_SIM_CLOCKS_EVENT_REASONS_ALL
                         : sim_health_value(gpu, HEALTH_CLOCKS_EVENT_REASONS);
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetCurrentClocksEventReasons,
        (nvmlDevice_t device, unsigned long long *clocksEventReasons),
        (device, clocksEventReasons))
{
    return clocks_reasons(device, clocksEventReasons, 0);
}

/* The pre-R535 name of the same query. */
SIM_API(nvmlDeviceGetCurrentClocksThrottleReasons,
        (nvmlDevice_t device, unsigned long long *clocksThrottleReasons),
        (device, clocksThrottleReasons))
{
    return clocks_reasons(device, clocksThrottleReasons, 0);
}

SIM_API(nvmlDeviceGetSupportedClocksEventReasons,
        (nvmlDevice_t device, unsigned long long *supportedClocksEventReasons),
        (device, supportedClocksEventReasons))
{
    return clocks_reasons(device, supportedClocksEventReasons, 1);
}

SIM_API(nvmlDeviceGetSupportedClocksThrottleReasons,
        (nvmlDevice_t device, unsigned long long *supportedClocksThrottleReasons),
        (device, supportedClocksThrottleReasons))
{
    return clocks_reasons(device, supportedClocksThrottleReasons, 1);
}
