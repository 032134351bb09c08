import assert from 'node:assert/strict';

/**
 * A cursor over one complete, already length-checked header (pg-protocol's BufferReader).
 * Callers wait for the whole header before decoding, so an overrun is a bug, not bad input.
 */
export class Reader {
  #at = 0;
  constructor(readonly buf: Buffer) {}
  get offset(): number { return this.#at; }
  #need(n: number): void { assert(this.#at + n <= this.buf.length, 'reader overrun'); }
  u8(): number { this.#need(1); return this.buf[this.#at++]!; }
  u16(): number { this.#need(2); const v = this.buf.readUInt16BE(this.#at); this.#at += 2; return v; }
  u32(): number { this.#need(4); const v = this.buf.readUInt32BE(this.#at); this.#at += 4; return v; }
  /** be64 as a number; callers bound-check against 2^53 through `u64Safe`. */
  u64(): number { this.#need(8); const hi = this.buf.readUInt32BE(this.#at), lo = this.buf.readUInt32BE(this.#at + 4); this.#at += 8; return hi * 2 ** 32 + lo; }
  /** High word of the next be64, without consuming it (for range checks before `u64`). */
  peekU64High(): number { this.#need(8); return this.buf.readUInt32BE(this.#at); }
  bytes(n: number): Buffer { this.#need(n); const b = this.buf.subarray(this.#at, this.#at + n); this.#at += n; return b; }
  skip(n: number): void { this.#need(n); this.#at += n; }
  /** A NUL-padded fixed-size string field (MultiFDPacket_t.ramblock): QEMU forces the last byte to 0. */
  cstring(n: number): string {
    const b = this.bytes(n);
    let end = b.indexOf(0);
    if (end < 0 || end > n - 1) end = n - 1;
    return b.toString('latin1', 0, end);
  }
}

/** Encode helpers shared by the receiver's replies and the restore stream. */
export function be32(n: number): Buffer { const b = Buffer.allocUnsafe(4); b.writeUInt32BE(n >>> 0, 0); return b; }
export function be64(n: number): Buffer {
  const b = Buffer.allocUnsafe(8);
  b.writeUInt32BE(Math.floor(n / 2 ** 32), 0);
  b.writeUInt32BE(n >>> 0, 4);
  return b;
}
