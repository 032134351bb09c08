// Send side of multifd-compression zlib and zstd, as QEMU's multifd-zlib.c and multifd-zstd.c
// write it (spec §2.5.2, §2.5.3): one stream per channel for the whole session, each packet's
// normal pages fed one after another, the last one with a flush, the stream never finished.

import { Z_NO_FLUSH, Z_SYNC_FLUSH, ZlibStream } from '../compression/zlib-stream.js';
import { zstd } from '../compression/zstd.js';
import { MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MULTIFD_PACKET_SIZE } from '../wire/constants.js';
import type { MultiFDEncoder } from './multifd-builder.js';

// Each channel's output buffer: 7.2 allocates compressBound(512 KiB) for zlib and
// ZSTD_compressBound(512 KiB) for zstd; the receiver's buffer is 1 MiB (spec §2.5.2).
const OUT_BYTES = 2 * MULTIFD_PACKET_SIZE;

/**
 * `multifd-compression zlib` (zlib_send_setup / zlib_send_prepare): deflateInit(level) with
 * the zlib wrapper and a 32 KiB window, once per channel. Per packet every page is deflated
 * with Z_NO_FLUSH, the last one with Z_SYNC_FLUSH, so each payload ends in `00 00 ff ff`; the
 * 2-byte header appears only in the channel's first payload and no Adler-32 trailer is ever
 * written.
 */
export class ZlibEncoder implements MultiFDEncoder {
  readonly methodFlag = MULTIFD_FLAG_ZLIB;
  readonly #z: ZlibStream;
  readonly #out = Buffer.allocUnsafe(OUT_BYTES);

  /** `level`: multifd-zlib-level (default 1). */
  constructor(level = 1) {
    this.#z = new ZlibStream('deflate', level);
  }

  encode(pages: Buffer[]): Buffer {
    const z = this.#z, out = this.#out;
    let at = 0;
    for (let k = 0; k < pages.length; k++) {
      const page = pages[k]!;
      const flush = k === pages.length - 1 ? Z_SYNC_FLUSH : Z_NO_FLUSH;
      // do { deflate() } while (Z_OK && avail_in && avail_out): with room for the whole
      // flush, one call consumes the page; a full output buffer ends the packet in QEMU
      // with an error, here with a throw.
      let inAt = 0;
      do {
        z.write(flush, page, inAt, page.length - inAt, out, at, out.length - at);
        inAt += z.consumed;
        at += z.produced;
      } while (inAt < page.length && at < out.length);
      if (inAt < page.length || at === out.length) throw new RangeError('zlib: compressed packet larger than the output buffer');
    }
    return Buffer.from(out.subarray(0, at));
  }
}

/**
 * `multifd-compression zstd` (zstd_send_setup / zstd_send_prepare): ZSTD_initCStream(level)
 * once per channel, so the channel's payloads are one frame (descriptor 0x00: no content
 * size, no checksum; window 512 KiB at level 1). Per packet every page is fed with
 * ZSTD_e_continue, the last with ZSTD_e_flush; ZSTD_e_end is never sent.
 */
export class ZstdEncoder implements MultiFDEncoder {
  readonly methodFlag = MULTIFD_FLAG_ZSTD;
  readonly #c = new zstd.CCtx();
  readonly #out = Buffer.allocUnsafe(OUT_BYTES);

  /** `level`: multifd-zstd-level (default 1). */
  constructor(level = 1) {
    this.#c.setParameter(zstd.CParameter.compressionLevel, level);
  }

  encode(pages: Buffer[]): Buffer {
    const c = this.#c, out = this.#out;
    let at = 0;
    for (let k = 0; k < pages.length; k++) {
      const last = k === pages.length - 1;
      let src: Uint8Array = pages[k]!;
      // The page is consumed and, for the last one, everything buffered flushed (return 0).
      for (;;) {
        const [remaining, written, read] = c.compressStream2(out.subarray(at), src, last ? zstd.EndDirective.flush : zstd.EndDirective.continue);
        at += written;
        src = src.subarray(read);
        if (src.length === 0 && (!last || remaining === 0)) break;
        if (at === out.length) throw new RangeError('zstd: compressed packet larger than the output buffer');
      }
    }
    return Buffer.from(out.subarray(0, at));
  }
}
