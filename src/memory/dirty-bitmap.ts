/**
 * One bit per target page in a SharedArrayBuffer. Every access goes through Atomics, so any
 * thread may mark pages (mark) while another drains them at a commit: a bit set concurrently
 * is taken now or stays for the next collection. The receiver itself records pages on the
 * thread that places them (record), gathered per word.
 */
export class DirtyBitmap {
  readonly words: Int32Array;
  constructor(readonly sab: SharedArrayBuffer, readonly pages: number) { this.words = new Int32Array(sab); }

  static alloc(pages: number): DirtyBitmap {
    return new DirtyBitmap(new SharedArrayBuffer(Math.ceil(pages / 32) * 4), pages);
  }

  /** Bits recorded for one word by record(), not yet in `words`. */
  #word = -1;
  #bits = 0;

  /**
   * colo_record_bitmap() for the thread that places pages (the main thread: it picks every
   * page's slot). Pages come in ascending runs (a packet's offsets, a section's records), so
   * the bits of one word are gathered and stored with one Atomics.or when the next page is
   * in another word, or before anything reads the bitmap (test, count, drain call flush()).
   * One Atomics.or per page was 9 % of the main thread's CPU under load (perf, plain COLO).
   */
  record(page: number): void {
    const w = page >>> 5;
    if (w !== this.#word) { this.flush(); this.#word = w; }
    this.#bits |= 1 << (page & 31);
  }

  /** Stores what record() gathered. */
  flush(): void {
    if (this.#bits !== 0) Atomics.or(this.words, this.#word, this.#bits);
    this.#word = -1;
    this.#bits = 0;
  }

  /** Sets the bit now; true if it was clean (test_and_set_bit; cf. colo_record_bitmap()). */
  mark(page: number): boolean {
    const bit = 1 << (page & 31);
    return (Atomics.or(this.words, page >>> 5, bit) & bit) === 0;
  }

  test(page: number): boolean {
    this.flush();
    return (Atomics.load(this.words, page >>> 5) & (1 << (page & 31))) !== 0;
  }

  /** Number of set bits; a diagnostic, not on the hot path. */
  count(): number {
    this.flush();
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
    this.flush();
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
