// The sender's sockets. A Link is one TCP connection (main or multifd) that knows when its writes
// reached the kernel; the Wire is all links in one send order, counting bytes per segment
// (the precopy migration, or one COLO checkpoint) so that a fault can cut the stream at an
// exact byte, across channels.

import type { Socket } from 'node:net';
import { MigrationError } from '../errors.js';
import { StreamBuilder } from './stream-builder.js';

/** Thrown inside the source when killAt fires; run() turns it into `{ killed: true }`. */
export class SourceKilled extends Error {
  override name = 'SourceKilled';
}

/**
 * One socket. Writes complete in order, so a FIFO of "return this buffer to that pool" entries
 * replaces a closure per write. `write()` reports when the socket holds more than `maxBuffered`
 * unsent bytes; `writable()` then waits until it is below half of that.
 */
export class Link {
  readonly socket: Socket;
  readonly label: string;
  /** Bytes handed to this socket. */
  bytes = 0;
  readonly #max: number;
  #inflight = 0;
  #pools: Array<Buffer[] | null> = [];
  #bufs: Array<Buffer | null> = [];
  #head = 0;
  #idle: Waiter[] = [];
  #room: Waiter[] = [];
  #failWatch: Array<(e: Error) => void> = [];
  #failed: Error | undefined;
  readonly #onWritten = (): void => this.#written();

  constructor(socket: Socket, label: string, maxBuffered: number) {
    this.socket = socket;
    this.label = label;
    this.#max = maxBuffered;
    socket.setNoDelay(true);
    socket.on('error', (err) => this.#fail(new MigrationError('ERR_PEER', `${label}: ${err.message}`, label, undefined, { cause: err })));
    socket.on('close', () => this.#fail(new MigrationError('ERR_PEER', `${label}: connection closed`, label)));
  }

  /** Set when the socket errored or closed. */
  get failed(): Error | undefined {
    return this.#failed;
  }

  /**
   * Queue bytes; `pool`/`whole` give `whole` back to `pool` once the bytes reached the kernel.
   * Returns true if the caller should await writable() before writing more.
   */
  write(buf: Buffer, pool: Buffer[] | null = null, whole: Buffer | null = null): boolean {
    if (this.#failed !== undefined) throw this.#failed;
    this.#inflight++;
    this.#pools.push(pool);
    this.#bufs.push(whole);
    this.bytes += buf.length;
    this.socket.write(buf, this.#onWritten);
    return this.socket.writableLength > this.#max;
  }

  /** Resolves once the socket is below half its buffer limit. */
  writable(): Promise<void> {
    if (this.socket.writableLength <= this.#max / 2) return Promise.resolve();
    return this.#wait(this.#room);
  }

  /** Resolves once every write so far has been handed to the kernel ("fully written"). */
  flushed(): Promise<void> {
    if (this.#inflight === 0) return Promise.resolve();
    return this.#wait(this.#idle);
  }

  /** Resolves with the link's failure, whenever it happens. */
  whenFailed(): Promise<Error> {
    if (this.#failed !== undefined) return Promise.resolve(this.#failed);
    return new Promise((resolve) => this.#failWatch.push(resolve));
  }

  #wait(list: Waiter[]): Promise<void> {
    if (this.#failed !== undefined) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => { list.push({ resolve, reject }); });
  }

  #written(): void {
    this.#inflight--;
    const pool = this.#pools[this.#head], whole = this.#bufs[this.#head];
    this.#pools[this.#head] = null;
    this.#bufs[this.#head] = null;
    this.#head++;
    if (this.#head > 1024 && this.#head * 2 > this.#pools.length) {
      this.#pools = this.#pools.slice(this.#head);
      this.#bufs = this.#bufs.slice(this.#head);
      this.#head = 0;
    }
    if (pool !== null && pool !== undefined && whole !== null && whole !== undefined && pool.length < 16) pool.push(whole);
    if (this.#room.length > 0 && this.socket.writableLength <= this.#max / 2) wake(this.#room);
    if (this.#inflight === 0) wake(this.#idle);
  }

  #fail(err: Error): void {
    if (this.#failed !== undefined) return;
    this.#failed = err;
    for (const w of this.#idle.splice(0)) w.reject(err);
    for (const w of this.#room.splice(0)) w.reject(err);
    for (const f of this.#failWatch.splice(0)) f(err);
  }
}

interface Waiter { resolve: () => void; reject: (e: Error) => void }

function wake(list: Waiter[]): void {
  for (const w of list.splice(0)) w.resolve();
}

/** Where a segment of the session is cut: after `byteOffset` bytes of it. */
export interface CutPoint {
  byteOffset: number;
}

/**
 * All links of a session in one send order. Counts the bytes of the current segment and, when a
 * cut is armed, writes exactly up to it (a partial chunk if need be), waits until everything
 * written reached the kernel, then destroys every socket.
 */
export class Wire {
  readonly links: Link[] = [];
  /** Bytes handed to all sockets, over the session. */
  total = 0;
  #segment = 0;
  #cut = -1;
  #killing: Promise<void> | undefined;

  /** Bytes of the current segment so far. */
  get segmentBytes(): number {
    return this.#segment;
  }

  /** True once a cut fired. */
  get killed(): boolean {
    return this.#killing !== undefined;
  }

  /** Start counting a new segment; with `cut`, the session dies after cut.byteOffset of its bytes. */
  beginSegment(cut?: CutPoint): void {
    this.#segment = 0;
    this.#cut = cut === undefined ? -1 : cut.byteOffset;
  }

  /**
   * Write on link `i`; see Link.write. Throws SourceKilled when the cut is reached: the bytes up
   * to the cut are written, nothing after.
   */
  send(i: number, buf: Buffer, pool: Buffer[] | null = null, whole: Buffer | null = null): boolean {
    if (this.#killing !== undefined) throw new SourceKilled('session was cut');
    const link = this.links[i]!;
    if (this.#cut >= 0) {
      const room = this.#cut - this.#segment;
      if (buf.length >= room) {
        if (room > 0) link.write(buf.subarray(0, room));
        this.#segment += room;
        this.total += room;
        this.#killing = this.#kill();
        throw new SourceKilled(`cut after ${this.#cut} bytes of the segment`);
      }
    }
    this.#segment += buf.length;
    this.total += buf.length;
    return link.write(buf, pool, whole);
  }

  /** Resolves when a fired cut has destroyed every socket. */
  async afterKill(): Promise<void> {
    await this.#killing;
  }

  /** Destroy every socket now. */
  destroyAll(): void {
    for (const l of this.links) l.socket.destroy();
  }

  async #kill(): Promise<void> {
    // Bytes already written on other links belong before the cut: let them reach the kernel
    // first, or destroy() would drop them. A peer that stopped reading must not hang us.
    const flushed = Promise.all(this.links.map((l) => l.flushed().catch(() => undefined)));
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => { timer = setTimeout(resolve, 2000); });
    await Promise.race([flushed, timeout]);
    clearTimeout(timer);
    this.destroyAll();
  }
}

/**
 * The main channel's send side: a StreamBuilder staged like QEMUFile's buffer and flushed to
 * link 0 when it holds `flushBytes`, or at a flush point (markers, COLO messages: qemu_fflush).
 */
export class MainChannel {
  readonly builder = new StreamBuilder();
  readonly #wire: Wire;
  readonly #flushBytes: number;

  constructor(wire: Wire, flushBytes: number) {
    this.#wire = wire;
    this.#flushBytes = flushBytes;
  }

  /** Send everything staged; a promise means: wait for it before writing more. */
  flush(): Promise<void> | undefined {
    let full = false;
    for (const c of this.builder.drain()) full = this.#wire.send(0, c) || full;
    return full ? this.#wire.links[0]!.writable() : undefined;
  }

  /** flush() once the stage holds flushBytes, as QEMUFile does when its buffer fills. */
  maybeFlush(): Promise<void> | undefined {
    return this.builder.pendingBytes >= this.#flushBytes ? this.flush() : undefined;
  }
}
