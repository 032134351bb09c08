/** Every way a migration can be refused. Tests check `code`, never message text. */
export type MigrationErrorCode =
  | 'ERR_BAD_MAGIC'        // wrong QEVM / multifd magic, or an unknown channel magic
  | 'ERR_BAD_VERSION'      // stream, multifd or section version we do not accept
  | 'ERR_UNKNOWN_SECTION'  // unknown record type, section id, or footer mismatch
  | 'ERR_UNKNOWN_RAMBLOCK' // a block name not in the MEM_SIZE list
  | 'ERR_RANGE'            // offset outside a RAMBlock, address too large
  | 'ERR_LIMIT'            // a wire number above a configured cap
  | 'ERR_TRUNCATED'        // EOF inside a record, packet or checkpoint
  | 'ERR_UNSUPPORTED'      // a valid QEMU feature this receiver does not implement
  | 'ERR_HANDSHAKE'        // multifd id out of range, duplicated, or uuid mismatch
  | 'ERR_SYNC'             // barrier mismatch between channels and main channel
  | 'ERR_COLO_PROTOCOL'    // unexpected COLO message
  | 'ERR_DECOMPRESS'       // zlib/zstd payload does not decode to normal_pages pages
  | 'ERR_TIMEOUT'          // a peer stopped sending mid-record / mid-checkpoint
  | 'ERR_PEER'             // socket error or refused connection
  | 'ERR_WORKER'           // a page-writer task failed
  | 'ERR_NBD'              // an NBD peer broke the protocol (handshake, request, cap)
  | 'ERR_DISK';            // a replicated disk cannot commit (missed or failed writes, local I/O)

export class MigrationError extends Error {
  override name = 'MigrationError';
  constructor(
    readonly code: MigrationErrorCode,
    message: string,
    /** 'main' or 'multifd/N' (or 'multifd/?' before the handshake); 'nbd/NAME' or 'nbd/?' for disks. */
    readonly channel?: string,
    /** Byte offset in that channel's stream where the bad input starts. */
    readonly streamOffset?: number,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** Builds a MigrationError; parsers attach channel/offset through `at`. */
export function wireError(code: MigrationErrorCode, message: string, channel?: string, streamOffset?: number): MigrationError {
  return new MigrationError(code, message, channel, streamOffset);
}

/** Anything thrown on a channel's path as a MigrationError; not one already: ERR_WORKER (internal). */
export function toMigrationError(e: unknown, channel: string, at: number): MigrationError {
  if (e instanceof MigrationError) return e;
  return new MigrationError('ERR_WORKER', `${channel}: internal error: ${e instanceof Error ? e.message : String(e)}`, channel, at, { cause: e });
}

export function hex(n: number, width = 8): string {
  return n.toString(16).padStart(width, '0');
}
