import assert from 'node:assert/strict';

/**
 * Socket chunks in arrival order. `take` hands out a view when the bytes sit in one
 * chunk and copies only across chunk boundaries (ws Receiver.consume does the same):
 * a guest page therefore makes exactly one copy on its way from the socket to RAM.
 * `consumed` is the stream offset of the next unread byte, used in error reports.
 */
export class ByteQueue {
  #chunks: Buffer[] = [];
  #length = 0;
  #consumed = 0;

  get length(): number { return this.#length; }
  /** Bytes taken so far: the stream offset of the next byte. */
  get consumed(): number { return this.#consumed; }

  push(c: Buffer): void {
    if (c.length === 0) return;
    this.#chunks.push(c);
    this.#length += c.length;
  }

  /** Next n bytes: a view if they sit in one chunk, else one copy. Decode it now; never keep it. */
  take(n: number): Buffer {
    assert(n <= this.#length, 'take past end');
    const head = this.#chunks[0];
    if (head === undefined || n > head.length) {
      const out = Buffer.allocUnsafe(n);
      this.copyInto(out, 0, n);
      return out;
    }
    this.#length -= n;
    this.#consumed += n;
    if (n === head.length) { this.#chunks.shift(); return head; }
    this.#chunks[0] = head.subarray(n);
    return head.subarray(0, n);
  }

  /** Byte at position i from the head, without consuming. */
  peekByte(i = 0): number {
    assert(i < this.#length, 'peek past end');
    for (const c of this.#chunks) {
      if (i < c.length) return c[i]!;
      i -= c.length;
    }
    assert.fail('unreachable');
  }

  /** First n bytes without consuming (a copy when they span chunks). */
  peek(n: number): Buffer {
    assert(n <= this.#length, 'peek past end');
    // peek(0) of an empty queue has no head chunk: return an empty buffer, not a TypeError.
    const head = this.#chunks[0];
    if (head === undefined) return Buffer.alloc(0);
    if (n <= head.length) return head.subarray(0, n);
    const out = Buffer.allocUnsafe(n);
    let at = 0;
    for (const c of this.#chunks) {
      const k = Math.min(c.length, n - at);
      c.copy(out, at, 0, k);
      at += k;
      if (at === n) break;
    }
    return out;
  }

  /** Move n bytes into dst[at..]: the single copy a guest page makes on its way to memory. */
  copyInto(dst: Uint8Array, at: number, n: number): void {
    assert(n <= this.#length, 'copy past end');
    this.#length -= n;
    this.#consumed += n;
    for (let k = 0; n > 0; at += k, n -= k) {
      const head = this.#chunks[0]!;
      k = Math.min(n, head.length);
      dst.set(k === head.length ? head : head.subarray(0, k), at);
      if (k === head.length) this.#chunks.shift(); else this.#chunks[0] = head.subarray(k);
    }
  }

  skip(n: number): void {
    assert(n <= this.#length, 'skip past end');
    this.#length -= n;
    this.#consumed += n;
    while (n > 0) {
      const head = this.#chunks[0]!;
      if (n >= head.length) { n -= head.length; this.#chunks.shift(); } else { this.#chunks[0] = head.subarray(n); n = 0; }
    }
  }

  /** Everything buffered as one Buffer (one copy if it spans chunks), without consuming. */
  peekAll(): Buffer { return this.#length === 0 ? Buffer.alloc(0) : this.peek(this.#length); }

  /** Give back bytes read ahead (a footer scan that over-read): they become the head again. */
  unshift(b: Buffer): void {
    if (b.length === 0) return;
    this.#chunks.unshift(b);
    this.#length += b.length;
    this.#consumed -= b.length;
  }

  clear(): void { this.#consumed += this.#length; this.#chunks = []; this.#length = 0; }
}
