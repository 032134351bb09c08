/**
 * One bit per target page, shared between the main thread and the page writers.
 * Every access goes through Atomics: two channels may mark pages of the same word at once
 * (7.2 even resends one page on two channels inside a sync segment, spec §3.4).
 */
export class DirtyBitmap {
  readonly words: Int32Array;
  constructor(readonly sab: SharedArrayBuffer, readonly pages: number) { this.words = new Int32Array(sab); }

  static alloc(pages: number): DirtyBitmap {
    return new DirtyBitmap(new SharedArrayBuffer(Math.ceil(pages / 32) * 4), pages);
  }

  /** Sets the bit; true if it was clean (test_and_set_bit; cf. colo_record_bitmap()). */
  mark(page: number): boolean {
    const bit = 1 << (page & 31);
    return (Atomics.or(this.words, page >>> 5, bit) & bit) === 0;
  }

  test(page: number): boolean {
    return (Atomics.load(this.words, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** Number of set bits; a diagnostic, not on the hot path. */
  count(): number {
    let n = 0;
    for (let i = 0; i < this.words.length; i++) {
      let w = Atomics.load(this.words, i);
      while (w !== 0) { w &= w - 1; n++; }
    }
    return n;
  }

  /**
   * Collect-and-clear words [from, to): Atomics.exchange per word so a bit set concurrently
   * is either taken now or stays for the next collection, never lost. Calls fn per set page.
   */
  drain(from: number, to: number, fn: (page: number) => void): number {
    let n = 0;
    for (let i = from; i < to; i++) {
      if (Atomics.load(this.words, i) === 0) continue;
      let w = Atomics.exchange(this.words, i, 0);
      while (w !== 0) {
        const low = w & -w;
        fn(i * 32 + (31 - Math.clz32(low)));
        w ^= low;
        n++;
      }
    }
    return n;
  }
}
