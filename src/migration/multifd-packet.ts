import { hex, wireError } from '../errors.js';
import { Reader } from '../wire/reader.js';
import {
  MULTIFD_FLAG_COMPRESSION_MASK, MULTIFD_FLAG_DEVICE_STATE, MULTIFD_FLAG_NOCOMP, MULTIFD_FLAG_QATZIP,
  MULTIFD_FLAG_QPL, MULTIFD_FLAG_UADK, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MULTIFD_MAGIC,
  MULTIFD_PAGES_PER_PACKET, MULTIFD_RAMBLOCK_LEN, MULTIFD_VERSION,
} from '../wire/constants.js';

/** MultiFDInit_t (spec §1.3): the first 64 bytes of every multifd connection. */
export interface MultiFDInit { magic: number; version: number; uuid: Buffer; id: number }

/** Decodes MultiFDInit_t; the caller checks id range, duplicates and uuid (spec §1.4). */
export function decodeMultiFDInit(b: Buffer, channel: string, at = 0): MultiFDInit {
  const r = new Reader(b);
  const magic = r.u32();
  if (magic !== MULTIFD_MAGIC) throw wireError('ERR_BAD_MAGIC', `multifd: received packet magic ${hex(magic)} expected ${hex(MULTIFD_MAGIC)}`, channel, at);
  const version = r.u32();
  if (version !== MULTIFD_VERSION) throw wireError('ERR_BAD_VERSION', `multifd: received packet version ${version} expected ${MULTIFD_VERSION}`, channel, at);
  const uuid = Buffer.from(r.bytes(16));
  const id = r.u8();
  return { magic, version, uuid, id };
}

/** MultiFDPacket_t header (spec §2.2), identical in 7.2 and 10.x apart from zero_pages. */
export interface MultiFDPacket {
  flags: number;
  pagesAlloc: number;
  normalPages: number;
  zeroPages: number;
  nextPacketSize: number;
  packetNum: number;
  ramblock: string;
  /** offset[] slots [0, normalPages + zeroPages), as page indexes (offset / 4096); the rest is stale in 7.2. */
  offsets: number[];
  /** Payload bytes that follow: 0 without pages (7.2's stale next_packet_size ignored, spec §2.4). */
  payloadLen: number;
}

export type Compression = 'none' | 'zlib' | 'zstd';
export const COMPRESSION_FLAG: Record<Compression, number> = { none: MULTIFD_FLAG_NOCOMP, zlib: MULTIFD_FLAG_ZLIB, zstd: MULTIFD_FLAG_ZSTD };

/** 12-byte common header (10.0+ reads it first; 7.2 reads all 1344 at once: the same bytes). */
export function checkPacketCommon(b: Buffer, channel: string, at: number): number {
  const magic = b.readUInt32BE(0);
  if (magic !== MULTIFD_MAGIC) throw wireError('ERR_BAD_MAGIC', `${channel}: received packet magic ${hex(magic)} and expected magic ${hex(MULTIFD_MAGIC)}`, channel, at);
  const version = b.readUInt32BE(4);
  if (version !== MULTIFD_VERSION) throw wireError('ERR_BAD_VERSION', `${channel}: received packet version ${version} and expected version ${MULTIFD_VERSION}`, channel, at);
  const flags = b.readUInt32BE(8);
  if (flags & MULTIFD_FLAG_DEVICE_STATE) throw wireError('ERR_UNSUPPORTED', `${channel}: device-state packet (VFIO multifd device state) is not supported`, channel, at);
  return flags;
}

/**
 * Decodes and validates a complete 1344-byte RAM packet header in QEMU's order
 * (multifd_ram_unfill_packet, spec §2.8) except the block lookup and offset bound, which need
 * the block list and are done by the channel.
 */
export function decodeMultiFDPacket(b: Buffer, channel: string, at: number, compression: Compression, maxPayload: number): MultiFDPacket {
  const flags = checkPacketCommon(b, channel, at);
  const r = new Reader(b);
  r.skip(12);
  const pagesAlloc = r.u32(), normalPages = r.u32(), nextPacketSize = r.u32();
  const packetNum = r.u64();
  const zeroPages = r.u32();
  r.skip(4 + 3 * 8);
  const ramblock = r.cstring(MULTIFD_RAMBLOCK_LEN);
  if (pagesAlloc > MULTIFD_PAGES_PER_PACKET) throw wireError('ERR_LIMIT', `${channel}: received packet with size ${pagesAlloc} and expected a size of ${MULTIFD_PAGES_PER_PACKET}`, channel, at + 12);
  if (normalPages > pagesAlloc) throw wireError('ERR_LIMIT', `${channel}: received packet with ${normalPages} pages and expected maximum pages are ${pagesAlloc}`, channel, at + 16);
  if (zeroPages > pagesAlloc - normalPages) throw wireError('ERR_LIMIT', `${channel}: received packet with ${zeroPages} zero pages, expected maximum ${pagesAlloc - normalPages}`, channel, at + 32);
  const method = flags & MULTIFD_FLAG_COMPRESSION_MASK;
  // 7.2 puts method bits only on packets with normal pages; 9.0+ on every page-carrying packet.
  if (normalPages > 0 || (zeroPages > 0 && method !== 0)) {
    const expected = COMPRESSION_FLAG[compression];
    if (method !== expected) {
      const unsupported = method === MULTIFD_FLAG_QPL || method === MULTIFD_FLAG_UADK || method === MULTIFD_FLAG_QATZIP;
      throw wireError(unsupported ? 'ERR_UNSUPPORTED' : 'ERR_BAD_VERSION', `${channel}: flags received ${hex(flags, 2)} flags expected ${hex(expected, 2)} (compression)`, channel, at + 8);
    }
  }
  const n = normalPages + zeroPages;
  const offsets = new Array<number>(n);
  for (let k = 0; k < n; k++) {
    const hi = r.u32(), lo = r.u32();
    if (hi > 0x1f_ffff) throw wireError('ERR_RANGE', `${channel}: offset too long 0x${hex(hi)}${hex(lo)}`, channel, at + 320 + 8 * k);
    offsets[k] = hi * 2 ** 32 + lo;
  }
  let payloadLen = 0;
  if (normalPages > 0) {
    if (compression === 'none') payloadLen = normalPages * 4096;
    else {
      if (nextPacketSize === 0 || nextPacketSize > maxPayload) throw wireError('ERR_LIMIT', `${channel}: compressed payload of ${nextPacketSize} bytes, max ${maxPayload}`, channel, at + 20);
      payloadLen = nextPacketSize;
    }
  }
  return { flags, pagesAlloc, normalPages, zeroPages, nextPacketSize, packetNum, ramblock, offsets, payloadLen };
}
