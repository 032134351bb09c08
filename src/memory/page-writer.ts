import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { slotRunLength, SlotMemory, type SlotChunks } from './slab.js';

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

/**
 * A page writer's task ring (src/pool/page-pool.ts): one long-running piscina task per
 * worker drains fixed-size task records from a SharedArrayBuffer, so a packet costs the main
 * thread a few Atomics stores instead of a postMessage with SharedArrayBuffer handles and a
 * piscina promise. SharedArrayBuffers (staging, slab chunks) reach the worker once, over the
 * ring's MessagePort, and are named by a number in the records.
 */
export interface ServeTask {
  op: 'serve';
  ring: SharedArrayBuffer;
  /** {uid, sab}: a buffer the records name from now on; {evict: uid}: forget it. */
  port: MessagePort;
  capacity: number;
}

export type PageTask = WriteTask | ServeTask;

/** Control words: records published (main), records done (worker), futex word, stop flag. */
export const RING_HEAD = 0;
export const RING_DONE = 1;
export const RING_WAKE = 2;
export const RING_STOP = 3;
export const RING_CTL_WORDS = 4;
/** Record words: staging uid, slot offset, normal pages, chunk slot bits, chunks, status, then (chunk id, uid) per chunk. */
export const REC_STAGING = 0;
export const REC_SLOT_OFFSET = 1;
export const REC_NORMAL = 2;
export const REC_BITS = 3;
export const REC_NCHUNKS = 4;
export const REC_STATUS = 5;
export const REC_CHUNKS = 6;
/** A packet's 256 pages could each sit in a different chunk. */
export const REC_MAX_CHUNKS = SLOT_INDEX_BYTES / 4;
export const REC_WORDS = REC_CHUNKS + 2 * REC_MAX_CHUNKS;
export const ringBytes = (capacity: number): number => 4 * (RING_CTL_WORDS + capacity * REC_WORDS);

/** The pages a worker can reach: chunk views named by uid in a record, for writePages. */
class RecordMemory {
  chunkSlotBits = 0;
  mask = 0;
  n = 0;
  readonly ids = new Int32Array(REC_MAX_CHUNKS);
  readonly views: Uint8Array[] = [];
  view(slot: number): Uint8Array {
    const c = slot >>> this.chunkSlotBits;
    for (let j = 0; j < this.n; j++) if (this.ids[j] === c) return this.views[j]!;
    throw new Error(`slot ${slot} is not in the task's chunks`);
  }
  offset(slot: number): number { return (slot & this.mask) * TARGET_PAGE_SIZE; }
}

/**
 * Worker side of a task ring: runs records until the main thread sets RING_STOP with the ring
 * drained. Each record's status is its pages written, or -1 with the error's text posted on
 * the port first; RING_DONE counts records done, in order. Returns records run.
 */
export function serveRing(t: ServeTask): number {
  const ctl = new Int32Array(t.ring);
  const cap = t.capacity;
  const bufs = new Map<number, Uint8Array>();
  const drain = (): void => {
    for (let m = receiveMessageOnPort(t.port); m !== undefined; m = receiveMessageOnPort(t.port)) {
      const msg = m.message as { uid: number; sab?: SharedArrayBuffer; evict?: boolean };
      if (msg.evict) bufs.delete(msg.uid); else bufs.set(msg.uid, new Uint8Array(msg.sab!));
    }
  };
  const buf = (uid: number): Uint8Array => {
    let b = bufs.get(uid);
    if (b === undefined) { drain(); b = bufs.get(uid); }
    if (b === undefined) throw new Error(`shared buffer ${uid} was never sent to this worker`);
    return b;
  };
  const mem = new RecordMemory();
  let seq = 0;
  for (;;) {
    const wake = Atomics.load(ctl, RING_WAKE);
    if (Atomics.load(ctl, RING_HEAD) === seq) {
      if (Atomics.load(ctl, RING_STOP) !== 0) break;
      drain();
      Atomics.wait(ctl, RING_WAKE, wake);
      continue;
    }
    const r = RING_CTL_WORDS + (seq % cap) * REC_WORDS;
    let status: number;
    try {
      const staging = buf(ctl[r + REC_STAGING]!);
      const at = ctl[r + REC_SLOT_OFFSET]!;
      const normal = ctl[r + REC_NORMAL]!;
      mem.chunkSlotBits = ctl[r + REC_BITS]!;
      mem.mask = (1 << mem.chunkSlotBits) - 1;
      mem.n = ctl[r + REC_NCHUNKS]!;
      for (let j = 0; j < mem.n; j++) {
        mem.ids[j] = ctl[r + REC_CHUNKS + 2 * j]!;
        mem.views[j] = buf(ctl[r + REC_CHUNKS + 2 * j + 1]!);
      }
      const slots = new Uint32Array(staging.buffer, at, normal);
      const src = staging.subarray(at + SLOT_INDEX_BYTES, at + SLOT_INDEX_BYTES + normal * TARGET_PAGE_SIZE);
      status = writePages(mem, slots, normal, src);
    } catch (e) {
      status = -1;
      t.port.postMessage(String(e instanceof Error ? e.message : e));
    }
    mem.views.length = 0;
    Atomics.store(ctl, r + REC_STATUS, status);
    seq++;
    Atomics.store(ctl, RING_DONE, seq);
    Atomics.notify(ctl, RING_DONE);
  }
  t.port.close();
  return seq;
}

/**
 * Copies one packet's pages from `src` (page k at k*4096) to their slots. Consecutive slots
 * of one chunk (the usual case: the main thread hands a packet consecutive free slots) are
 * one copy. Returns pages written.
 */
export function writePages(mem: Pick<SlotMemory, 'view' | 'offset' | 'chunkSlotBits'>, slots: Uint32Array, normalPages: number, src: Uint8Array): number {
  for (let k = 0; k < normalPages;) {
    const first = slots[k]!;
    const n = slotRunLength(slots, k, normalPages, mem.chunkSlotBits);
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
