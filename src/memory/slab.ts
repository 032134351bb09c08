import { MigrationError } from '../errors.js';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';

/**
 * 32 MiB chunks: large enough that glibc mmaps them (and, with glibc.malloc.hugetlb=1,
 * madvises them for transparent huge pages), small enough that memory follows the data.
 */
export const MAX_CHUNK_SLOT_BITS = 13;

/** Chunk size for a migration of `pages` guest pages: a tiny test guest does not reserve 32 MiB. */
export function chunkSlotBitsFor(pages: number): number {
  return Math.max(4, Math.min(MAX_CHUNK_SLOT_BITS, Math.ceil(Math.log2(Math.max(1, pages)))));
}

export interface SlabOptions {
  /** Cap on the bytes of chunks held at once (--max-memory); allocation beyond it is ERR_LIMIT. */
  maxBytes?: number;
  chunkSlotBits?: number;
}

/**
 * 4 KiB page slots in SharedArrayBuffer chunks, allocated on demand. A slot is an integer:
 * chunk = slot >>> chunkSlotBits. Only the main thread allocates and frees (it parses every
 * header, so it is the one place that knows where a page goes); workers are handed slot
 * numbers and the chunks they touch, and only copy bytes.
 *
 * Allocation takes the lowest chunk with a free slot, so after a large checkpoint the high
 * chunks drain and trim() can give them back to the system whole.
 */
export class Slab {
  readonly chunkSlotBits: number;
  readonly chunkSlots: number;
  readonly chunkBytes: number;
  readonly maxChunks: number;
  readonly chunks: (SharedArrayBuffer | null)[] = [];
  readonly views: (Uint8Array | null)[] = [];
  /**
   * Per chunk: a bitmap of free slots (bit set = free), how many are free, and the first word
   * that may have one. Allocation takes the lowest free slot, so a packet's pages get
   * ascending, mostly consecutive slots even after commits punched holes: a run the kernel
   * can read a payload straight into (src/migration/multifd-channel.ts). A stack of freed
   * slots would hand them out in descending order.
   */
  readonly #free: (Int32Array | null)[] = [];
  readonly #nfree: number[] = [];
  readonly #cursor: number[] = [];
  /**
   * Per chunk: slots below this were handed out or pre-touched, so their memory is mapped.
   * Above it a first write faults a page in (a 2 MiB transparent huge page: the kernel clears
   * it) — 23 % of the main thread's CPU during multifd transfers under load (perf), when the
   * kernel's socket copy into a fresh run took the fault. prefaultStep() moves that work
   * between checkpoints.
   */
  readonly #touched: number[] = [];
  /** A chunk has no run of this many free slots (Infinity: unknown); reset by free(). */
  readonly #noRun: number[] = [];
  /** The same below the chunk's #touched mark; reset by free() and prefaultStep(). */
  readonly #noMappedRun: number[] = [];
  /** No chunk below this one has a free slot. */
  #lowest = 0;
  #live = 0;
  #used = 0;
  /**
   * Slots that may still be the target of a page write in flight (a page resent as zero
   * while its earlier copy is on a worker): reused only after the next quiescent point.
   */
  #deferred: number[] = [];
  /** Highest number of chunks held at once. */
  peakChunks = 0;
  /** Chunks added and given back so far, and slots mapped ahead by prefaultStep (diagnostics). */
  chunksAdded = 0;
  chunksReleased = 0;
  prefaultedSlots = 0;
  /** Slots handed out that were never mapped: the first write into each faults a page in. */
  freshSlots = 0;

  constructor(opts: SlabOptions = {}) {
    this.chunkSlotBits = opts.chunkSlotBits ?? MAX_CHUNK_SLOT_BITS;
    this.chunkSlots = 1 << this.chunkSlotBits;
    this.chunkBytes = this.chunkSlots * TARGET_PAGE_SIZE;
    this.maxChunks = opts.maxBytes === undefined ? Infinity : Math.floor(opts.maxBytes / this.chunkBytes);
  }

  /** Slots in use (committed, pending or deferred). */
  get usedSlots(): number { return this.#used; }
  get liveChunks(): number { return this.#live; }
  get bytes(): number { return this.#live * this.chunkBytes; }
  get freeSlots(): number { return this.#live * this.chunkSlots - this.#used; }

  alloc(): number {
    for (;;) {
      const c = this.#lowest;
      if (c >= this.chunks.length || this.chunks[c] === null) this.#addChunk(c);
      if (this.#nfree[c]! > 0) {
        const bits = this.#free[c]!;
        let w = this.#cursor[c]!;
        while (bits[w] === 0) w++;
        const word = bits[w]!;
        const b = 31 - Math.clz32(word & -word);
        bits[w] = word & ~(1 << b);
        this.#cursor[c] = w;
        this.#nfree[c]!--;
        this.#used++;
        const i = w * 32 + b;
        if (i >= this.#touched[c]!) { this.freshSlots += i + 1 - this.#touched[c]!; this.#touched[c] = i + 1; }
        return c * this.chunkSlots + i;
      }
      this.#lowest++;
    }
  }

  /**
   * n consecutive free slots in one existing chunk, lowest first (their first slot), or -1:
   * then the caller takes single slots, which fill the holes. A new chunk is never added for
   * a run, so memory still follows the data. A multifd packet's payload is read by the
   * kernel straight into such a run (src/migration/multifd-channel.ts). `mappedOnly`: only
   * slots below a chunk's #touched mark (memory already faulted in).
   */
  allocRun(n: number, mappedOnly = false): number {
    if (n < 2 || n > this.chunkSlots) return -1;
    const noRun = mappedOnly ? this.#noMappedRun : this.#noRun;
    for (let c = this.#lowest; c < this.chunks.length; c++) {
      if (this.chunks[c] === null || this.#nfree[c]! < n || noRun[c]! <= n) continue;
      const limit = mappedOnly ? this.#touched[c]! : this.chunkSlots;
      if (limit < n) continue;
      const bits = this.#free[c]!;
      const wEnd = Math.min(bits.length, (limit + 31) >>> 5);
      // Free bits at or above `limit` in the last word count as taken.
      const tailMask = (limit & 31) === 0 ? -1 : (1 << (limit & 31)) - 1;
      // Word at a time (bit set = free): a run continues through a word's low free bits and
      // restarts at its high ones; a run of n <= 32 may also sit inside one word.
      let start = -1, len = 0;
      for (let w = this.#cursor[c]!; w < wEnd && len < n; w++) {
        const x = w === wEnd - 1 ? bits[w]! & tailMask : bits[w]!;
        if (x === -1) { if (len === 0) start = w * 32; len += 32; continue; }
        const low = x === 0 ? 0 : 31 - Math.clz32(~x & (x + 1));   // trailing free bits
        if (len > 0 && len + low >= n) { len += low; break; }
        if (n <= 32 && x !== 0) {
          let m = x;
          for (let k = 1; k < n;) { const step = Math.min(k, n - k); m &= m >>> step; k += step; }
          // >>> shifts in zeros, so m marks starts of n free bits wholly inside the word
          if (m !== 0) { start = w * 32 + (31 - Math.clz32(m & -m)); len = n; break; }
        }
        const high = Math.clz32(~x);                                   // leading free bits
        len = high;
        start = w * 32 + 32 - high;
      }
      if (len < n) { noRun[c] = n; continue; }
      for (let i = start; i < start + n; i++) {
        const w = i >>> 5;
        bits[w] = bits[w]! & ~(1 << (i & 31));
      }
      this.#nfree[c]! -= n;
      this.#used += n;
      if (start + n > this.#touched[c]!) { this.freshSlots += start + n - Math.max(start, this.#touched[c]!); this.#touched[c] = start + n; }
      return c * this.chunkSlots + start;
    }
    return -1;
  }

  /** Length of the run the last takeRun() returned. */
  runLength = 0;

  /**
   * The longest run of free slots up to `max` pages, halving down to `min` (its length in
   * runLength), or -1: then the caller takes single slots. Memory already mapped first: a
   * run in never-touched memory makes the kernel's socket copy fault every 2 MiB page in on
   * the critical path (perf on this nested VM: up to 70 ms for 600 fresh slots in one
   * checkpoint), while single mapped slots cost a page writer's copy. Fresh runs only when
   * no mapped slot is free at all: the initial migration, and growth beyond the reserve.
   */
  takeRun(max: number, min: number): number {
    const s = this.#halvingRun(max, min, true);
    return s >= 0 || this.mappedFreeSlots > 0 ? s : this.#halvingRun(max, min, false);
  }

  #halvingRun(max: number, min: number, mappedOnly: boolean): number {
    for (let want = max; want >= min; want >>= 1) {
      const s = this.allocRun(want, mappedOnly);
      if (s >= 0) { this.runLength = want; return s; }
    }
    return -1;
  }

  free(slot: number): void {
    const c = slot >>> this.chunkSlotBits;
    const i = slot & (this.chunkSlots - 1);
    const bits = this.#free[c]!;
    const w = i >>> 5, m = 1 << (i & 31);
    if ((bits[w]! & m) !== 0) throw new Error(`slab: slot ${slot} freed twice`);
    bits[w] = bits[w]! | m;
    this.#nfree[c]!++;
    if (w < this.#cursor[c]!) this.#cursor[c] = w;
    this.#noRun[c] = Infinity;
    this.#noMappedRun[c] = Infinity;
    this.#used--;
    if (c < this.#lowest) this.#lowest = c;
  }

  deferFree(slot: number): void { this.#deferred.push(slot); }

  /** A quiescent point (no page write in flight): deferred slots become free. */
  releaseDeferred(): void {
    if (this.#deferred.length === 0) return;
    for (const s of this.#deferred) this.free(s);
    this.#deferred = [];
  }

  #addChunk(c: number): void {
    if (this.#live + 1 > this.maxChunks) {
      throw new MigrationError('ERR_LIMIT', `memory: ${this.#live} chunks of ${this.chunkBytes >> 20} MiB in use, another would exceed --max-memory ${this.maxChunks * this.chunkBytes} bytes`);
    }
    const sab = new SharedArrayBuffer(this.chunkBytes);
    while (this.chunks.length <= c) { this.chunks.push(null); this.views.push(null); this.#free.push(null); this.#nfree.push(0); this.#cursor.push(0); this.#noRun.push(Infinity); this.#noMappedRun.push(Infinity); this.#touched.push(0); }
    this.chunks[c] = sab;
    this.views[c] = new Uint8Array(sab);
    // Test guests use chunks of 16 slots: half a word.
    this.#free[c] = this.chunkSlots >= 32 ? new Int32Array(this.chunkSlots >>> 5).fill(-1) : Int32Array.of((1 << this.chunkSlots) - 1);
    this.#nfree[c] = this.chunkSlots;
    this.#cursor[c] = 0;
    this.#noRun[c] = Infinity;
    this.#noMappedRun[c] = Infinity;
    this.#touched[c] = 0;
    this.#live++;
    this.chunksAdded++;
    if (this.#live > this.peakChunks) this.peakChunks = this.#live;
  }

  /**
   * Gives whole free chunks back (highest first) while more than `reserveSlots` slots would
   * stay free. The SharedArrayBuffer is unmapped once no thread references it: tasks hold
   * their chunks only while they run. Returns the chunks released.
   */
  trim(reserveSlots: number): number {
    let n = 0;
    for (let c = this.chunks.length - 1; c >= 0; c--) {
      if (this.chunks[c] === null || this.#nfree[c]! !== this.chunkSlots) continue;
      // One chunk of slack beyond the reserve: a chunk given back at the reserve's edge was
      // mapped again by prefaultStep before the next checkpoint (3 of 12 chunks in a real
      // QEMU load run, 96 MB of page clearing for nothing).
      if (this.freeSlots - this.chunkSlots < reserveSlots + this.chunkSlots) break;
      this.chunks[c] = null;
      this.views[c] = null;
      this.#free[c] = null;
      this.#nfree[c] = 0;
      this.#cursor[c] = 0;
      this.#live--;
      this.chunksReleased++;
      n++;
    }
    while (this.chunks.length > 0 && this.chunks[this.chunks.length - 1] === null) {
      this.chunks.pop(); this.views.pop(); this.#free.pop(); this.#nfree.pop(); this.#cursor.pop(); this.#noRun.pop(); this.#noMappedRun.pop(); this.#touched.pop();
    }
    if (this.#lowest > this.chunks.length) this.#lowest = this.chunks.length;
    return n;
  }

  /** Free slots whose memory is already mapped (handed out before, or pre-touched). */
  get mappedFreeSlots(): number {
    let untouched = 0;
    for (let c = 0; c < this.chunks.length; c++) if (this.chunks[c] !== null) untouched += this.chunkSlots - this.#touched[c]!;
    return this.freeSlots - untouched;
  }

  /**
   * One slice of pre-faulting, between checkpoints: touches up to `maxSlots` never-used slots
   * of the lowest chunk that has some (a new chunk when none has, within --max-memory), while
   * fewer than `reserveSlots` free slots are mapped. Returns true while more remains.
   * Memory still follows the data: never more than the reserve the commit keeps anyway.
   */
  prefaultStep(reserveSlots: number, maxSlots = 512): boolean {
    if (this.mappedFreeSlots >= reserveSlots) return false;
    let c = 0;
    while (c < this.chunks.length && (this.chunks[c] === null || this.#touched[c]! >= this.chunkSlots)) c++;
    if (c === this.chunks.length) {
      c = this.chunks.indexOf(null);
      if (c < 0) c = this.chunks.length;
      if (this.#live + 1 > this.maxChunks) return false;
      this.#addChunk(c);
    }
    const v = this.views[c]!;
    const from = this.#touched[c]!, to = Math.min(this.chunkSlots, from + maxSlots);
    // A write faults the page in; slots at or above #touched were never handed out, so free.
    for (let i = from; i < to; i++) v[i * TARGET_PAGE_SIZE] = 0;
    this.#touched[c] = to;
    this.#noMappedRun[c] = Infinity;
    this.prefaultedSlots += to - from;
    return this.mappedFreeSlots < reserveSlots;
  }

  /** The chunk view holding a slot (main thread). */
  view(slot: number): Uint8Array { return this.views[slot >>> this.chunkSlotBits]!; }
  offset(slot: number): number { return (slot & (this.chunkSlots - 1)) * TARGET_PAGE_SIZE; }
  page(slot: number): Uint8Array {
    const at = this.offset(slot);
    return this.view(slot).subarray(at, at + TARGET_PAGE_SIZE);
  }
}

/**
 * What a worker gets for one task: the chunks its slots live in (a packet's slots come from
 * one or two chunks, so this stays short), not the whole slab.
 */
export interface SlotChunks {
  chunkSlotBits: number;
  ids: number[];
  chunks: SharedArrayBuffer[];
}

/** The chunks that slots[0..n) live in. */
export function chunksFor(slab: Slab, slots: Uint32Array | number[], n: number): SlotChunks {
  const ids: number[] = [], chunks: SharedArrayBuffer[] = [];
  let last = -1;
  for (let k = 0; k < n; k++) {
    const c = slots[k]! >>> slab.chunkSlotBits;
    if (c === last || ids.includes(c)) { last = c; continue; }
    ids.push(c);
    chunks.push(slab.chunks[c]!);
    last = c;
  }
  return { chunkSlotBits: slab.chunkSlotBits, ids, chunks };
}

/**
 * Pages from slots[k] on whose slots are consecutive and in one chunk (at most n - k): one
 * copy for a page writer, one socket read for a direct payload.
 */
export function slotRunLength(slots: ArrayLike<number>, k: number, n: number, chunkSlotBits: number): number {
  const first = slots[k]!;
  let len = 1;
  while (k + len < n && slots[k + len] === first + len && (first + len) >>> chunkSlotBits === first >>> chunkSlotBits) len++;
  return len;
}

/** Worker side: byte views of a task's chunks, indexed by slot. */
export class SlotMemory {
  readonly #bits: number;
  readonly #mask: number;
  readonly #ids: number[];
  readonly #views: Uint8Array[];
  readonly chunkSlotBits: number;
  constructor(c: SlotChunks) {
    this.chunkSlotBits = c.chunkSlotBits;
    this.#bits = c.chunkSlotBits;
    this.#mask = (1 << c.chunkSlotBits) - 1;
    this.#ids = c.ids;
    this.#views = c.chunks.map((s) => new Uint8Array(s));
  }
  /** The chunk view of a slot; a slot outside the task's chunks is a bug, never a stray write. */
  view(slot: number): Uint8Array {
    const c = slot >>> this.#bits;
    const ids = this.#ids;
    for (let j = 0; j < ids.length; j++) if (ids[j] === c) return this.#views[j]!;
    throw new Error(`slot ${slot} is not in the task's chunks`);
  }
  offset(slot: number): number { return (slot & this.#mask) * TARGET_PAGE_SIZE; }
}
