import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { allocWindows, WindowedMemory, type BlockMemory } from './shared-layout.js';

/**
 * One RAMBlock as announced by MEM_SIZE (spec §4.6.2): guest memory, and in COLO mode the
 * colo_cache and dirty bitmap. Memory is SharedArrayBuffer so page writers on the worker
 * pool write it directly.
 */
export class RAMBlock {
  readonly pages: number;
  readonly guest: WindowedMemory;
  cache: WindowedMemory | null = null;
  dirty: DirtyBitmap | null = null;
  readonly #guestWindows: SharedArrayBuffer[];
  #cacheWindows: SharedArrayBuffer[] | null = null;

  constructor(readonly index: number, readonly idstr: string, readonly usedLength: number) {
    this.pages = usedLength / TARGET_PAGE_SIZE;
    this.#guestWindows = allocWindows(usedLength);
    this.guest = new WindowedMemory(this.#guestWindows);
  }

  /** colo_init_ram_cache(): a second, zeroed copy plus the bitmap (spec §5.6). */
  enableColo(): void {
    if (this.cache) return;
    this.#cacheWindows = allocWindows(this.usedLength);
    this.cache = new WindowedMemory(this.#cacheWindows);
    this.dirty = DirtyBitmap.alloc(this.pages);
  }

  /** Handles posted to workers with each task. */
  memory(): BlockMemory {
    return { guest: this.#guestWindows, cache: this.#cacheWindows, dirty: this.dirty?.sab ?? null };
  }

  /** Copy of the committed guest memory (for dumps and the restore stream). */
  *guestChunks(): Generator<Uint8Array> { yield* this.guest.views; }
}

/** The MEM_SIZE list, addressed by name as the wire does (spec §4.6.2: no numeric index on the wire). */
export class RAMBlockList {
  readonly blocks: RAMBlock[] = [];
  readonly #byName = new Map<string, RAMBlock>();
  add(idstr: string, usedLength: number): RAMBlock {
    const b = new RAMBlock(this.blocks.length, idstr, usedLength);
    this.blocks.push(b);
    this.#byName.set(idstr, b);
    return b;
  }
  get(idstr: string): RAMBlock | undefined { return this.#byName.get(idstr); }
  get totalBytes(): number { return this.blocks.reduce((s, b) => s + b.usedLength, 0); }
}
