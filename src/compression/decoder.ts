// Receive side of multifd-compression zlib and zstd (spec §2.5.2, §2.5.3; QEMU's
// zlib_recv_pages() and zstd_recv_pages()). Each channel carries ONE endless compressed stream:
// its payloads are slices of it, flushed at each packet's end and never reset, so a channel
// needs one decoder for its whole life, fed its packets in order, on one thread (spec §2.10).
// This module is that decoder and the task a channel's decoder thread runs per packet.
import assert from 'node:assert/strict';
import { MigrationError, type MigrationErrorCode } from '../errors.js';
import { SLOT_INDEX_BYTES } from '../memory/page-writer.js';
import { slotRunLength, SlotMemory, type SlotChunks } from '../memory/slab.js';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { Z_SYNC_FLUSH, ZlibStream } from './zlib-stream.js';
import { zstd, ZSTD_WINDOWLOG_MAX } from './zstd.js';

export type CompressionMethod = 'zlib' | 'zstd';

/**
 * One compressed multifd packet for the channel's decoder thread: the staging slot holds the
 * destination page slots of the normal pages and then `payloadLen` compressed bytes (spec
 * §2.4: next_packet_size). The main thread chose the slots (and recorded the zero pages)
 * as for an uncompressed packet.
 */
export interface DecodeTask {
  op: 'decode';
  /** The stream this payload continues: one channel of one migration. */
  key: string;
  method: CompressionMethod;
  /** This channel's packets with pages, counted from 0: the decoder checks it sees each once, in order. */
  seq: number;
  /** 'multifd/N', for messages. */
  channel: string;
  mem: SlotChunks;
  staging: SharedArrayBuffer;
  slotOffset: number;
  normalPages: number;
  payloadLen: number;
}

/** A MigrationError does not survive postMessage with its code; a failed task returns this instead. */
export interface DecodeFailure { code: MigrationErrorCode; message: string }
/** Pages written, or why the packet was refused. */
export type DecodeResult = number | DecodeFailure;

/** One call of a streaming decompressor: src[srcAt, srcEnd) -> dst[dstAt, dstEnd). */
interface StreamStep {
  /** Bytes written to dst and read from src by the last call. */
  produced: number;
  consumed: number;
  step(src: Uint8Array, srcAt: number, srcEnd: number, dst: Uint8Array, dstAt: number, dstEnd: number): void;
}

// inflate() with Z_SYNC_FLUSH on the caller's buffers, as zlib_recv_pages() calls it per page.
class ZlibStep implements StreamStep {
  produced = 0;
  consumed = 0;
  readonly #z = new ZlibStream('inflate');
  step(src: Uint8Array, srcAt: number, srcEnd: number, dst: Uint8Array, dstAt: number, dstEnd: number): void {
    this.#z.write(Z_SYNC_FLUSH, src, srcAt, srcEnd - srcAt, dst, dstAt, dstEnd - dstAt);
    this.produced = this.#z.produced;
    this.consumed = this.#z.consumed;
  }
}

// ZSTD_decompressStream() as zstd_recv_pages() calls it per page. zstd decodes a block into
// its own window buffer and copies out of it, so dst may be any page: no scratch of ours.
class ZstdStep implements StreamStep {
  produced = 0;
  consumed = 0;
  readonly #d = new zstd.DCtx();
  constructor() { this.#d.setParameter(zstd.DParameter.windowLogMax, ZSTD_WINDOWLOG_MAX); }
  step(src: Uint8Array, srcAt: number, srcEnd: number, dst: Uint8Array, dstAt: number, dstEnd: number): void {
    const r = this.#d.decompressStream(dst.subarray(dstAt, dstEnd), src.subarray(srcAt, srcEnd));
    this.produced = r[1];
    this.consumed = r[2];
  }
}

/**
 * One channel's stream decoder. `decodePacket` takes one payload and fills exactly
 * `normalPages` pages; anything else is ERR_DECOMPRESS (QEMU: "packet size received %u size
 * expected %u", or the library's error). The decoder writes only into the packet's own
 * pages: the only output buffers it is given are spans of consecutive listed pages, and
 * bytes past the last page go to a scratch page, never into memory. After an error the
 * stream is unusable and every later packet is refused.
 */
export class ChannelDecoder {
  readonly method: CompressionMethod;
  /** seq of the next packet: catches a lost, repeated or reordered task (a restarted worker). */
  #next = 0;
  #failed = false;
  readonly #s: StreamStep;
  readonly #scratch = new Uint8Array(TARGET_PAGE_SIZE);
  /** Pages and payload bytes decoded, for diagnostics. */
  pages = 0;
  bytes = 0;

  constructor(method: CompressionMethod) {
    this.method = method;
    this.#s = method === 'zlib' ? new ZlibStep() : new ZstdStep();
  }

  /**
   * Decodes `src` (one whole payload) into the page slots `indexes[0..normalPages)` of `into`,
   * page k of the output to slot indexes[k] (spec §2.5.2: "page k of the output belongs to
   * offset[k]"). `channel` prefixes messages.
   */
  decodePacket(seq: number, src: Uint8Array, indexes: Uint32Array, normalPages: number, into: SlotMemory, channel: string): void {
    if (this.#failed) throw new MigrationError('ERR_DECOMPRESS', `${channel}: ${this.method} stream already failed`, channel);
    if (seq !== this.#next) {
      this.#failed = true;
      throw new MigrationError('ERR_WORKER', `${channel}: ${this.method} decoder got packet ${seq}, expected ${this.#next} (decoder state lost or tasks out of order)`, channel);
    }
    this.#next++;
    if (normalPages === 0) return;
    try {
      this.#decode(src, indexes, normalPages, into, channel);
    } catch (e) {
      this.#failed = true;
      if (e instanceof MigrationError) throw e;
      throw new MigrationError('ERR_DECOMPRESS', `${channel}: ${this.method} payload of ${src.length} bytes for ${normalPages} pages: ${e instanceof Error ? e.message : String(e)}`, channel, undefined, { cause: e });
    }
    this.pages += normalPages;
    this.bytes += src.length;
  }

  #decode(src: Uint8Array, indexes: Uint32Array, normalPages: number, into: SlotMemory, channel: string): void {
    const s = this.#s, end = src.length;
    let at = 0;
    // Output goes to runs of consecutive slots (a packet's slots are handed out in order, so
    // a packet is often one run): fewer library calls than page by page, and the output
    // buffer is still nothing but the packet's own slots.
    for (let k = 0; k < normalPages;) {
      const first = indexes[k]!;
      const n = slotRunLength(indexes, k, normalPages, into.chunkSlotBits);
      const view = into.view(first), runAt = into.offset(first);
      const runEnd = runAt + n * TARGET_PAGE_SIZE;
      assert(runEnd <= view.length, 'page index outside the block (the channel validates offsets)');
      for (let filled = runAt; filled < runEnd;) {
        s.step(src, at, end, view, filled, runEnd);
        if (s.produced === 0 && s.consumed === 0) {
          const got = k * TARGET_PAGE_SIZE + filled - runAt;
          throw new MigrationError('ERR_DECOMPRESS', `${channel}: ${this.method} packet size received ${got} size expected ${normalPages * TARGET_PAGE_SIZE} (payload of ${end} bytes, ${end - at} not consumed)`, channel);
        }
        filled += s.produced;
        at += s.consumed;
      }
      k += n;
    }
    // The rest of the payload (zlib's sync-flush marker 00 00 ff ff, say) must decode to
    // nothing, and nothing may be left pending inside the decoder: one more call into the
    // scratch page shows both.
    for (;;) {
      s.step(src, at, end, this.#scratch, 0, TARGET_PAGE_SIZE);
      if (s.produced > 0) {
        throw new MigrationError('ERR_DECOMPRESS', `${channel}: ${this.method} payload of ${end} bytes decodes to more than ${normalPages * TARGET_PAGE_SIZE} bytes`, channel);
      }
      at += s.consumed;
      if (s.consumed === 0) break;
    }
    if (at !== end) {
      throw new MigrationError('ERR_DECOMPRESS', `${channel}: ${this.method} payload of ${end} bytes: ${end - at} bytes left after ${normalPages} pages`, channel);
    }
  }
}

/**
 * One packet on the decoder thread: decode the normal pages straight into their slots. In
 * COLO state those are the checkpoint's pending slots, so a corrupt payload never reaches
 * the committed image. Returns the pages written.
 */
export function runDecodeTask(t: DecodeTask, dec: ChannelDecoder): number {
  const indexes = new Uint32Array(t.staging, t.slotOffset, t.normalPages);
  const src = new Uint8Array(t.staging, t.slotOffset + SLOT_INDEX_BYTES, t.payloadLen);
  dec.decodePacket(t.seq, src, indexes, t.normalPages, new SlotMemory(t.mem), t.channel);
  return t.normalPages;
}

/**
 * The decoders of one decoder thread, by stream key. A channel's first packet (seq 0)
 * creates its decoder; a key seen with a later seq but no decoder means the thread lost its
 * state (piscina replaced a crashed worker), which fails the channel rather than decoding
 * mid-stream bytes with a fresh context.
 */
export class ChannelDecoders {
  readonly #byKey = new Map<string, ChannelDecoder>();

  run(t: DecodeTask): DecodeResult {
    try {
      let dec = this.#byKey.get(t.key);
      if (dec === undefined) {
        if (t.seq !== 0) throw new MigrationError('ERR_WORKER', `${t.channel}: ${t.method} decoder state lost before packet ${t.seq}`, t.channel);
        dec = new ChannelDecoder(t.method);
        this.#byKey.set(t.key, dec);
      } else if (dec.method !== t.method) {
        throw new MigrationError('ERR_WORKER', `${t.channel}: ${t.method} packet for a ${dec.method} decoder`, t.channel);
      }
      return runDecodeTask(t, dec);
    } catch (e) {
      if (e instanceof MigrationError) return { code: e.code, message: e.message };
      throw e;
    }
  }

  /** Drops a stream's decoder (its channel closed). */
  forget(key: string): void { this.#byKey.delete(key); }
}
