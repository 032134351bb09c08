// Multifd bytes as QEMU's send side writes them (migration/multifd.c, multifd-nocomp.c):
// the MultiFDInit_t handshake (spec §1.3) and the 1344-byte MultiFDPacket_t header (spec §2.2).
// Field names follow multifd.h; every integer is big-endian.

import assert from 'node:assert/strict';
import {
  MULTIFD_FLAG_NOCOMP,
  MULTIFD_INIT_LEN,
  MULTIFD_MAGIC,
  MULTIFD_PACKET_FIXED_LEN,
  MULTIFD_PACKET_HEADER_LEN,
  MULTIFD_PAGES_PER_PACKET,
  MULTIFD_RAMBLOCK_LEN,
  MULTIFD_VERSION,
} from '../wire/constants.js';

const TWO_32 = 2 ** 32;

// Byte offsets inside MultiFDPacket_t (spec §2.2).
const OFF_FLAGS = 8;
const OFF_PAGES_ALLOC = 12;
const OFF_NORMAL_PAGES = 16;
const OFF_NEXT_PACKET_SIZE = 20;
const OFF_PACKET_NUM = 24;
const OFF_ZERO_PAGES = 32;               // 7.2: high half of unused[0], always 0
const OFF_RAMBLOCK = 64;
const OFF_OFFSETS = MULTIFD_PACKET_FIXED_LEN;

/** Fields of MultiFDInit_t; `uuid` defaults to all zero (source started without -uuid). */
export interface MultiFDInitFields {
  uuid?: Uint8Array;
  id: number;
}

/** `multifd_send_initial_packet()`: 64 bytes, magic, version 1, uuid, u8 id, zero padding. */
export function encodeMultiFDInit(f: MultiFDInitFields): Buffer {
  assert(Number.isInteger(f.id) && f.id >= 0 && f.id <= 255, 'multifd id must fit a u8');
  const b = Buffer.alloc(MULTIFD_INIT_LEN);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  if (f.uuid !== undefined) {
    assert(f.uuid.length === 16, 'uuid must be 16 bytes');
    b.set(f.uuid, 8);
  }
  b[24] = f.id;
  return b;
}

/** Fields of one MultiFDPacket_t RAM header. */
export interface MultiFDPacketHeaderFields {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  /** 9.0+ only; a 7.2 sender has no such field and its bytes are 0. */
  zeroPages?: number;
  nextPacketSize: number;
  packetNum: number;
  ramblock: string;
  /** Byte offsets in the block: normal pages first, then zero pages. */
  offsets: ArrayLike<number>;
  /**
   * The offset array left over from earlier packets (7.2 reuses its packet buffer): slot k for
   * k >= offsets.length gets staleOffsets[k]. Omitted: unused slots are zero (9.1+).
   */
  staleOffsets?: ArrayLike<number>;
}

/** A fresh 1344-byte RAM packet header (`multifd_send_fill_packet()`). */
export function encodeMultiFDPacketHeader(f: MultiFDPacketHeaderFields): Buffer {
  const b = Buffer.alloc(MULTIFD_PACKET_HEADER_LEN);
  b.writeUInt32BE(MULTIFD_MAGIC, 0);
  b.writeUInt32BE(MULTIFD_VERSION, 4);
  b.writeUInt32BE(f.flags >>> 0, OFF_FLAGS);
  b.writeUInt32BE(f.pagesAlloc, OFF_PAGES_ALLOC);
  b.writeUInt32BE(f.normalPages, OFF_NORMAL_PAGES);
  b.writeUInt32BE(f.nextPacketSize, OFF_NEXT_PACKET_SIZE);
  writeBe64(b, OFF_PACKET_NUM, f.packetNum);
  b.writeUInt32BE(f.zeroPages ?? 0, OFF_ZERO_PAGES);
  writeRamblock(b, f.ramblock);
  assert(f.offsets.length <= MULTIFD_PAGES_PER_PACKET, 'more offsets than a packet has slots');
  for (let k = 0; k < f.offsets.length; k++) writeBe64(b, OFF_OFFSETS + 8 * k, f.offsets[k]!);
  const stale = f.staleOffsets;
  if (stale !== undefined) {
    const end = Math.min(stale.length, MULTIFD_PAGES_PER_PACKET);
    for (let k = f.offsets.length; k < end; k++) writeBe64(b, OFF_OFFSETS + 8 * k, stale[k]!);
  }
  return b;
}

/** What one fill of a channel's packet buffer writes; `undefined` means "left as it was". */
export interface MultiFDPacketFill {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  zeroPages: number;
  /** 7.2 rewrites next_packet_size only when the packet has pages. */
  nextPacketSize: number | undefined;
  packetNum: number;
  /** 7.2 copies the block name only when the packet has a block. */
  ramblock: string | undefined;
  /** Slots [0, count) of offsets are written. */
  offsets: ArrayLike<number>;
  count: number;
}

/** How a channel treats its packet buffer between packets. */
export interface MultiFDPacketImageOptions {
  /** 9.1+: the buffer is zeroed before every fill. */
  clearEachFill: boolean;
  /** 7.2: next_packet_size and ramblock keep the previous packet's values when not rewritten. */
  staleFields?: boolean;
  /** 7.2: offset slots past the used ones keep values from earlier packets. */
  staleOffsets?: boolean;
}

/**
 * A multifd channel's reused packet buffer (`p->packet`). A 7.2 sender fills the same buffer
 * for every packet and never clears it, which is where stale next_packet_size, ramblock and
 * offsets come from (spec §2.9); 9.1+ clears it first.
 */
export class MultiFDPacketImage {
  /** The current 1344 header bytes; valid until the next fill(). */
  readonly header: Buffer = Buffer.alloc(MULTIFD_PACKET_HEADER_LEN);
  readonly #opts: MultiFDPacketImageOptions;
  #usedSlots = 0;                      // slots written by the last fill, cleared by the next one

  constructor(opts: MultiFDPacketImageOptions) {
    this.#opts = opts;
    this.header.writeUInt32BE(MULTIFD_MAGIC, 0);
    this.header.writeUInt32BE(MULTIFD_VERSION, 4);
  }

  /** Write one packet's fields into the buffer and return the header bytes. */
  fill(f: MultiFDPacketFill): Buffer {
    const b = this.header;
    const o = this.#opts;
    assert(f.count <= MULTIFD_PAGES_PER_PACKET, 'more offsets than a packet has slots');
    if (o.clearEachFill) {
      b.fill(0, 8);
      this.#usedSlots = 0;
    }
    b.writeUInt32BE(f.flags >>> 0, OFF_FLAGS);
    b.writeUInt32BE(f.pagesAlloc, OFF_PAGES_ALLOC);
    b.writeUInt32BE(f.normalPages, OFF_NORMAL_PAGES);
    if (f.nextPacketSize !== undefined) b.writeUInt32BE(f.nextPacketSize, OFF_NEXT_PACKET_SIZE);
    else if (o.staleFields !== true) b.writeUInt32BE(0, OFF_NEXT_PACKET_SIZE);
    writeBe64(b, OFF_PACKET_NUM, f.packetNum);
    b.writeUInt32BE(f.zeroPages, OFF_ZERO_PAGES);
    if (f.ramblock !== undefined) writeRamblock(b, f.ramblock);
    else if (o.staleFields !== true) b.fill(0, OFF_RAMBLOCK, OFF_RAMBLOCK + MULTIFD_RAMBLOCK_LEN);
    for (let k = 0; k < f.count; k++) writeBe64(b, OFF_OFFSETS + 8 * k, f.offsets[k]!);
    if (o.staleOffsets !== true) {
      if (this.#usedSlots > f.count) b.fill(0, OFF_OFFSETS + 8 * f.count, OFF_OFFSETS + 8 * this.#usedSlots);
      this.#usedSlots = f.count;
    }
    return b;
  }
}

/**
 * Per-channel payload encoder: the extension point for multifd compression. A channel keeps its
 * encoder for the whole session, because zlib/zstd payloads are slices of one stream per
 * channel (spec §2.5). `encode` gets the packet's normal pages in offset order.
 */
export interface MultiFDEncoder {
  /** Method bits for the flags word (MULTIFD_FLAG_NOCOMP, ZLIB, ZSTD, ...). */
  readonly methodFlag: number;
  encode(pages: Buffer[]): Buffer;
}

/** `multifd-compression none`: the payload is the pages, back to back (spec §2.5.1). */
export class NoCompEncoder implements MultiFDEncoder {
  readonly methodFlag = MULTIFD_FLAG_NOCOMP;
  encode(pages: Buffer[]): Buffer {
    return Buffer.concat(pages);
  }
}

function writeBe64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / TWO_32), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

// strncpy(ramblock, idstr, 256): the name, then NULs to the end of the field.
function writeRamblock(b: Buffer, name: string): void {
  const n = b.write(name, OFF_RAMBLOCK, MULTIFD_RAMBLOCK_LEN, 'latin1');
  b.fill(0, OFF_RAMBLOCK + n, OFF_RAMBLOCK + MULTIFD_RAMBLOCK_LEN);
}
