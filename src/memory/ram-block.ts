import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { WRITE_CACHE, type WriteMode } from './page-writer.js';
import { Slab } from './slab.js';

/** Page-table entries: a slot number, or one of these. */
export const ZERO = -1;
/** Pending only: the page was not sent in the checkpoint in progress. */
export const NONE = -2;

const ZERO_PAGE = new Uint8Array(TARGET_PAGE_SIZE);

/** A block of a CommittedImage: pages read through the table (null: a zero page, no slot). */
export interface ImageBlock {
  idstr: string;
  usedLength: number;
  pages: number;
  page(index: number): Uint8Array | null;
}

/**
 * One RAMBlock as announced by MEM_SIZE (spec §4.6.2), held as a page table over the
 * migration's slab rather than as dense memory: the store-only secondary never runs the
 * guest, so neither the guest image nor the COLO cache needs to be a contiguous copy.
 *
 * - committed[p]: the page as of the last complete checkpoint (slot or ZERO);
 * - pending[p]: the page as the checkpoint in progress sent it (slot, ZERO, or NONE), the
 *   colo_cache of QEMU for exactly the dirty pages; `dirty` is colo_record_bitmap's bitmap.
 *
 * The commit (colo_flush_ram_cache) swings committed[p] to pending[p] for every dirty page
 * and frees the old slot: integer work, no page copy. A discarded checkpoint frees its
 * pending slots; committed entries are written only by the initial migration and the commit.
 * The tables are main-thread only: workers get slot numbers with each task.
 */
export class RAMBlock {
  readonly pages: number;
  readonly committed: Int32Array;
  pending: Int32Array | null = null;
  dirty: DirtyBitmap | null = null;
  /** Compatibility views for tests and tools: whole pages, read and poked through the table. */
  readonly guest: { page: (i: number) => Uint8Array; readonly views: Uint8Array[] };
  readonly cache: { page: (i: number) => Uint8Array } | null = null;

  constructor(readonly index: number, readonly idstr: string, readonly usedLength: number, readonly slab: Slab = new Slab()) {
    this.pages = usedLength / TARGET_PAGE_SIZE;
    this.committed = new Int32Array(this.pages).fill(ZERO);
    const self = this;
    this.guest = {
      page: (i) => this.#committedPageForWrite(i),
      get views() { return [self.denseCopy()]; },
    };
  }

  get isColo(): boolean { return this.pending !== null; }

  /** colo_init_ram_cache(): the pending table and the bitmap; no second copy of memory. */
  enableColo(): void {
    if (this.pending) return;
    this.pending = new Int32Array(this.pages).fill(NONE);
    this.dirty = DirtyBitmap.alloc(this.pages);
    (this as { cache: RAMBlock['cache'] }).cache = { page: (i) => this.#cachePage(i) };
  }

  /**
   * The slot a normal page goes to (main thread, at dispatch). Before COLO state the page
   * is written in place into its committed slot (precopy may resend a page); in COLO state
   * into the checkpoint's pending slot (a page sent twice reuses it), marked dirty.
   * `fresh`: a slot the caller allocated for it (one of a run), used if the page needs one;
   * the caller sees it was taken when it is returned.
   */
  slotFor(page: number, mode: WriteMode, fresh = -1): number {
    if (mode !== WRITE_CACHE || !this.pending) {
      let s = this.committed[page]!;
      if (s < 0) { s = fresh >= 0 ? fresh : this.slab.alloc(); this.committed[page] = s; }
      return s;
    }
    let s = this.pending[page]!;
    if (s < 0) { s = fresh >= 0 ? fresh : this.slab.alloc(); this.pending[page] = s; }
    this.dirty!.record(page);
    return s;
  }

  /**
   * The page's bytes are already in `slot` (a reader thread read the payload into a reserved
   * run): the table takes that slot, and the one it held for the same write target (the
   * committed slot before COLO state, the checkpoint's pending one in it) is freed once no
   * earlier write of the page can still be in flight. Committed pages of a COLO checkpoint
   * are never touched: in COLO state only the pending table moves.
   */
  adoptSlot(page: number, mode: WriteMode, slot: number): void {
    const table = mode !== WRITE_CACHE || !this.pending ? this.committed : this.pending;
    const old = table[page]!;
    table[page] = slot;
    if (old >= 0) this.slab.deferFree(old);
    if (table === this.pending) this.dirty!.record(page);
  }

  /** A zero page: no slot, no write; in COLO state a dirty mark all the same (colo_record_bitmap). */
  zeroPage(page: number, mode: WriteMode): void {
    if (mode !== WRITE_CACHE || !this.pending) {
      const s = this.committed[page]!;
      if (s >= 0) { this.slab.deferFree(s); this.committed[page] = ZERO; }
      return;
    }
    const s = this.pending[page]!;
    // An earlier copy of this page may still be on a worker: its slot is reused only later.
    if (s >= 0) this.slab.deferFree(s);
    this.pending[page] = ZERO;
    this.dirty!.record(page);
  }

  /** colo_flush_ram_cache() by table: every dirty page's committed entry takes its pending one. */
  commit(): number {
    const pending = this.pending, dirty = this.dirty;
    if (!pending || !dirty) return 0;
    const committed = this.committed, slab = this.slab;
    return dirty.drain(0, dirty.words.length, (p) => {
      const next = pending[p]!;
      if (next === NONE) return;
      const old = committed[p]!;
      committed[p] = next;
      pending[p] = NONE;
      if (old >= 0) slab.free(old);
    });
  }

  /** Drops the checkpoint in progress: its slots go back, committed entries stay as they are. */
  discard(): number {
    const pending = this.pending, dirty = this.dirty;
    if (!pending || !dirty) return 0;
    return dirty.drain(0, dirty.words.length, (p) => {
      const s = pending[p]!;
      pending[p] = NONE;
      if (s >= 0) this.slab.free(s);
    });
  }

  /** The committed page (a view into its slot), or null for a zero page. */
  committedPage(page: number): Uint8Array | null {
    const s = this.committed[page]!;
    return s < 0 ? null : this.slab.page(s);
  }

  /** Pages of the committed image that hold a slot. */
  get committedSlots(): number {
    let n = 0;
    for (let p = 0; p < this.pages; p++) if (this.committed[p]! >= 0) n++;
    return n;
  }

  /** A dense copy of the committed image (tests, tools; not for large guests in production). */
  denseCopy(): Uint8Array {
    const out = new Uint8Array(this.usedLength);
    for (let p = 0; p < this.pages; p++) {
      const v = this.committedPage(p);
      if (v) out.set(v, p * TARGET_PAGE_SIZE);
    }
    return out;
  }

  imageBlock(): ImageBlock {
    return { idstr: this.idstr, usedLength: this.usedLength, pages: this.pages, page: (i) => this.committedPage(i) };
  }

  #committedPageForWrite(page: number): Uint8Array {
    return this.slab.page(this.slotFor(page, 0));
  }

  /** What QEMU's colo_cache holds for a page: this checkpoint's copy if sent, else the committed one. */
  #cachePage(page: number): Uint8Array {
    const s = this.pending![page]!;
    if (s >= 0) return this.slab.page(s);
    if (s === ZERO) return ZERO_PAGE.slice();
    return this.#committedPageForWrite(page);
  }
}

/** A dense copy of an image block (tests and tools). */
export function imageBlockBytes(b: ImageBlock): Buffer {
  const out = Buffer.alloc(b.usedLength);
  for (let p = 0; p < b.pages; p++) {
    const v = b.page(p);
    if (v) out.set(v, p * TARGET_PAGE_SIZE);
  }
  return out;
}

/** The MEM_SIZE list, addressed by name as the wire does (spec §4.6.2: no numeric index on the wire). */
export class RAMBlockList {
  readonly blocks: RAMBlock[] = [];
  readonly #byName = new Map<string, RAMBlock>();
  slab: Slab;
  constructor(slab: Slab = new Slab()) { this.slab = slab; }
  add(idstr: string, usedLength: number): RAMBlock {
    const b = new RAMBlock(this.blocks.length, idstr, usedLength, this.slab);
    this.blocks.push(b);
    this.#byName.set(idstr, b);
    return b;
  }
  get(idstr: string): RAMBlock | undefined { return this.#byName.get(idstr); }
  get totalBytes(): number { return this.blocks.reduce((s, b) => s + b.usedLength, 0); }
}
