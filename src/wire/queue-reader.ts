import type { ByteQueue } from './byte-queue.js';

/** Below this much room left in the buffer a read goes to a fresh one. */
const MIN_READ_BYTES = 64 * 1024;

/**
 * Socket reads for a parser fed through a ByteQueue (the main channel), into memory reused
 * from read to read instead of Node's fresh 64 KiB Buffer per read and its way through a
 * Readable stream (src/net/direct-read.ts adopts the socket). Bytes the parser left queued
 * (a record cut by the read, a channel held at a barrier) are never overwritten: the next read
 * goes after them, or into a new buffer when this one is full; once the queue is empty the
 * buffer is reused from its start. The parser never keeps a view of queued bytes (ByteQueue
 * take(): "decode it now").
 *
 * Each read is placed so that the byte the parser expects next lands at the alignment it asks
 * for (`align()`, 0..7): page bytes that follow a record header then sit 8-byte aligned, and
 * V8 copies them into shared memory word by word in one pass (misaligned, ByteQueue#copyInto
 * goes through a scratch copy first).
 */
export class QueueReader {
  #buf: Buffer;
  #at = 0;
  #readAt = 0;

  constructor(
    private readonly q: ByteQueue,
    private readonly onData: () => void,
    private readonly align: () => number = () => 0,
    private readonly size = 512 * 1024,
  ) {
    this.#buf = Buffer.allocUnsafeSlow(size);
  }

  readTarget(): Uint8Array {
    if (this.q.length === 0) this.#at = 0;
    const want = this.align() & 7;
    let at = this.#at + ((want - (this.#at & 7) + 8) & 7);
    if (this.#buf.length - at < MIN_READ_BYTES) {
      this.#buf = Buffer.allocUnsafeSlow(this.size);
      this.#at = 0;
      at = want;
    }
    this.#readAt = at;
    return this.#buf.subarray(at);
  }

  onDirectRead(n: number): void {
    this.#at = this.#readAt + n;
    this.q.push(this.#buf.subarray(this.#readAt, this.#at));
    this.onData();
  }
}
