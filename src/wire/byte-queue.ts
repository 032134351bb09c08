import assert from 'node:assert/strict';

/**
 * Socket chunks in arrival order, consumed from the front (ws Receiver.consume). The head
 * chunk is never re-sliced: a read position (#off) moves through it, because on Node 20 a
 * Buffer subarray costs microseconds (a FastBuffer is constructed), which at one or two per
 * 4 KiB page capped the main channel at ~0.2 GB/s. Page bytes go out through Buffer#copy
 * (a memcpy, no allocation): one copy from the socket chunk to guest memory.
 * `consumed` is the stream offset of the next unread byte, used in error reports.
 */
export class ByteQueue {
  #chunks: Buffer[] = [];
  #head = 0;        // index of the first live chunk in #chunks
  #off = 0;         // bytes of #chunks[#head] already consumed
  #length = 0;
  #consumed = 0;

  get length(): number { return this.#length; }
  /** Bytes taken so far: the stream offset of the next byte. */
  get consumed(): number { return this.#consumed; }

  /**
   * Bytes of the stream that went around the queue (a socket read straight into their
   * destination): counted, so stream offsets in errors stay right. Only while the queue is empty.
   */
  consumedElsewhere(n: number): void {
    if (this.#length !== 0) throw new Error('ByteQueue: bytes taken around a non-empty queue would reorder the stream');
    this.#consumed += n;
  }

  push(c: Buffer): void {
    if (c.length === 0) return;
    this.#chunks.push(c);
    this.#length += c.length;
  }

  /** Drops the head chunk once fully read; compacts the array now and then, not per chunk. */
  #advance(n: number): void {
    this.#off += n;
    this.#length -= n;
    this.#consumed += n;
    const head = this.#chunks[this.#head];
    if (head !== undefined && this.#off === head.length) {
      this.#chunks[this.#head] = EMPTY;
      this.#head++;
      this.#off = 0;
      if (this.#head === this.#chunks.length) { this.#chunks = []; this.#head = 0; }
      else if (this.#head >= 1024) { this.#chunks = this.#chunks.slice(this.#head); this.#head = 0; }
    }
  }

  /** Next n bytes: a view if they sit in one chunk, else one copy. Decode it now; never keep it. */
  take(n: number): Buffer {
    assert(n <= this.#length, 'take past end');
    if (n === 0) return EMPTY;
    const head = this.#chunks[this.#head]!;
    if (this.#off + n > head.length) {
      const out = Buffer.allocUnsafe(n);
      this.copyInto(out, 0, n);
      return out;
    }
    const v = this.#off === 0 && n === head.length ? head : head.subarray(this.#off, this.#off + n);
    this.#advance(n);
    return v;
  }

  /** Byte at position i from the read position, without consuming. */
  peekByte(i = 0): number {
    assert(i < this.#length, 'peek past end');
    i += this.#off;
    for (let k = this.#head; k < this.#chunks.length; k++) {
      const c = this.#chunks[k]!;
      if (i < c.length) return c[i]!;
      i -= c.length;
    }
    assert.fail('unreachable');
  }

  /** be32 at position i from the read position, without consuming or allocating. */
  peekU32(i = 0): number {
    assert(i + 4 <= this.#length, 'peek past end');
    const head = this.#chunks[this.#head]!;
    const at = this.#off + i;
    // Bytes by index: Buffer#readUInt32BE validates its argument on every call.
    if (at + 4 <= head.length) return ((head[at]! << 24) | (head[at + 1]! << 16) | (head[at + 2]! << 8) | head[at + 3]!) >>> 0;
    return ((this.peekByte(i) << 24) | (this.peekByte(i + 1) << 16) | (this.peekByte(i + 2) << 8) | this.peekByte(i + 3)) >>> 0;
  }

  /** First n bytes without consuming (a copy when they span chunks). */
  peek(n: number): Buffer {
    assert(n <= this.#length, 'peek past end');
    if (n === 0) return EMPTY;
    const head = this.#chunks[this.#head]!;
    if (this.#off + n <= head.length) return head.subarray(this.#off, this.#off + n);
    const out = Buffer.allocUnsafe(n);
    let at = 0, off = this.#off;
    for (let k = this.#head; at < n; k++) {
      const c = this.#chunks[k]!;
      const m = Math.min(c.length - off, n - at);
      c.copy(out, at, off, off + m);
      at += m;
      off = 0;
    }
    return out;
  }

  /**
   * Move n bytes into dst[at..]: the copy a guest page makes on its way to memory.
   * V8 copies into a SharedArrayBuffer with relaxed atomics, word by word only when source
   * and target have the same alignment and byte by byte otherwise (measured 2.5 vs 14 GB/s).
   * Page bytes follow variable-length record headers in the socket chunk, so a misaligned
   * source is first copied to an aligned scratch (a plain memcpy), then into shared memory.
   */
  copyInto(dst: Uint8Array, at: number, n: number): void {
    assert(n <= this.#length, 'copy past end');
    const shared = dst.buffer instanceof SharedArrayBuffer;
    while (n > 0) {
      const head = this.#chunks[this.#head]!;
      const k = Math.min(n, head.length - this.#off);
      const skew = (dst.byteOffset + at) & 7;
      const src = head.byteOffset + this.#off;
      // Views, not Buffer#copy: its argument checks cost more than the 4 KiB memcpy.
      if (shared && (src & 7) !== skew) {
        for (let done = 0; done < k;) {
          const m = Math.min(k - done, SCRATCH_BYTES);
          SCRATCH.set(new Uint8Array(head.buffer, src + done, m), skew);
          dst.set(skew === 0 && m === PAGE ? SCRATCH_PAGE : new Uint8Array(SCRATCH.buffer, skew, m), at + done);
          done += m;
        }
      } else {
        dst.set(new Uint8Array(head.buffer, src, k), at);
      }
      this.#advance(k);
      at += k;
      n -= k;
    }
  }

  skip(n: number): void {
    assert(n <= this.#length, 'skip past end');
    const head = this.#chunks[this.#head];
    if (head !== undefined && this.#off + n < head.length) {   // common case: inside the head chunk
      this.#off += n;
      this.#length -= n;
      this.#consumed += n;
      return;
    }
    while (n > 0) {
      const head = this.#chunks[this.#head]!;
      const k = Math.min(n, head.length - this.#off);
      this.#advance(k);
      n -= k;
    }
  }

  /** Everything buffered as one Buffer (one copy if it spans chunks), without consuming. */
  peekAll(): Buffer { return this.peek(this.#length); }

  /** Give back bytes read ahead (a footer scan that over-read): they become the head again. */
  unshift(b: Buffer): void {
    if (b.length === 0) return;
    if (this.#off > 0) {
      this.#chunks[this.#head] = this.#chunks[this.#head]!.subarray(this.#off);
      this.#off = 0;
    }
    if (this.#head > 0) { this.#head--; this.#chunks[this.#head] = b; }
    else this.#chunks.unshift(b);
    this.#length += b.length;
    this.#consumed -= b.length;
  }

  clear(): void {
    this.#consumed += this.#length;
    this.#chunks = [];
    this.#head = 0;
    this.#off = 0;
    this.#length = 0;
  }
}

const EMPTY = Buffer.alloc(0);
const SCRATCH_BYTES = 64 * 1024;
/** Own ArrayBuffer: byteOffset 0, so its alignment is the allocator's (>= 8). */
const SCRATCH = new Uint8Array(SCRATCH_BYTES + 8);
const PAGE = 4096;
const SCRATCH_PAGE = new Uint8Array(SCRATCH.buffer, 0, PAGE);
