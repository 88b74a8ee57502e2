/*
 * dcmi-sim: the subset of Huawei's DCMI API (libdcmi.so) that accelguard uses, declared for the
 * simulator. Written for dcmi-sim from the DCMI API reference (Ascend 910B DCMI API, "Return
 * Codes", and one page per function) and the struct layouts published with it; not copied from
 * Huawei's dcmi_interface_api.h. Names, values and layouts follow the reference so that a
 * program built against this header, or a ctypes binding written from the reference, works
 * against the real library too. See docs/dcmi-sim.md for what each function simulates.
 */
#ifndef DCMI_SIM_INTERFACE_API_H
#define DCMI_SIM_INTERFACE_API_H

#ifdef __cplusplus
extern "C" {
#endif

#define DCMIDLLEXPORT __attribute__((visibility("default")))

/* ---- return codes (DCMI API reference, "Return Codes") ------------------------------------- */

#define DCMI_OK 0
#define DCMI_ERR_CODE_INVALID_PARAMETER (-8001)
#define DCMI_ERR_CODE_OPER_NOT_PERMITTED (-8002)
#define DCMI_ERR_CODE_MEM_OPERATE_FAIL (-8003)
#define DCMI_ERR_CODE_SECURE_FUN_FAIL (-8004)
#define DCMI_ERR_CODE_INNER_ERR (-8005)
#define DCMI_ERR_CODE_TIME_OUT (-8006)
#define DCMI_ERR_CODE_INVALID_DEVICE_ID (-8007)
#define DCMI_ERR_CODE_DEVICE_NOT_EXIST (-8008)
#define DCMI_ERR_CODE_IOCTL_FAIL (-8009)
#define DCMI_ERR_CODE_SEND_MSG_FAIL (-8010)
#define DCMI_ERR_CODE_RECV_MSG_FAIL (-8011)
#define DCMI_ERR_CODE_NOT_REDAY (-8012) /* sic: the reference spells it REDAY */
#define DCMI_ERR_CODE_NOT_SUPPORT_IN_CONTAINER (-8013)
#define DCMI_ERR_CODE_RESET_FAIL (-8015)
#define DCMI_ERR_CODE_ABORT_OPERATE (-8016)
#define DCMI_ERR_CODE_IS_UPGRADING (-8017)
#define DCMI_ERR_CODE_RESOURCE_OCCUPIED (-8020)
#define DCMI_ERR_CODE_CONFIG_INFO_NOT_EXIST (-8023)
#define DCMI_ERR_CODE_NOT_SUPPORT (-8255)

/* ---- sizes -------------------------------------------------------------------------------- */

#define MAX_CHIP_NAME_LEN 32
#define TEMPLATE_NAME_LEN 32
#define DIE_ID_COUNT 5
#define DCMI_VDEV_RES_NAME_LEN 16
#define DCMI_VDEV_FOR_RESERVE 32
#define DCMI_VDEV_SIZE 20 /* bytes of the "vnpu resource" fields in dcmi_computing_resource */
#define DCMI_SOC_SPLIT_MAX 32

/* dcmi_create_vdev_res_stru.vdev_id / vfg_id: "allocate automatically". */
#define DCMI_VDEV_ID_AUTO 0xFFFFFFFFU
/* dcmi_set_destroy_vdevice: this vdev id destroys every vNPU of the chip (driver behaviour). */
#define DCMI_VDEV_ID_ALL 0xFFFFU
/* dcmi_get_device_health: "The device does not exist." */
#define DCMI_HEALTH_DEVICE_NOT_EXIST 0xFFFFFFFFU
/* dcmi_get_device_errorcode_v2 returns at most this many codes; errorcode_string needs >= 48. */
#define DCMI_ERROR_CODE_MAX_COUNT 128
#define DCMI_MIN_ERR_INFO_LEN 48

/* ---- enums -------------------------------------------------------------------------------- */

enum dcmi_unit_type { NPU_TYPE = 0, MCU_TYPE = 1, CPU_TYPE = 2, INVALID_TYPE = 0xFF };

enum dcmi_die_type { NDIE = 0, VDIE = 1 };

enum dcmi_main_cmd {
    DCMI_MAIN_CMD_DVPP = 0,
    DCMI_MAIN_CMD_CHIP_INF = 12,
    DCMI_MAIN_CMD_HCCS = 16,
    DCMI_MAIN_CMD_TEMP = 50,
    DCMI_MAIN_CMD_SVM = 51,
    DCMI_MAIN_CMD_VDEV_MNG = 52,
    DCMI_MAIN_CMD_SIO = 56,
    DCMI_MAIN_CMD_DEVICE_SHARE = 0x8001,
};

/* Sub-commands of DCMI_MAIN_CMD_VDEV_MNG. */
enum dcmi_vdev_mng_sub_cmd {
    DCMI_VMNG_SUB_CMD_GET_VDEV_RESOURCE = 0, /* buf: struct dcmi_vdev_query_stru */
    DCMI_VMNG_SUB_CMD_GET_TOTAL_RESOURCE = 1, /* buf: struct dcmi_soc_total_resource */
    DCMI_VMNG_SUB_CMD_GET_FREE_RESOURCE = 2, /* buf: struct dcmi_soc_free_resource */
    DCMI_VMNG_SUB_CMD_SET_SRIOV_SWITCH = 3,
    DCMI_VMNG_SUB_CMD_GET_VDEV_ACTIVITY = 5,
};

/* ---- structures --------------------------------------------------------------------------- */

struct dcmi_chip_info {
    unsigned char chip_type[MAX_CHIP_NAME_LEN];
    unsigned char chip_name[MAX_CHIP_NAME_LEN];
    unsigned char chip_ver[MAX_CHIP_NAME_LEN];
    unsigned int aicore_cnt;
};

struct dcmi_chip_info_v2 {
    unsigned char chip_type[MAX_CHIP_NAME_LEN];
    unsigned char chip_name[MAX_CHIP_NAME_LEN];
    unsigned char chip_ver[MAX_CHIP_NAME_LEN];
    unsigned int aicore_cnt;
    unsigned char npu_name[MAX_CHIP_NAME_LEN];
};

struct dcmi_die_id {
    unsigned int soc_die[DIE_ID_COUNT];
};

/* dcmi_get_memory_info (V1 interface). */
struct dcmi_memory_info_stru {
    unsigned long long memory_size; /* MB */
    unsigned int freq;              /* MHz */
    unsigned int utiliza;           /* % */
};

/* dcmi_get_device_memory_info_v3. */
struct dcmi_get_memory_info_stru {
    unsigned long long memory_size;      /* MB */
    unsigned long long memory_available; /* MB: free + hugepages_free * hugepagesize */
    unsigned int freq;                   /* MHz */
    unsigned long hugepagesize;          /* KB */
    unsigned long hugepages_total;
    unsigned long hugepages_free;
    unsigned int utiliza; /* % */
    unsigned char reserve[60];
};

struct dcmi_hbm_info {
    unsigned long long memory_size;  /* MB */
    unsigned int freq;               /* MHz */
    unsigned long long memory_usage; /* MB */
    int temp;                        /* degrees C */
    unsigned int bandwith_util_rate; /* % (sic) */
};

struct dcmi_base_resource {
    unsigned long long token;
    unsigned long long token_max;
    unsigned long long task_timeout;
    unsigned int vfg_id;
    unsigned char vip_mode;
    unsigned char reserved[DCMI_VDEV_FOR_RESERVE - 1];
};

struct dcmi_computing_resource {
    /* accelerator resource */
    float aic;
    float aiv;
    unsigned short dsa;
    unsigned short rtsq;
    unsigned short acsq;
    unsigned short cdqm;
    unsigned short c_core;
    unsigned short ffts;
    unsigned short sdma;
    unsigned short pcie_dma;
    /* memory resource, MB */
    unsigned long long memory_size;
    /* id resource */
    unsigned int event_id;
    unsigned int notify_id;
    unsigned int stream_id;
    unsigned int model_id;
    /* cpu resource */
    unsigned short topic_schedule_aicpu;
    unsigned short host_ctrl_cpu;
    unsigned short host_aicpu;
    unsigned short device_aicpu;
    unsigned short topic_ctrl_cpu_slot;
    /* vnpu resource */
    unsigned int vdev_aicore_utilization;
    unsigned long long vdev_memory_total;
    unsigned long long vdev_memory_free;
    unsigned char reserved[DCMI_VDEV_FOR_RESERVE - DCMI_VDEV_SIZE];
};

struct dcmi_media_resource {
    float jpegd;
    float jpege;
    float vpc;
    float vdec;
    float pngd;
    float venc;
    unsigned char reserved[DCMI_VDEV_FOR_RESERVE];
};

struct dcmi_create_vdev_res_stru {
    unsigned int vdev_id; /* DCMI_VDEV_ID_AUTO, or a free id of this chip */
    unsigned int vfg_id;  /* reserved: DCMI_VDEV_ID_AUTO */
    char template_name[TEMPLATE_NAME_LEN];
    unsigned char reserved[64];
};

struct dcmi_create_vdev_out {
    unsigned int vdev_id;
    unsigned int pcie_bus; /* reserved */
    unsigned int pcie_device;
    unsigned int pcie_func;
    unsigned int vfg_id;
    unsigned char reserved[DCMI_VDEV_FOR_RESERVE];
};

struct dcmi_vdev_query_info {
    char name[DCMI_VDEV_RES_NAME_LEN];
    unsigned int status;
    unsigned int is_container_used;
    unsigned int vfid;
    unsigned int vfg_id;
    unsigned long long container_id;
    struct dcmi_base_resource base;
    struct dcmi_computing_resource computing;
    struct dcmi_media_resource media;
};

/* DCMI_VMNG_SUB_CMD_GET_VDEV_RESOURCE: vdev_id is the input. */
struct dcmi_vdev_query_stru {
    unsigned int vdev_id;
    struct dcmi_vdev_query_info query_info;
};

struct dcmi_soc_free_resource {
    unsigned int vfg_num;
    unsigned int vfg_bitmap;
    struct dcmi_base_resource base;
    struct dcmi_computing_resource computing;
    struct dcmi_media_resource media;
};

struct dcmi_soc_total_resource {
    unsigned int vdev_num;
    unsigned int vdev_id[DCMI_SOC_SPLIT_MAX];
    unsigned int vfg_num;
    unsigned int vfg_bitmap;
    struct dcmi_base_resource base;
    struct dcmi_computing_resource computing;
    struct dcmi_media_resource media;
};

/* ---- functions (DCMI API reference prototypes) -------------------------------------------- */

DCMIDLLEXPORT int dcmi_init(void);
DCMIDLLEXPORT int dcmi_get_dcmi_version(char *dcmi_ver, unsigned int len);
DCMIDLLEXPORT int dcmi_get_driver_version(char *driver_ver, unsigned int len);

DCMIDLLEXPORT int dcmi_get_card_list(int *card_num, int *card_list, int list_len);
DCMIDLLEXPORT int dcmi_get_card_num_list(int *card_num, int *card_list, int list_len);
DCMIDLLEXPORT int dcmi_get_device_num_in_card(int card_id, int *device_num);
DCMIDLLEXPORT int dcmi_get_device_id_in_card(int card_id, int *device_id_max, int *mcu_id,
                                             int *cpu_id);
DCMIDLLEXPORT int dcmi_get_device_type(int card_id, int device_id,
                                       enum dcmi_unit_type *device_type);
DCMIDLLEXPORT int dcmi_get_device_logic_id(int *device_logic_id, int card_id, int device_id);
DCMIDLLEXPORT int dcmi_get_device_phyid_from_logicid(unsigned int logicid, unsigned int *phyid);
DCMIDLLEXPORT int dcmi_get_device_logicid_from_phyid(unsigned int phyid, unsigned int *logicid);
DCMIDLLEXPORT int dcmi_get_card_id_device_id_from_logicid(int *card_id, int *device_id,
                                                          unsigned int device_logic_id);
DCMIDLLEXPORT int dcmi_get_card_id_device_id_from_phyid(int *card_id, int *device_id,
                                                        unsigned int device_phy_id);

DCMIDLLEXPORT int dcmi_get_device_chip_info(int card_id, int device_id,
                                            struct dcmi_chip_info *chip_info);
DCMIDLLEXPORT int dcmi_get_device_chip_info_v2(int card_id, int device_id,
                                               struct dcmi_chip_info_v2 *chip_info);
DCMIDLLEXPORT int dcmi_get_device_die_v2(int card_id, int device_id, enum dcmi_die_type input_type,
                                         struct dcmi_die_id *die_id);

DCMIDLLEXPORT int dcmi_get_device_health(int card_id, int device_id, unsigned int *health);
DCMIDLLEXPORT int dcmi_get_device_errorcode_v2(int card_id, int device_id, int *error_count,
                                               unsigned int *error_code_list,
                                               unsigned int list_len);
DCMIDLLEXPORT int dcmi_get_device_errorcode_string(int card_id, int device_id,
                                                   unsigned int error_code,
                                                   unsigned char *error_info, int buf_size);
DCMIDLLEXPORT int dcmi_get_device_temperature(int card_id, int device_id, int *temperature);
DCMIDLLEXPORT int dcmi_get_device_power_info(int card_id, int device_id, int *power);

DCMIDLLEXPORT int dcmi_get_memory_info(int card_id, int device_id,
                                       struct dcmi_memory_info_stru *device_memory_info);
DCMIDLLEXPORT int dcmi_get_device_memory_info_v3(int card_id, int device_id,
                                                 struct dcmi_get_memory_info_stru *memory_info);
DCMIDLLEXPORT int dcmi_get_device_hbm_info(int card_id, int device_id,
                                           struct dcmi_hbm_info *hbm_info);

DCMIDLLEXPORT int dcmi_get_device_info(int card_id, int device_id, enum dcmi_main_cmd main_cmd,
                                       unsigned int sub_cmd, void *buf, unsigned int *size);
DCMIDLLEXPORT int dcmi_create_vdevice(int card_id, int device_id,
                                      struct dcmi_create_vdev_res_stru *vdev,
                                      struct dcmi_create_vdev_out *out);
DCMIDLLEXPORT int dcmi_set_destroy_vdevice(int card_id, int device_id, unsigned int vdevid);

/* ---- dcmi-sim extensions (not in the real library) ---------------------------------------- */

/* The simulated memory a vNPU owns: bit u of *unit_mask set = memory unit u of the chip, of
 * *unit_count units in all (one per AI Core). For the simulated data plane only; production code
 * never calls it. DCMI_ERR_CODE_DEVICE_NOT_EXIST for a vdev id the chip does not have. */
DCMIDLLEXPORT int dcmisim_get_vdevice_units(int card_id, int device_id, unsigned int vdev_id,
                                            unsigned long long *unit_mask,
                                            unsigned int *unit_count);

#ifdef __cplusplus
}
#endif

#endif /* DCMI_SIM_INTERFACE_API_H */
