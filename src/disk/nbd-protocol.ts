// NBD wire constants (NetworkBlockDevice/nbd doc/proto.md), the subset a fixed-newstyle
// server needs for QEMU's NBD client. Numbers only: the server logic is in nbd-server.ts.

export const NBDMAGIC = 0x4e42444d41474943n;        // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n;        // "IHAVEOPT": newstyle negotiation, and each option's magic
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;     // option replies

// handshake flags (server) and client flags
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// options
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;
export const OPT_NAMES: Record<number, string> = {
  1: 'EXPORT_NAME', 2: 'ABORT', 3: 'LIST', 5: 'STARTTLS', 6: 'INFO', 7: 'GO', 8: 'STRUCTURED_REPLY',
  9: 'LIST_META_CONTEXT', 10: 'SET_META_CONTEXT', 11: 'EXTENDED_HEADERS',
};

// option reply types
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
const ERR = 2 ** 31;
export const NBD_REP_ERR_UNSUP = ERR + 1;
export const NBD_REP_ERR_POLICY = ERR + 2;
export const NBD_REP_ERR_INVALID = ERR + 3;
export const NBD_REP_ERR_UNKNOWN = ERR + 6;
export const NBD_REP_ERR_TOO_BIG = ERR + 9;

// NBD_REP_INFO types
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// transmission flags
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;

// requests and simple replies
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const REQUEST_BYTES = 28;
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;
export const CMD_NAMES: Record<number, string> = {
  0: 'READ', 1: 'WRITE', 2: 'DISC', 3: 'FLUSH', 4: 'TRIM', 5: 'CACHE', 6: 'WRITE_ZEROES', 7: 'BLOCK_STATUS', 8: 'RESIZE',
};
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;

// errno values in simple replies
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** QEMU's client never sends more than 32 MiB per request (NBD_MAX_BUFFER_SIZE); we advertise it. */
export const NBD_MAX_REQUEST = 32 << 20;
/** Export names are at most 4096 bytes (proto.md); option payloads beyond this are refused. */
export const NBD_MAX_OPTION = 4096 + 64;
