import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { WindowedMemory, type BlockMemory } from './shared-layout.js';

/**
 * Where a page goes (spec §5.6–5.7, the seed patch "multifd: Add COLO support"):
 *  - WRITE_GUEST: plain precopy, guest memory only;
 *  - WRITE_BOTH: COLO enabled but not yet in COLO state: cache and guest, no dirty bit;
 *  - WRITE_CACHE: COLO state: cache only, dirty bit for normal AND zero pages (colo_record_bitmap).
 */
export const WRITE_GUEST = 0;
export const WRITE_BOTH = 1;
export const WRITE_CACHE = 2;
export type WriteMode = typeof WRITE_GUEST | typeof WRITE_BOTH | typeof WRITE_CACHE;

/**
 * A staging slot in a channel's SharedArrayBuffer: page indexes (normal, then zero) as u32,
 * then the payload. The socket reader fills it; one page writer drains it; the channel
 * does not reuse the slot until the writer's task has settled.
 */
export const SLOT_INDEX_BYTES = 4 * 256;
/** QEMU's receive buffer for one packet payload is 1 MiB (spec §2.5.2). */
export const SLOT_PAYLOAD_BYTES = 1024 * 1024;
export const SLOT_BYTES = SLOT_INDEX_BYTES + SLOT_PAYLOAD_BYTES;

export interface WriteTask {
  op: 'write';
  mem: BlockMemory;
  mode: WriteMode;
  staging: SharedArrayBuffer;
  slotOffset: number;
  normalPages: number;
  zeroPages: number;
  /** Bytes of decoded page data to take from the slot payload (normalPages * 4096 for nocomp). */
}

export interface FlushTask {
  op: 'flush';
  mem: BlockMemory;
  /** Bitmap words [wordFrom, wordTo) owned by this task; tasks of one flush never overlap. */
  wordFrom: number;
  wordTo: number;
}

export type PageTask = WriteTask | FlushTask;

const ZERO_PAGE = new Uint8Array(TARGET_PAGE_SIZE);

/** Copies one packet's pages from `src` (page k at k*4096) to their targets. Returns pages written. */
export function writePages(mem: BlockMemory, mode: WriteMode, indexes: Uint32Array, normalPages: number,
                           zeroPages: number, src: Uint8Array): number {
  const guest = mode === WRITE_CACHE ? null : new WindowedMemory(mem.guest);
  const cache = mode === WRITE_GUEST || !mem.cache ? null : new WindowedMemory(mem.cache);
  const dirty = mode === WRITE_CACHE && mem.dirty ? new DirtyBitmap(mem.dirty, 0) : null;
  for (let k = 0; k < normalPages + zeroPages; k++) {
    const page = indexes[k]!;
    const from = k < normalPages ? src.subarray(k * TARGET_PAGE_SIZE, (k + 1) * TARGET_PAGE_SIZE) : ZERO_PAGE;
    if (cache) { const [v, at] = cache.locate(page); v.set(from, at); }
    if (guest) { const [v, at] = guest.locate(page); v.set(from, at); }
    // Marked after the write: the flush that reads the bit runs only after this task settled
    // (the barrier waits for it), so the order matters for clarity, not for correctness.
    if (dirty) dirty.mark(page);
  }
  return normalPages + zeroPages;
}

export function runWriteTask(t: WriteTask): number {
  const indexes = new Uint32Array(t.staging, t.slotOffset, t.normalPages + t.zeroPages);
  const src = new Uint8Array(t.staging, t.slotOffset + SLOT_INDEX_BYTES, t.normalPages * TARGET_PAGE_SIZE);
  return writePages(t.mem, t.mode, indexes, t.normalPages, t.zeroPages, src);
}

/** colo_flush_ram_cache() for one range of bitmap words: cache -> guest, bits cleared. */
export function runFlushTask(t: FlushTask): number {
  if (!t.mem.cache || !t.mem.dirty) return 0;
  const guest = new WindowedMemory(t.mem.guest);
  const cache = new WindowedMemory(t.mem.cache);
  const dirty = new DirtyBitmap(t.mem.dirty, 0);
  return dirty.drain(t.wordFrom, t.wordTo, (page) => {
    const [gv, gat] = guest.locate(page);
    const [cv, cat] = cache.locate(page);
    gv.set(cv.subarray(cat, cat + TARGET_PAGE_SIZE), gat);
  });
}
