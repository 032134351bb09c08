// Guest memory of the synthetic source: RAMBlocks named and sized like a small `-M pc` guest
// (spec §4.6.2), each backed by a Buffer, filled from a seeded PRNG, and a dirty() step that
// plays the guest running between two checkpoints. Deterministic for a given seed.

import assert from 'node:assert/strict';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';
import { Prng } from './prng.js';
import type { RamBlockInfo } from './stream-builder.js';

const MiB = 1024 * 1024;
const KiB = 1024;
const WORDS_PER_PAGE = TARGET_PAGE_SIZE / 4;
const ZERO_PAGE = Buffer.alloc(TARGET_PAGE_SIZE);

/** A block of the model: its MEM_SIZE identity plus whether the guest writes to it. */
export interface RAMBlockSpec {
  idstr: string;
  /** Bytes, a multiple of TARGET_PAGE_SIZE. */
  usedLength: number;
  /** Guest writes land here (RAM, video memory); ROMs are false. Default true. */
  writable?: boolean;
}

/**
 * The block list of a small pc guest in QEMU's ram_list order (largest first), as seen on 7.2
 * with `-M pc` (spec §4.6.2), with `pc.ram` of `ramMiB` and a 1 MiB vga.vram.
 */
export function defaultRamBlocks(ramMiB = 64): RAMBlockSpec[] {
  return [
    { idstr: 'pc.ram', usedLength: ramMiB * MiB, writable: true },
    { idstr: '0000:00:02.0/vga.vram', usedLength: 1 * MiB, writable: true },
    { idstr: '/rom@etc/acpi/tables', usedLength: 128 * KiB, writable: false },
    { idstr: 'pc.bios', usedLength: 256 * KiB, writable: false },
    { idstr: '0000:00:03.0/virtio-net-pci.rom', usedLength: 256 * KiB, writable: false },
    { idstr: 'pc.rom', usedLength: 128 * KiB, writable: false },
    { idstr: '0000:00:02.0/vga.rom', usedLength: 64 * KiB, writable: false },
    { idstr: '/rom@etc/table-loader', usedLength: 4 * KiB, writable: false },
    { idstr: '/rom@etc/acpi/rsdp', usedLength: 4 * KiB, writable: false },
  ];
}

/** One RAMBlock of the model. `host` is the guest's current memory. */
export class GuestBlock {
  readonly idstr: string;
  readonly usedLength: number;
  readonly pages: number;
  readonly writable: boolean;
  /** Page-aligned backing store (an own ArrayBuffer, so `words` lines up with pages). */
  readonly host: Buffer;
  readonly words: Uint32Array;

  constructor(spec: RAMBlockSpec) {
    assert(spec.usedLength > 0 && spec.usedLength % TARGET_PAGE_SIZE === 0,
      `block ${spec.idstr}: usedLength must be a positive multiple of ${TARGET_PAGE_SIZE}`);
    this.idstr = spec.idstr;
    this.usedLength = spec.usedLength;
    this.pages = spec.usedLength / TARGET_PAGE_SIZE;
    this.writable = spec.writable ?? true;
    const ab = new ArrayBuffer(spec.usedLength);
    this.host = Buffer.from(ab);
    this.words = new Uint32Array(ab);
  }

  /** buffer_is_zero() for one page (a native compare, no allocation). */
  isZeroPage(page: number): boolean {
    const at = page * TARGET_PAGE_SIZE;
    return this.host[at] === 0 && this.host.compare(ZERO_PAGE, 0, TARGET_PAGE_SIZE, at, at + TARGET_PAGE_SIZE) === 0;
  }
}

/**
 * How much the guest writes between two checkpoints.
 * - 'idle': about 60 pages (timers, a few kernel structures).
 * - 'load': lognormal, median ~23.4 MiB, mean ~25 MiB, p99 ~55 MiB, capped by writable RAM.
 * - `{ pages }`: exactly that many distinct pages (capped by writable RAM).
 */
export type Workload = 'idle' | 'load' | { pages: number };

/** Pages written by one dirty() call: per block, ascending page indexes. */
export interface DirtySet {
  blocks: Uint32Array[];
  total: number;
  /** Pages that are all-zero after the write. */
  zeroed: number;
}

/** Options of the memory model. */
export interface MemoryModelOptions {
  seed?: number;
  /** Size of pc.ram for the default block list. Default 64. */
  ramMiB?: number;
  /** Overrides the default block list. */
  blocks?: RAMBlockSpec[];
  /** Share of all-zero pages after the initial fill. Default 0.4. */
  zeroFraction?: number;
  /** Chance that a dirtied page becomes all-zero. Default 0.12. */
  zeroOnDirty?: number;
}

/** Lognormal parameters of the 'load' workload: median e^mu bytes, shape sigma. */
export const LOAD_MEDIAN_BYTES = 23.4 * MiB;
export const LOAD_SIGMA = 0.368;

/** Bytes one 'load' interval writes: lognormal, so most checkpoints are near 25 MiB with a long tail. */
export function drawLoadBytes(prng: Prng): number {
  return LOAD_MEDIAN_BYTES * Math.exp(LOAD_SIGMA * prng.normal());
}

/** A guest's RAM: blocks, contents and the writes of a running guest. */
export class MemoryModel {
  readonly blocks: readonly GuestBlock[];
  readonly totalPages: number;
  readonly #prng: Prng;
  readonly #zeroOnDirty: number;
  readonly #writable: GuestBlock[];
  readonly #writableStart: number[];   // first global writable index of each writable block
  readonly #writablePages: number;
  readonly #marks: Uint8Array[];       // scratch for dirty(): one byte per page, always left clear

  constructor(opts: MemoryModelOptions = {}) {
    const specs = opts.blocks ?? defaultRamBlocks(opts.ramMiB ?? 64);
    assert(specs.length > 0, 'memory model needs at least one block');
    assert(new Set(specs.map((s) => s.idstr)).size === specs.length, 'block idstrs must be unique');
    this.#prng = new Prng(opts.seed ?? 1);
    this.#zeroOnDirty = opts.zeroOnDirty ?? 0.12;
    this.blocks = specs.map((s) => new GuestBlock(s));
    this.totalPages = this.blocks.reduce((n, b) => n + b.pages, 0);
    this.#marks = this.blocks.map((b) => new Uint8Array(b.pages));
    const writable = this.blocks.filter((b) => b.writable);
    this.#writable = writable.length > 0 ? writable : [...this.blocks];
    this.#writableStart = [];
    let n = 0;
    for (const b of this.#writable) { this.#writableStart.push(n); n += b.pages; }
    this.#writablePages = n;
    const zeroFraction = opts.zeroFraction ?? 0.4;
    for (const b of this.blocks) {
      for (let p = 0; p < b.pages; p++) if (!this.#prng.chance(zeroFraction)) this.#fillNonZero(b, p);
    }
  }

  /** The MEM_SIZE list for this guest. */
  ramBlocks(): RamBlockInfo[] {
    return this.blocks.map((b) => ({ idstr: b.idstr, usedLength: b.usedLength }));
  }

  /** Index of a block by name, or -1. */
  blockIndex(idstr: string): number {
    return this.blocks.findIndex((b) => b.idstr === idstr);
  }

  /** Copies of every block's memory, in block order. */
  snapshot(): Buffer[] {
    return this.blocks.map((b) => Buffer.from(b.host));
  }

  /** Let the guest run for one interval: write pages per `workload` and report which. */
  dirty(workload: Workload): DirtySet {
    const rnd = this.#prng;
    let target: number;
    let meanRun: number;
    if (workload === 'idle') {
      target = 45 + rnd.int(31);
      meanRun = 2;
    } else if (workload === 'load') {
      target = Math.round(drawLoadBytes(rnd) / TARGET_PAGE_SIZE);
      meanRun = 16;
    } else {
      assert(Number.isInteger(workload.pages) && workload.pages >= 0, 'workload.pages must be a non-negative integer');
      target = workload.pages;
      meanRun = 4;
    }
    target = Math.min(target, this.#writablePages);
    this.#pick(target, meanRun);

    const out: Uint32Array[] = [];
    let zeroed = 0;
    for (let bi = 0; bi < this.blocks.length; bi++) {
      const b = this.blocks[bi]!, marks = this.#marks[bi]!;
      let count = 0;
      for (let p = marks.indexOf(1); p !== -1; p = marks.indexOf(1, p + 1)) count++;
      const pages = new Uint32Array(count);
      let k = 0;
      for (let p = marks.indexOf(1); p !== -1; p = marks.indexOf(1, p + 1)) {
        marks[p] = 0;
        pages[k++] = p;
        if (this.#write(b, p)) zeroed++;
      }
      out.push(pages);
    }
    return { blocks: out, total: target, zeroed };
  }

  // Marks exactly `target` distinct writable pages, in runs (guests write neighbouring pages).
  #pick(target: number, meanRun: number): void {
    const rnd = this.#prng;
    if (target === 0) return;
    if (target >= this.#writablePages * 0.75) {
      // Dense: mark everything, then clear random pages; rejection sampling would crawl here.
      for (const b of this.#writable) this.#marks[this.blocks.indexOf(b)]!.fill(1);
      for (let left = this.#writablePages - target; left > 0;) {
        const [bi, p] = this.#locate(rnd.int(this.#writablePages));
        const m = this.#marks[bi]!;
        if (m[p] === 1) { m[p] = 0; left--; }
      }
      return;
    }
    for (let n = 0; n < target;) {
      const [bi, start] = this.#locate(rnd.int(this.#writablePages));
      const m = this.#marks[bi]!;
      const run = 1 + Math.floor(-Math.log(1 - rnd.float()) * (meanRun - 1));
      for (let p = start; p < m.length && p < start + run && n < target; p++) {
        if (m[p] === 0) { m[p] = 1; n++; }
      }
    }
  }

  // Global writable page index -> [block index in this.blocks, page in block].
  #locate(g: number): [number, number] {
    let lo = 0, hi = this.#writable.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (this.#writableStart[mid]! <= g) lo = mid; else hi = mid - 1;
    }
    const b = this.#writable[lo]!;
    return [this.blocks.indexOf(b), g - this.#writableStart[lo]!];
  }

  // One guest write to a page; true if the page is all-zero afterwards.
  #write(b: GuestBlock, page: number): boolean {
    const rnd = this.#prng, w = b.words, base = page * WORDS_PER_PAGE;
    if (rnd.chance(this.#zeroOnDirty)) {
      w.fill(0, base, base + WORDS_PER_PAGE);
      return true;
    }
    if (b.isZeroPage(page)) {
      this.#fillNonZero(b, page);
      return false;
    }
    // A partial rewrite, as most guest writes are: a few words change, the page stays non-zero.
    const n = 1 + rnd.int(64);
    for (let i = 0; i < n; i++) w[base + rnd.int(WORDS_PER_PAGE)] = rnd.u32();
    w[base + rnd.int(WORDS_PER_PAGE)] = rnd.u32() | 1;
    return false;
  }

  // Random (incompressible) or one of a few low-entropy shapes; never all-zero.
  #fillNonZero(b: GuestBlock, page: number): void {
    const rnd = this.#prng, w = b.words, base = page * WORDS_PER_PAGE, end = base + WORDS_PER_PAGE;
    const kind = rnd.float();
    if (kind < 0.55) {
      rnd.fillWords(w, base, end);
    } else if (kind < 0.7) {
      w.fill((rnd.u32() | 1) >>> 0, base, end);           // a repeated pattern (memset of a struct field)
    } else if (kind < 0.85) {
      for (let i = base; i < end; i++) w[i] = 0x20202020 + (rnd.u32() & 0x3f3f3f3f);   // text-like bytes
    } else {
      const n = 1 + rnd.int(32);                           // sparse: mostly zero, a few live words
      for (let i = 0; i < n; i++) w[base + rnd.int(WORDS_PER_PAGE)] = rnd.u32();
      w[base] = (w[base]! | 1) >>> 0;
    }
  }
}
