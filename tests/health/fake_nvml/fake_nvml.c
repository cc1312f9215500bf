/* A stand-in libnvidia-ml.so.1 for tests on machines without a GPU.
 *
 * It is a test double, not a simulator: it exports the NVML entry points aidc's nvml
 * backend calls, with NVML's C signatures, so that nvidia-ml-py's real ctypes code paths
 * (argument marshalling, structs, return-code handling) run end to end. Two GPUs:
 *   GPU 0: an "H100" reporting every field (one SBE/DBE, a retired page, a pending row
 *          remap, PCIe Gen4 x16 of Gen5 x16, NVLink 0-2 with link 1 down, HW thermal
 *          slowdown);
 *          dcgm-exporter's staples: 97% busy, 41% memory copy, 3%/5% encoder/decoder, 1024 MiB
 *          used of 80 GiB with 512 MiB reserved, 123456789 mJ, 2 PCIe replays, HBM at 71 C; NVLink
 *          error counters per link (replay = link, recovery 0, CRC flit 42 on link 1, CRC data 1);
 *   GPU 1: a PCIe card for which ECC, row remapping, NVLink, energy, encoder/decoder and the
 *          memory temperature field answer NOT_SUPPORTED (utilisation 0%, FB all free).
 * One XID 79 event on GPU 1 is queued in every event set in which GPU 1 is registered.
 * Compiled with -DOLD_DRIVER it lacks nvmlDeviceGetCurrentClocksEventReasons (pre-R535).
 * Environment: FAKE_NVML_LOST=N makes GPU N (0 or 1) answer GPU_IS_LOST; FAKE_NVML_HANG_MS=N makes
 * the temperature call block N ms (a wedged driver).
 */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int ret_t;
enum { OK = 0, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3, INSUFFICIENT_SIZE = 7, TIMEOUT = 10, GPU_IS_LOST = 15 };

typedef struct { int index; } dev_t_;
static dev_t_ devices[2] = {{0}, {1}};

typedef struct {
    char busIdLegacy[16];
    unsigned domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} pci_info_t;

typedef struct {
    void *device;
    unsigned long long eventType, eventData;
    unsigned gpuInstanceId, computeInstanceId;
} event_data_t;

typedef struct { int delivered, registered[2]; } event_set_t;

static int idx(void *d) { return d ? ((dev_t_ *)d)->index : -1; }
static int lost(void *d) { const char *e = getenv("FAKE_NVML_LOST"); return e && *e == '0' + idx(d); }
#define GUARD(d) do { if (idx(d) < 0) return INVALID_ARGUMENT; if (lost(d)) return GPU_IS_LOST; } while (0)

ret_t nvmlInitWithFlags(unsigned flags) { (void)flags; return OK; }
ret_t nvmlInit_v2(void) { return OK; }
ret_t nvmlShutdown(void) { return OK; }

const char *nvmlErrorString(ret_t r) {
    switch (r) {
    case OK: return "Success";
    case NOT_SUPPORTED: return "Not Supported";
    case TIMEOUT: return "Timeout";
    case GPU_IS_LOST: return "GPU is lost";
    default: return "Unknown Error";
    }
}

ret_t nvmlDeviceGetCount_v2(unsigned *count) { *count = 2; return OK; }

ret_t nvmlDeviceGetHandleByIndex_v2(unsigned i, void **dev) {
    if (i > 1) return INVALID_ARGUMENT;
    *dev = &devices[i];
    return OK;
}

ret_t nvmlDeviceGetIndex(void *d, unsigned *i) { if (idx(d) < 0) return INVALID_ARGUMENT; *i = idx(d); return OK; }

ret_t nvmlDeviceGetPciInfo_v3(void *d, pci_info_t *p) {
    GUARD(d);
    memset(p, 0, sizeof *p);
    p->bus = idx(d) ? 0x27 : 0x17;
    strcpy(p->busId, idx(d) ? "00000000:27:00.0" : "00000000:17:00.0");
    strcpy(p->busIdLegacy, idx(d) ? "0000:27:00.0" : "0000:17:00.0");
    p->pciDeviceId = 0x233010de;
    return OK;
}

ret_t nvmlDeviceGetUUID(void *d, char *buf, unsigned n) {
    GUARD(d);
    strncpy(buf, idx(d) ? "GPU-fake-0001" : "GPU-fake-0000", n);
    return OK;
}

ret_t nvmlDeviceGetName(void *d, char *buf, unsigned n) {
    GUARD(d);
    strncpy(buf, idx(d) ? "Fake PCIe GPU" : "Fake H100 80GB HBM3", n);
    return OK;
}

ret_t nvmlDeviceGetTemperature(void *d, int sensor, unsigned *t) {
    const char *hang = getenv("FAKE_NVML_HANG_MS");
    GUARD(d);
    if (sensor != 0) return INVALID_ARGUMENT;
    if (hang) usleep((useconds_t)atoi(hang) * 1000);
    *t = idx(d) ? 45 : 87;
    return OK;
}

ret_t nvmlDeviceGetPowerUsage(void *d, unsigned *mw) { GUARD(d); *mw = idx(d) ? 70500 : 612250; return OK; }

ret_t nvmlDeviceGetClockInfo(void *d, int type, unsigned *mhz) {
    GUARD(d);
    if (type == 1) *mhz = 1755;        /* NVML_CLOCK_SM */
    else if (type == 2) *mhz = 2619;   /* NVML_CLOCK_MEM */
    else return INVALID_ARGUMENT;
    return OK;
}

/* Built with -DOLD_DRIVER: only the pre-R535 name of the same call exists. */
ret_t nvmlDeviceGetCurrentClocksThrottleReasons(void *d, unsigned long long *mask) {
    GUARD(d);
    *mask = idx(d) ? 0x1ULL : 0x40ULL | 0x4ULL;  /* GPU 1 idle; GPU 0 HW thermal + SW power cap */
    return OK;
}

#ifndef OLD_DRIVER
ret_t nvmlDeviceGetCurrentClocksEventReasons(void *d, unsigned long long *mask) {
    return nvmlDeviceGetCurrentClocksThrottleReasons(d, mask);
}
#endif

ret_t nvmlDeviceGetTotalEccErrors(void *d, int err_type, int counter, unsigned long long *n) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    /* err_type 0 corrected, 1 uncorrected; counter 0 volatile, 1 aggregate */
    *n = (err_type ? 1 : 7) + (counter ? 100 : 0);
    return OK;
}

ret_t nvmlDeviceGetRetiredPages(void *d, int cause, unsigned *count, unsigned long long *addrs) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    unsigned have = cause == 1 ? 1 : 2;  /* cause 0: multiple SBE, 1: DBE */
    if (!addrs) { *count = have; return have ? INSUFFICIENT_SIZE : OK; }
    if (*count < have) { *count = have; return INSUFFICIENT_SIZE; }
    for (unsigned i = 0; i < have; i++) addrs[i] = 0x1000ULL * (i + 1);
    *count = have;
    return OK;
}

ret_t nvmlDeviceGetRetiredPagesPendingStatus(void *d, int *pending) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    *pending = 0;
    return OK;
}

ret_t nvmlDeviceGetRemappedRows(void *d, unsigned *corr, unsigned *unc, unsigned *pending, unsigned *failure) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    *corr = 3; *unc = 1; *pending = 1; *failure = 0;
    return OK;
}

ret_t nvmlDeviceGetCurrPcieLinkGeneration(void *d, unsigned *v) { GUARD(d); *v = idx(d) ? 5 : 4; return OK; }
ret_t nvmlDeviceGetMaxPcieLinkGeneration(void *d, unsigned *v) { GUARD(d); *v = 5; return OK; }
ret_t nvmlDeviceGetCurrPcieLinkWidth(void *d, unsigned *v) { GUARD(d); *v = 16; return OK; }
ret_t nvmlDeviceGetMaxPcieLinkWidth(void *d, unsigned *v) { GUARD(d); *v = 16; return OK; }

ret_t nvmlDeviceGetNvLinkState(void *d, unsigned link, int *active) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    if (link > 2) return INVALID_ARGUMENT;  /* this "H100" has three links */
    *active = link == 1 ? 0 : 1;
    return OK;
}

ret_t nvmlEventSetCreate(void **set) {
    event_set_t *s = calloc(1, sizeof *s);
    if (!s) return 999;
    *set = s;
    return OK;
}

ret_t nvmlDeviceRegisterEvents(void *d, unsigned long long types, void *set) {
    GUARD(d);
    if (!(types & 0x8ULL)) return NOT_SUPPORTED;  /* nvmlEventTypeXidCriticalError */
    ((event_set_t *)set)->registered[idx(d)] = 1;
    return OK;
}

ret_t nvmlEventSetWait_v2(void *set, event_data_t *data, unsigned timeout_ms) {
    event_set_t *s = set;
    if (s->delivered || !s->registered[1]) { usleep(timeout_ms * 1000); return TIMEOUT; }
    s->delivered = 1;
    memset(data, 0, sizeof *data);
    data->device = &devices[1];
    data->eventType = 0x8ULL;
    data->eventData = 79;
    return OK;
}

ret_t nvmlEventSetFree(void *set) { free(set); return OK; }

/* dcgm-exporter's staples ---------------------------------------------------------------- */
typedef struct { unsigned gpu, memory; } utilization_t;
ret_t nvmlDeviceGetUtilizationRates(void *d, utilization_t *u) {
    GUARD(d);
    u->gpu = idx(d) ? 0 : 97; u->memory = idx(d) ? 0 : 41;
    return OK;
}

ret_t nvmlDeviceGetEncoderUtilization(void *d, unsigned *util, unsigned *period_us) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    *util = 3; *period_us = 167000;
    return OK;
}

ret_t nvmlDeviceGetDecoderUtilization(void *d, unsigned *util, unsigned *period_us) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    *util = 5; *period_us = 167000;
    return OK;
}

typedef struct { unsigned version; unsigned long long total, reserved, free, used; } memory_v2_t;
#define MEMORY_V2 (unsigned)(sizeof(memory_v2_t) | (2 << 24))
ret_t nvmlDeviceGetMemoryInfo_v2(void *d, memory_v2_t *m) {
    GUARD(d);
    if (m->version != MEMORY_V2) return INVALID_ARGUMENT;  /* as the real library checks it */
    const unsigned long long MiB = 1024ULL * 1024ULL;
    m->total = 81920 * MiB;
    m->reserved = idx(d) ? 0 : 512 * MiB;
    m->used = idx(d) ? 0 : 1024 * MiB;
    m->free = m->total - m->reserved - m->used;
    return OK;
}

ret_t nvmlDeviceGetTotalEnergyConsumption(void *d, unsigned long long *mj) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    *mj = 123456789ULL;
    return OK;
}

ret_t nvmlDeviceGetPcieReplayCounter(void *d, unsigned *n) { GUARD(d); *n = idx(d) ? 0 : 2; return OK; }

typedef struct {
    unsigned fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned valueType, nvmlReturn;
    union { double d; unsigned ui; unsigned long ul; unsigned long long ull; long long sll; int si; } value;
} field_value_t;
enum { FI_DEV_MEMORY_TEMP = 82, VALUE_TYPE_UNSIGNED_INT = 1 };
ret_t nvmlDeviceGetFieldValues(void *d, int count, field_value_t *values) {
    GUARD(d);
    for (int i = 0; i < count; i++) {
        values[i].timestamp = 1; values[i].latencyUsec = 0;
        if (values[i].fieldId != FI_DEV_MEMORY_TEMP || idx(d) == 1) { values[i].nvmlReturn = NOT_SUPPORTED; continue; }
        values[i].nvmlReturn = OK;
        values[i].valueType = VALUE_TYPE_UNSIGNED_INT;
        values[i].value.ui = 71;
    }
    return OK;
}

ret_t nvmlDeviceGetNvLinkErrorCounter(void *d, unsigned link, int counter, unsigned long long *n) {
    GUARD(d);
    if (idx(d) == 1) return NOT_SUPPORTED;
    if (link > 2) return INVALID_ARGUMENT;
    switch (counter) {
    case 0: *n = link; break;                    /* DL_REPLAY */
    case 1: *n = 0; break;                       /* DL_RECOVERY */
    case 2: *n = link == 1 ? 42 : 0; break;      /* DL_CRC_FLIT */
    case 3: *n = 1; break;                       /* DL_CRC_DATA */
    default: return INVALID_ARGUMENT;
    }
    return OK;
}
