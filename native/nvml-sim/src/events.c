/*
 * Event sets fed by DIR/xid, a control file anyone appends "<gpu> <xid> [<gi> <ci>]" lines to.
 * Each registration remembers where the file ended when it was made, so a set receives exactly
 * the lines appended after it registered the GPU, in file order. Nothing is synthesised: a lost
 * GPU (DIR/health) announces itself only through the XID 79 line its injector appends.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/inotify.h>
#include <unistd.h>
#include <string.h>
#include <time.h>

#include "sim.h"

#define MAGIC_EVENT_SET 0x4E564553U /* "NVES" */
#define MAGIC_FREED 0x4E564658U     /* "NVFX" */
#define SIM_MAX_REGISTRATIONS 64
/* A waiting nvmlEventSetWait sleeps on inotify (DIR changed: a line appended to xid, health
 * replaced) and looks again at least this often, in case a change was missed. */
#define SIM_EVENT_RECHECK_MS 100

/* What the simulated GPUs can report; only XIDs are ever injected. */
#define SIM_SUPPORTED_EVENTS                                                                     \
    (nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError | nvmlEventTypePState |   \
     nvmlEventTypeXidCriticalError | nvmlEventTypeClock)

struct registration {
    unsigned int gpu;
    nvmlDevice_t device;
    unsigned long long types;
    size_t offset; /* next byte of DIR/xid this registration has not looked at */
    dev_t file_dev;
    ino_t file_ino;
    uint64_t tail_hash; /* of the bytes just before `offset`: tells a rewritten file */
};

/* How much of what a registration has consumed it re-checks to notice a rewritten file. */
#define SIM_XID_TAIL 256

static uint64_t tail_hash(const char *text, size_t offset)
{
    size_t begin = offset > SIM_XID_TAIL ? offset - SIM_XID_TAIL : 0;
    uint64_t hash = 0xCBF29CE484222325ULL; /* FNV-1a */
    for (size_t i = begin; i < offset; i++) {
        hash = (hash ^ (unsigned char)text[i]) * 0x100000001B3ULL;
    }
    return hash;
}

struct nvmlEventSet_st {
    uint32_t magic;
    int count;
    struct registration registrations[SIM_MAX_REGISTRATIONS];
};

SIM_API(nvmlEventSetCreate, (nvmlEventSet_t *set), (set))
{
    SIM_CHECK(sim_require_init());
    if (set == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    struct nvmlEventSet_st *created = calloc(1, sizeof *created);
    if (created == NULL) {
        return NVML_ERROR_MEMORY;
    }
    created->magic = MAGIC_EVENT_SET;
    *set = created;
    return NVML_SUCCESS;
}

/* Freed sets keep their memory, so a late call on one is an error rather than a crash. */
SIM_API(nvmlEventSetFree, (nvmlEventSet_t set), (set))
{
    SIM_CHECK(sim_require_init());
    if (set == NULL || set->magic != MAGIC_EVENT_SET) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    set->magic = MAGIC_FREED;
    set->count = 0;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceGetSupportedEventTypes, (nvmlDevice_t device, unsigned long long *eventTypes),
        (device, eventTypes))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (eventTypes == NULL) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    *eventTypes = SIM_SUPPORTED_EVENTS;
    return NVML_SUCCESS;
}

SIM_API(nvmlDeviceRegisterEvents,
        (nvmlDevice_t device, unsigned long long eventTypes, nvmlEventSet_t set),
        (device, eventTypes, set))
{
    unsigned int gpu;
    SIM_CHECK(sim_synced_gpu(device, &gpu));
    if (set == NULL || set->magic != MAGIC_EVENT_SET) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    /* nvml.h: NVML_ERROR_NOT_SUPPORTED if some of the requested event types are unsupported. */
    if ((eventTypes & ~SIM_SUPPORTED_EVENTS) != 0) {
        return NVML_ERROR_NOT_SUPPORTED;
    }
    for (int i = 0; i < set->count; i++) {
        if (set->registrations[i].gpu == gpu) {
            set->registrations[i].types |= eventTypes; /* registering again adds types */
            return NVML_SUCCESS;
        }
    }
    if (set->count == SIM_MAX_REGISTRATIONS) {
        return NVML_ERROR_INSUFFICIENT_RESOURCES;
    }
    struct registration *reg = &set->registrations[set->count];
    memset(reg, 0, sizeof *reg);
    reg->gpu = gpu;
    reg->device = device;
    reg->types = eventTypes;
    char *text;
    size_t len;
    struct file_key key;
    if (sim_read_file(sim.xid_path, &text, &len, &key) == 0) {
        reg->offset = len;
        reg->file_dev = key.dev;
        reg->file_ino = key.ino;
        reg->tail_hash = tail_hash(text, len);
        free(text);
    } else {
        reg->tail_hash = tail_hash("", 0);
    }
    set->count++;
    return NVML_SUCCESS;
}

struct xid_line {
    int valid;
    unsigned int gpu;
    unsigned long long xid;
    unsigned int gi;
    unsigned int ci;
};

static struct xid_line parse_xid_line(const char *line, size_t len)
{
    struct xid_line parsed = {0};
    char buf[256];
    char *tok[4];
    int count = sim_tokenize(line, len, buf, sizeof buf, tok, 4);
    unsigned long long gpu, xid, gi = NVML_VALUE_NOT_AVAILABLE_UINT,
                                 ci = NVML_VALUE_NOT_AVAILABLE_UINT;
    if ((count != 2 && count != 4) || sim_parse_u64(tok[0], 1000, &gpu) != 0 ||
        sim_parse_u64(tok[1], ~0ULL, &xid) != 0) {
        return parsed;
    }
    if (count == 4 &&
        (sim_parse_u64_or_minus_one(tok[2], 0xFFFFFFFFULL, NVML_VALUE_NOT_AVAILABLE_UINT, &gi) !=
             0 ||
         sim_parse_u64_or_minus_one(tok[3], 0xFFFFFFFFULL, NVML_VALUE_NOT_AVAILABLE_UINT, &ci) !=
             0)) {
        return parsed;
    }
    parsed.valid = 1;
    parsed.gpu = (unsigned int)gpu;
    parsed.xid = xid;
    parsed.gi = (unsigned int)gi;
    parsed.ci = (unsigned int)ci;
    return parsed;
}

struct next_event_scan {
    const struct registration *reg;
    size_t base;  /* file offset of text[0] */
    size_t found; /* offset of the matching line, or SIZE_MAX */
    size_t after; /* offset just past it, or past the last complete line scanned */
    struct xid_line event;
};

static int next_event_line(const char *line, size_t len, size_t start, size_t end, void *ctx)
{
    struct next_event_scan *scan = ctx;
    scan->after = scan->base + end;
    if (scan->base + start < scan->reg->offset) {
        return 0;
    }
    struct xid_line parsed = parse_xid_line(line, len);
    if (parsed.valid && parsed.gpu == scan->reg->gpu &&
        (scan->reg->types & nvmlEventTypeXidCriticalError)) {
        scan->found = scan->base + start;
        scan->event = parsed;
        return 1;
    }
    return 0;
}

/* One look at DIR/xid: the earliest complete line, over all registrations, that one of them has
 * not consumed. Returns 1 and fills *data (consuming the line) or 0 when there is none. */
static int take_event(struct nvmlEventSet_st *set, nvmlEventData_t *data)
{
    char *text = NULL;
    size_t len = 0;
    struct file_key key;
    int error = sim_read_file(sim.xid_path, &text, &len, &key);
    if (error != 0) {
        return 0;
    }
    int best = -1;
    struct next_event_scan best_scan = {0};
    for (int i = 0; i < set->count; i++) {
        struct registration *reg = &set->registrations[i];
        /* Replaced, truncated or rewritten: what it now holds was written after we looked. */
        if (reg->file_ino != key.ino || reg->file_dev != key.dev || reg->offset > len ||
            tail_hash(text, reg->offset) != reg->tail_hash) {
            reg->offset = 0;
            reg->file_ino = key.ino;
            reg->file_dev = key.dev;
        }
        struct next_event_scan scan = {.reg = reg, .base = 0, .found = SIZE_MAX, .after = 0};
        sim_for_each_line(text, len, 0, next_event_line, &scan);
        if (scan.found == SIZE_MAX) {
            if (scan.after > reg->offset) {
                reg->offset = scan.after; /* nothing for us up to here */
            }
            reg->tail_hash = tail_hash(text, reg->offset);
            continue;
        }
        if (best < 0 || scan.found < best_scan.found) {
            best = i;
            best_scan = scan;
        }
    }
    if (best < 0) {
        free(text);
        return 0;
    }
    struct registration *reg = &set->registrations[best];
    reg->offset = best_scan.after;
    reg->tail_hash = tail_hash(text, reg->offset);
    free(text);
    data->device = reg->device;
    data->eventType = nvmlEventTypeXidCriticalError;
    data->eventData = best_scan.event.xid;
    data->gpuInstanceId = best_scan.event.gi;
    data->computeInstanceId = best_scan.event.ci;
    return 1;
}

/* nvml.h lists NVML_ERROR_GPU_IS_LOST for nvmlEventSetWait: "if a GPU has fallen off the bus".
 * Events already in DIR/xid are still delivered first (the XID 79 that announces the loss is
 * one of them); only a wait with nothing to deliver reports the lost GPU, and it does so at
 * once rather than after the timeout, as long as one registered GPU is lost. */
static int set_has_lost_gpu(const struct nvmlEventSet_st *set)
{
    for (int i = 0; i < set->count; i++) {
        if (sim_gpu_lost(set->registrations[i].gpu)) {
            return 1;
        }
    }
    return 0;
}

static long long monotonic_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (long long)now.tv_sec * 1000000000LL + now.tv_nsec;
}

static nvmlReturn_t wait_event_on(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms,
                                  int fd);

/* The simulation directory's changes, watched before the first look so that nothing appended
 * between a look and the sleep is missed; -1 when inotify is unavailable (then: timed looks). */
static int watch_directory(void)
{
    char dir[sizeof sim.xid_path];
    sim_api_lock();
    snprintf(dir, sizeof dir, "%s", sim.xid_path);
    sim_api_unlock();
    char *slash = strrchr(dir, '/');
    if (slash == NULL) {
        return -1;
    }
    *slash = '\0';
    int fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    if (inotify_add_watch(fd, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void sleep_until_change(int fd, long long left_ns)
{
    long long cap = (long long)SIM_EVENT_RECHECK_MS * 1000000LL;
    long long ns = left_ns < cap ? left_ns : cap;
    if (fd < 0) {
        struct timespec pause = {0, (long)(ns < 2000000LL ? ns : 2000000LL)};
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
        }
        return;
    }
    struct pollfd ready = {.fd = fd, .events = POLLIN};
    int ms = (int)((ns + 999999LL) / 1000000LL);
    if (poll(&ready, 1, ms) > 0) {
        char drain[4096];
        while (read(fd, drain, sizeof drain) > 0) {
        }
    }
}

/* Looks without holding the API mutex between looks, so other threads keep working; sleeps on
 * inotify between them (no CPU while nothing happens, as real NVML blocks in the driver). */
static nvmlReturn_t wait_event(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms)
{
    int fd = timeoutms > 0 ? watch_directory() : -1;
    nvmlReturn_t result = wait_event_on(set, data, timeoutms, fd);
    if (fd >= 0) {
        close(fd);
    }
    return result;
}

static nvmlReturn_t wait_event_on(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeoutms,
                                  int fd)
{
    long long deadline = monotonic_ns() + (long long)timeoutms * 1000000LL;
    for (;;) {
        sim_api_lock();
        nvmlReturn_t r = sim_require_init();
        if (r == NVML_SUCCESS && (set == NULL || set->magic != MAGIC_EVENT_SET || data == NULL)) {
            r = NVML_ERROR_INVALID_ARGUMENT;
        }
        int got = r == NVML_SUCCESS ? take_event(set, data) : 0;
        if (r == NVML_SUCCESS && !got && set_has_lost_gpu(set)) {
            r = NVML_ERROR_GPU_IS_LOST;
        }
        sim_api_unlock();
        if (r != NVML_SUCCESS) {
            return r;
        }
        if (got) {
            return NVML_SUCCESS;
        }
        long long left = deadline - monotonic_ns();
        if (left <= 0) {
            return NVML_ERROR_TIMEOUT;
        }
        sleep_until_change(fd, left);
    }
}

SIM_EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                            unsigned int timeoutms);
SIM_EXPORT nvmlReturn_t nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data,
                                            unsigned int timeoutms)
{
    return wait_event(set, data, timeoutms);
}

/* The original signature: its event data ends before the GI/CI ids. */
SIM_EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data,
                                         unsigned int timeoutms);
SIM_EXPORT nvmlReturn_t nvmlEventSetWait(nvmlEventSet_t set, nvmlEventData_v1_t *data,
                                         unsigned int timeoutms)
{
    if (data == NULL) {
        return wait_event(set, NULL, timeoutms);
    }
    nvmlEventData_t full;
    nvmlReturn_t r = wait_event(set, &full, timeoutms);
    if (r == NVML_SUCCESS) {
        data->device = full.device;
        data->eventType = full.eventType;
        data->eventData = full.eventData;
    }
    return r;
}
