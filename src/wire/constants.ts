// QEMU's wire constants under QEMU's own names, so `grep` works in both trees.
// Sources: migration/savevm.c, migration/ram.c (ram.h from 10.0), migration/multifd.h,
// qapi/migration.json (COLOMessage). Spec references: docs/qemu-migration-protocol.md.

/** Target page size on x86 (TARGET_PAGE_SIZE); every wire offset is a multiple of it. */
export const TARGET_PAGE_SIZE = 4096;
export const TARGET_PAGE_BITS = 12;

// --- savevm stream (main channel), spec §4 ---
export const QEMU_VM_FILE_MAGIC = 0x5145564d; // "QEVM"
export const QEMU_VM_FILE_VERSION_COMPAT = 0x00000002;
export const QEMU_VM_FILE_VERSION = 0x00000003;

export const QEMU_VM_EOF = 0x00;
export const QEMU_VM_SECTION_START = 0x01;
export const QEMU_VM_SECTION_PART = 0x02;
export const QEMU_VM_SECTION_END = 0x03;
export const QEMU_VM_SECTION_FULL = 0x04;
export const QEMU_VM_SUBSECTION = 0x05;
export const QEMU_VM_VMDESCRIPTION = 0x06;
export const QEMU_VM_CONFIGURATION = 0x07;
export const QEMU_VM_COMMAND = 0x08;
export const QEMU_VM_SECTION_FOOTER = 0x7e;

// enum qemu_vm_cmd (savevm.c)
export const MIG_CMD_INVALID = 0;
export const MIG_CMD_OPEN_RETURN_PATH = 1;
export const MIG_CMD_PING = 2;
export const MIG_CMD_POSTCOPY_ADVISE = 3;
export const MIG_CMD_POSTCOPY_LISTEN = 4;
export const MIG_CMD_POSTCOPY_RUN = 5;
export const MIG_CMD_POSTCOPY_RAM_DISCARD = 6;
export const MIG_CMD_PACKAGED = 7;
export const MIG_CMD_ENABLE_COLO = 8;
export const MIG_CMD_POSTCOPY_RESUME = 9;
export const MIG_CMD_RECV_BITMAP = 10;
export const MIG_CMD_SWITCHOVER_START = 11;
export const MIG_CMD_MAX = 12;

// enum mig_rp_message_type (migration.c), the return path of spec §4.8
export const MIG_RP_MSG_SHUT = 1;
export const MIG_RP_MSG_PONG = 2;

// --- ram section, spec §4.6 ---
export const RAM_SAVE_FLAG_FULL = 0x01;
export const RAM_SAVE_FLAG_ZERO = 0x02;
export const RAM_SAVE_FLAG_MEM_SIZE = 0x04;
export const RAM_SAVE_FLAG_PAGE = 0x08;
export const RAM_SAVE_FLAG_EOS = 0x10;
export const RAM_SAVE_FLAG_CONTINUE = 0x20;
export const RAM_SAVE_FLAG_XBZRLE = 0x40;
export const RAM_SAVE_FLAG_HOOK = 0x80;
export const RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100;
export const RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200;
/** The only `ram` section version QEMU accepts (ram_load: version_id 4). */
export const RAM_SECTION_VERSION = 4;

// --- multifd, spec §1.3 and §2 ---
export const MULTIFD_MAGIC = 0x11223344;
export const MULTIFD_VERSION = 1;
export const MULTIFD_FLAG_SYNC = 1 << 0;
export const MULTIFD_FLAG_COMPRESSION_MASK_72 = 0x0e;
export const MULTIFD_FLAG_COMPRESSION_MASK = 0x3e;
export const MULTIFD_FLAG_NOCOMP = 0 << 1;
export const MULTIFD_FLAG_ZLIB = 1 << 1;
export const MULTIFD_FLAG_ZSTD = 2 << 1;
export const MULTIFD_FLAG_QPL = 4 << 1;
export const MULTIFD_FLAG_UADK = 8 << 1;
export const MULTIFD_FLAG_QATZIP = 16 << 1;
export const MULTIFD_FLAG_DEVICE_STATE = 1 << 6;
/** 512 KiB of pages per packet (MULTIFD_PACKET_SIZE). */
export const MULTIFD_PACKET_SIZE = 512 * 1024;
export const MULTIFD_PAGES_PER_PACKET = MULTIFD_PACKET_SIZE / TARGET_PAGE_SIZE; // 128
/** sizeof(MultiFDInit_t). */
export const MULTIFD_INIT_LEN = 64;
/** MultiFDPacket_t up to offset[]: magic..ramblock[256]. */
export const MULTIFD_PACKET_FIXED_LEN = 320;
/** Whole RAM packet header with the 128-slot offset array: 320 + 8 * 128. */
export const MULTIFD_PACKET_HEADER_LEN = MULTIFD_PACKET_FIXED_LEN + 8 * MULTIFD_PAGES_PER_PACKET; // 1344
/** 10.0+: MultiFDPacketHdr_t read first (magic, version, flags). */
export const MULTIFD_PACKET_COMMON_HEADER_LEN = 12;
export const MULTIFD_DEVICE_STATE_HEADER_LEN = 276;
export const MULTIFD_RAMBLOCK_LEN = 256;

// --- COLO, spec §5.2 (enum COLOMessage) ---
export const COLO_MESSAGE_CHECKPOINT_READY = 0;
export const COLO_MESSAGE_CHECKPOINT_REQUEST = 1;
export const COLO_MESSAGE_CHECKPOINT_REPLY = 2;
export const COLO_MESSAGE_VMSTATE_SEND = 3;
export const COLO_MESSAGE_VMSTATE_SIZE = 4;
export const COLO_MESSAGE_VMSTATE_RECEIVED = 5;
export const COLO_MESSAGE_VMSTATE_LOADED = 6;
export const COLO_MESSAGE__MAX = 7;

export const COLO_MESSAGE_NAMES = [
  'CHECKPOINT_READY', 'CHECKPOINT_REQUEST', 'CHECKPOINT_REPLY', 'VMSTATE_SEND',
  'VMSTATE_SIZE', 'VMSTATE_RECEIVED', 'VMSTATE_LOADED',
] as const;
