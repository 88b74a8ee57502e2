/* Deterministic identities: UUIDs, serials and PCI addresses of the simulated GPUs. */
#include <stdio.h>
#include <string.h>

#include "sim.h"

/* splitmix64: a well-mixed 64-bit step, enough to make UUIDs look random but stay stable. */
static uint64_t mix(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static void format_uuid(const char *prefix, uint64_t hi, uint64_t lo, char *out, size_t len)
{
    snprintf(out, len, "%s%08llx-%04llx-%04llx-%04llx-%012llx", prefix,
             (unsigned long long)(hi >> 32), (unsigned long long)((hi >> 16) & 0xFFFF),
             (unsigned long long)(hi & 0xFFFF), (unsigned long long)(lo >> 48),
             (unsigned long long)(lo & 0xFFFFFFFFFFFFULL));
}

void sim_gpu_uuid(unsigned int gpu, char *out, size_t len)
{
    uint64_t seed = 0x6E766D6C2D73696DULL ^ gpu; /* "nvml-sim" */
    format_uuid("GPU-", mix(seed), mix(seed ^ 0xFFFF0000ULL), out, len);
}

/* The serial makes a re-created instance (same GPU, GI and CI ids) a new MIG device, as on a
 * real GPU where the UUID is minted at creation. */
void sim_mig_uuid(unsigned int gpu, unsigned int gi, unsigned int ci, uint64_t serial, char *out,
                  size_t len)
{
    uint64_t seed = mix(0x4D49472D73696D00ULL ^ gpu) ^ mix(((uint64_t)gi << 8) | ci) ^
                    mix(serial + 0x1234567ULL);
    format_uuid("MIG-", mix(seed), mix(seed ^ 0xA5A5A5A5ULL), out, len);
}

void sim_gpu_serial(unsigned int gpu, char *out, size_t len)
{
    snprintf(out, len, "165242300%04u", 1000U + gpu * 7U);
}

/* PCI buses of the eight GPUs in an HGX H100 baseboard. */
static const unsigned int pci_buses[SIM_MAX_GPUS] = {0x18, 0x2A, 0x3A, 0x5D,
                                                     0x9A, 0xAB, 0xBA, 0xDB};

unsigned int sim_gpu_pci_bus(unsigned int gpu)
{
    return gpu < SIM_MAX_GPUS ? pci_buses[gpu] : 0;
}

void sim_gpu_bus_id(unsigned int gpu, int legacy, char *out, size_t len)
{
    /* nvml.h NVML_DEVICE_PCI_BUS_ID_FMT ("%08X:%02X:%02X.0") and its legacy 4-digit domain. */
    snprintf(out, len, legacy ? "%04X:%02X:%02X.0" : "%08X:%02X:%02X.0", 0U,
             sim_gpu_pci_bus(gpu), 0U);
}

nvmlReturn_t sim_copy_string(const char *value, char *buffer, unsigned int length)
{
    if (buffer == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    size_t needed = strlen(value) + 1;
    if (length < needed) {
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    memcpy(buffer, value, needed);
    return NVML_SUCCESS;
}
