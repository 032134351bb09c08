import assert from 'node:assert/strict';
import zlib from 'node:zlib';

export const Z_NO_FLUSH = zlib.constants.Z_NO_FLUSH;
export const Z_SYNC_FLUSH = zlib.constants.Z_SYNC_FLUSH;

/**
 * The native handle behind a node:zlib stream: `writeSync` is one deflate()/inflate() call
 * on the caller's buffers, and `writeState` receives [avail_out, avail_in] after it. This is
 * what zlib.inflateSync() runs on, minus the close at the end (its processChunkSync closes
 * the handle after one call, so `_processChunk` cannot carry a stream across packets).
 */
interface ZlibHandle {
  writeSync(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  onerror: (message: string, errno: number, code?: string) => void;
  close(): void;
}

/**
 * One zlib stream driven synchronously, as QEMU's multifd-zlib.c drives its z_stream: each
 * call reads from and writes into the caller's memory (a SharedArrayBuffer view is fine), so
 * inflate writes decoded bytes straight into their page. Never finished, never reset.
 */
export class ZlibStream {
  /** Bytes written to `out` and read from `input` by the last call. */
  produced = 0;
  consumed = 0;
  readonly #stream: zlib.Inflate | zlib.Deflate;   // owns the handle; kept so it stays alive
  readonly #h: ZlibHandle;
  readonly #state: Uint32Array;
  #error: string | null = null;

  /**
   * 'inflate': inflateInit() (zlib wrapper, 32 KiB window) as zlib_recv_setup();
   * 'deflate': deflateInit(level) as zlib_send_setup(): zlib wrapper, 32 KiB window, memLevel 8.
   */
  constructor(kind: 'inflate' | 'deflate', level = 1) {
    this.#stream = kind === 'inflate' ? zlib.createInflate() : zlib.createDeflate({ level, windowBits: 15, memLevel: 8 });
    const s = this.#stream as unknown as { _handle?: ZlibHandle; _writeState?: Uint32Array };
    assert(typeof s._handle?.writeSync === 'function' && s._writeState instanceof Uint32Array, 'node:zlib has no synchronous handle (internals changed)');
    this.#h = s._handle;
    this.#state = s._writeState;
    // zlib errors arrive synchronously through onerror; the stream's own handler would
    // destroy it and emit 'error' later. Keep the message and throw it from write().
    this.#h.onerror = (message, errno) => { this.#error = `${message} (errno ${errno})`; };
  }

  get failed(): boolean { return this.#error !== null; }

  /** One deflate()/inflate() call with `flush`. Throws an Error carrying zlib's message. */
  write(flush: number, input: Uint8Array, inOff: number, inLen: number, out: Uint8Array, outOff: number, outLen: number): void {
    if (this.#error !== null) throw new Error(`zlib: stream failed earlier: ${this.#error}`);
    this.#h.writeSync(flush, input, inOff, inLen, out, outOff, outLen);
    if (this.#error !== null) throw new Error(`zlib: ${this.#error}`);
    this.produced = outLen - this.#state[0]!;
    this.consumed = inLen - this.#state[1]!;
  }

  close(): void { this.#stream.close(); }
}
