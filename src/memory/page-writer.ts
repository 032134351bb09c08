import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { SlotMemory, type SlotChunks } from './slab.js';

/**
 * Where a page goes (spec §5.6–5.7, the seed patch "multifd: Add COLO support"):
 *  - WRITE_GUEST: plain precopy;
 *  - WRITE_BOTH: COLO enabled but not yet in COLO state (QEMU writes cache and guest);
 *  - WRITE_CACHE: COLO state: the checkpoint's pending pages, dirty bit for normal AND zero
 *    pages (colo_record_bitmap).
 * With a page table, guest and cache are not two copies: WRITE_GUEST and WRITE_BOTH both
 * write a page once, in place, into its committed slot (RAMBlock.slotFor).
 */
export const WRITE_GUEST = 0;
export const WRITE_BOTH = 1;
export const WRITE_CACHE = 2;
export type WriteMode = typeof WRITE_GUEST | typeof WRITE_BOTH | typeof WRITE_CACHE;

/**
 * A staging slot in a channel's SharedArrayBuffer: destination page slots of the packet's
 * normal pages as u32, then the payload. The socket reader fills it; one page writer drains
 * it; the channel does not reuse the slot until the writer's task has settled.
 */
export const SLOT_INDEX_BYTES = 4 * 256;
/** QEMU's receive buffer for one packet payload is 1 MiB (spec §2.5.2). */
export const SLOT_PAYLOAD_BYTES = 1024 * 1024;
export const SLOT_BYTES = SLOT_INDEX_BYTES + SLOT_PAYLOAD_BYTES;

export interface WriteTask {
  op: 'write';
  staging: SharedArrayBuffer;
  slotOffset: number;
  /** Pages in the slot payload; each goes to the page slot listed for it. */
  normalPages: number;
  /** The chunks those page slots live in. */
  mem: SlotChunks;
}

export type PageTask = WriteTask;

/**
 * Copies one packet's pages from `src` (page k at k*4096) to their slots. Consecutive slots
 * of one chunk (the usual case: the main thread hands a packet consecutive free slots) are
 * one copy. Returns pages written.
 */
export function writePages(mem: SlotMemory, slots: Uint32Array, normalPages: number, src: Uint8Array): number {
  for (let k = 0; k < normalPages;) {
    const first = slots[k]!;
    let n = 1;
    while (k + n < normalPages && slots[k + n] === first + n && mem.chunkOf(first + n) === mem.chunkOf(first)) n++;
    const at = k * TARGET_PAGE_SIZE;
    mem.view(first).set(src.subarray(at, at + n * TARGET_PAGE_SIZE), mem.offset(first));
    k += n;
  }
  return normalPages;
}

export function runWriteTask(t: WriteTask): number {
  const slots = new Uint32Array(t.staging, t.slotOffset, t.normalPages);
  const src = new Uint8Array(t.staging, t.slotOffset + SLOT_INDEX_BYTES, t.normalPages * TARGET_PAGE_SIZE);
  return writePages(new SlotMemory(t.mem), slots, t.normalPages, src);
}
