import { EventEmitter, once } from 'node:events';
import { createServer, Socket } from 'node:net';
import { availableParallelism } from 'node:os';
import { getSystemErrorName } from 'node:util';
import { MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { Piscina } from 'piscina';
import type { Logger } from '../log.js';
import { sabIds } from '../pool/sab-ids.js';
import { detachPaused, pausedLoopbackPair, type CountingServer, type DirectReader, type SocketHandle } from './direct-read.js';
import {
  CMD, CMD_EXACT, CMD_LENGTH, CMD_OFFSET, CMD_PACKETS, CMD_READ, CMD_REGION, CMD_SEQ, CMD_STOP, CTL_WORDS, EVT_DATA,
  EVT_END, EVT_ERRNO, EVT_KIND, EVT_N, EVT_SEQ, MSG_BAD, MSG_END, MSG_ERROR, MSG_PACKET, P_DONE, P_IN_PACKET,
  P_RELEASE, P_RES_HEAD, P_WAKE, RES_BASE, RES_PARTS, RES_SLOTS, RES_WORDS, SCRATCH_REGION, type SocketReadSummary, type SocketReadTask,
} from './socket-reader.js';
import { MULTIFD_PACKET_HEADER_LEN } from '../wire/constants.js';

/**
 * A multifd connection read by its own thread (src/net/socket-reader.ts), as QEMU runs one
 * multifd_recv_thread per channel: on the main thread the kernel's socket copy was the largest
 * single cost of a multifd checkpoint (perf: `_copy_to_iter` 26–38 % of the thread, for all
 * channels at once). The parser and the page table stay on the main thread.
 *
 * Two modes. Command mode, for the bytes before the first packet boundary: the parser says
 * where each read goes (DirectReader), the reader fills it and answers once. Packet mode, from
 * a packet boundary on (PacketReader): the parser keeps a few payload areas reserved ahead
 * (runs of free page slots), the reader reads each packet's header and payload by itself and
 * the parser hears of the packet once it is whole; it waits for the parser only at a SYNC (the
 * barrier) or when every reservation is in use. The migration sees a socket that pauses,
 * resumes, times out, ends and is destroyed.
 *
 * Node cannot move a socket to another thread, so the reader opens a second handle on the
 * same descriptor. The main thread's handle is parked: reading stopped, detached from its
 * Socket and never closed, because the reader's handle closes the descriptor, and closing it
 * twice could close whatever connection reused the number. readerThreadsSelfTest() checks it
 * all at startup. Used from READER_THREADS_MIN_CORES cores on; `COLO_READER_THREADS=1|0` forces it.
 */

const WORKER_URL = new URL('../../workers/socket-reader.js', import.meta.url).href;
/** As for the page writers (src/pool/page-pool.ts): piscina's import() path, not require(esm). */
const WORKER_EXEC_ARGV = ['--no-experimental-require-module'];
/** Header, handshake and side reads land here first; the largest is the parser's 64 KiB side read. */
const SCRATCH_BYTES = 64 * 1024;

interface Internal { _handle?: SocketHandle | null; _server?: CountingServer | null }

/**
 * Handles whose descriptor a reader thread owns: kept here for the life of the process so
 * they are never closed (see above). A few hundred bytes per multifd connection.
 */
const parked = new Set<SocketHandle>();

/** Memory a reader thread may read one packet's payload into, in order, reserved by the parser. */
export interface Reservation {
  /** At most RES_PARTS; together at least the largest payload (128 pages). */
  parts: { sab: SharedArrayBuffer; offset: number; bytes: number }[];
}

/**
 * A parser that can hand a whole connection to its reader thread (packet mode): the
 * multifd channel, between two packets.
 */
export interface PacketReader extends DirectReader {
  /** Between two packets with nothing queued: the reader may take over from here. */
  packetsReady(): boolean;
  /** A payload area for a packet to come, or null (none now: asked again after each packet). */
  reserve(): Reservation | null;
  /** A reservation the reader will never fill (the connection ended). */
  unreserve(r: Reservation): void;
  /** One packet, whole: its header, and its payload (`payloadBytes`) in `res`. */
  onReaderPacket(header: Buffer, payloadBytes: number, res: Reservation | null): void;
  /** A header the reader could not size: decode it to the peer's error. */
  onReaderBadHeader(header: Buffer): void;
  /** EOF `into` bytes of a packet (0 at a packet boundary). */
  onReaderEnd(into: number): void;
  /** The reader is inside a packet (the peer owes bytes): set by the socket. */
  midPacket?: () => boolean;
  /** Reservations can be made again (a staging slot came back): set by the socket. */
  onReservable?: () => void;
}

const isPacketReader = (r: DirectReader): r is PacketReader => typeof (r as Partial<PacketReader>).packetsReady === 'function';

/** What the migration uses of a connection (a net.Socket has all of it). */
export interface Conn extends EventEmitter {
  pause(): unknown;
  resume(): unknown;
  destroy(): unknown;
  setTimeout(ms: number): unknown;
  setNoDelay(noDelay?: boolean): unknown;
}

let pool: Piscina<SocketReadTask, SocketReadSummary> | null = null;
function readers(): Piscina<SocketReadTask, SocketReadSummary> {
  pool ??= new Piscina<SocketReadTask, SocketReadSummary>({
    filename: WORKER_URL,
    name: 'handle',
    // One thread per connection for its whole life, as QEMU's; a thread outlives its
    // connection a while so the next migration's channels do not start threads again.
    minThreads: 0,
    maxThreads: 256,
    concurrentTasksPerWorker: 1,
    idleTimeout: 60_000,
    execArgv: WORKER_EXEC_ARGV,
  });
  return pool;
}

/**
 * The main thread's side of one reader thread: a socket-like object that feeds `r`.
 * One command is outstanding at a time; pause() only withholds the next one.
 */
export class ThreadedSocket extends EventEmitter implements Conn {
  readonly #ctlSab = new SharedArrayBuffer(CTL_WORDS * 4);
  readonly #ctl = new Int32Array(this.#ctlSab);
  readonly #scratchSab = new SharedArrayBuffer(SCRATCH_BYTES);
  readonly #scratch = new Uint8Array(this.#scratchSab);
  readonly #port: MessagePort;
  readonly #sent = new Set<number>();
  readonly #unsubscribe: () => void;
  #evt = 0;
  #outstanding = false;
  #paused = true;
  #inEvent = false;
  #destroyed = false;
  #ended = false;
  /** The target the outstanding command fills when it is not shared memory (copied on arrival). */
  #copyTo: Uint8Array | null = null;
  #timeoutMs = 0;
  #timer: NodeJS.Timeout | null = null;
  /** Packet mode: the reader reads whole packets; reservations published, SYNCs processed. */
  #packets = false;
  readonly #res: (Reservation | null)[] = new Array<Reservation | null>(RES_SLOTS).fill(null);
  #resHead = 0;
  #resTail = 0;
  #done = 0;
  #syncs = 0;
  /** Reader thread's counters, once it ended. */
  summary: SocketReadSummary | null = null;

  constructor(fd: number, private readonly r: DirectReader, server: CountingServer | null) {
    super();
    const ch = new MessageChannel();
    this.#port = ch.port1;
    this.#port.on('message', (m: number | number[]) => this.#onMessage(m));
    if (isPacketReader(r)) {
      r.midPacket = () => this.#packets && Atomics.load(this.#ctl, P_IN_PACKET) === 1;
      r.onReservable = () => this.refill();
    }
    this.#unsubscribe = sabIds.onGone((uid) => { if (this.#sent.delete(uid)) this.#port.postMessage({ uid, evict: true }); });
    const task: SocketReadTask = { op: 'read', fd, ctl: this.#ctlSab, scratch: this.#scratchSab, port: ch.port2 };
    readers().run(task, { transferList: [ch.port2] }).then(
      (s) => { this.summary = s; this.#closed(server); },
      (e: unknown) => {
        if (!this.#destroyed && !this.#ended) this.emit('error', new Error(`multifd reader thread failed: ${String(e)}`, { cause: e }));
        this.#closed(server);
      },
    );
  }

  get destroyed(): boolean { return this.#destroyed; }

  pause(): this { this.#paused = true; return this; }

  resume(): this {
    this.#paused = false;
    if (this.#packets) {
      // Released from a barrier: the reader may go past the SYNC packets taken so far.
      if (Atomics.load(this.#ctl, P_RELEASE) !== this.#syncs) { Atomics.store(this.#ctl, P_RELEASE, this.#syncs); this.#wake(); }
      return this;
    }
    if (!this.#inEvent) this.#issue();
    return this;
  }

  setNoDelay(): this { return this; }

  /** As net.Socket's: 'timeout' after `ms` without bytes, paused or not; 0 turns it off. */
  setTimeout(ms: number): this {
    this.#timeoutMs = ms;
    this.#armTimer();
    return this;
  }

  destroy(): this {
    if (this.#destroyed) return this;
    this.#destroyed = true;
    this.#clearTimer();
    this.#command(CMD_STOP);
    this.#wake();
    // A reader idle in its event loop (no bytes coming) hears the stop on its port.
    this.#port.postMessage({ stop: true });
    return this;
  }

  #closed(server: CountingServer | null): void {
    // The reader's last word (its EOF, an error) may still be queued on the port: the task's
    // result came over piscina's own port, and two ports keep no order between them.
    for (let m = receiveMessageOnPort(this.#port); m !== undefined; m = receiveMessageOnPort(this.#port)) this.#onMessage(m.message as number | number[]);
    if (isPacketReader(this.r)) for (const res of this.#res.splice(0)) if (res) this.r.unreserve(res);
    this.#clearTimer();
    this.#unsubscribe();
    this.#port.close();
    this.#destroyed = true;
    // As a net.Socket's, 'close' comes in a later turn than the 'end' drained just above: code
    // that reacts to 'end' (an await) and then waits for 'close' must not find it already gone.
    // The task's result can overtake the EOF message, so without this both were emitted in one call.
    setImmediate(() => {
      if (server) { server._connections--; server._emitCloseIfDrained?.(); }
      this.emit('close', false);
    });
  }

  #wake(): void {
    Atomics.add(this.#ctl, P_WAKE, 1);
    Atomics.notify(this.#ctl, P_WAKE);
  }

  /** Publishes a command (its operand words are written first). */
  #command(cmd: number): void {
    this.#ctl[CMD] = cmd;
    Atomics.add(this.#ctl, CMD_SEQ, 1);
    Atomics.notify(this.#ctl, CMD_SEQ);
  }

  /** The number the reader knows `sab` by, sending it first if it has not got it yet. */
  #region(sab: SharedArrayBuffer): number {
    const uid = sabIds.uidOf(sab);
    if (!this.#sent.has(uid)) { this.#port.postMessage({ uid, sab }); this.#sent.add(uid); }
    return uid;
  }

  /** A copy of the header in the reader's header slot `slot`. */
  #header(slot: number): Buffer {
    return Buffer.from(this.#scratch.subarray(slot * MULTIFD_PACKET_HEADER_LEN, (slot + 1) * MULTIFD_PACKET_HEADER_LEN));
  }

  #onMessage(m: number | number[]): void {
    if (typeof m === 'number') { this.#onEvent(); return; }
    if (this.#destroyed || this.#ended || !isPacketReader(this.r)) return;
    const r = this.r;
    this.#inEvent = true;
    try {
      this.#armTimer();
      const kind = m[0]!;
      if (kind === MSG_PACKET) {
        const [, slot, resIdx, payload] = m as [number, number, number, number];
        const header = this.#header(slot);
        let res: Reservation | null = null;
        if (resIdx >= 0) { res = this.#res[resIdx]!; this.#res[resIdx] = null; this.#resTail++; }
        // SYNC is bit 0 of the flags (bytes 8..11, big-endian): the reader waits for its release.
        if (header[11]! & 1) this.#syncs++;
        r.onReaderPacket(header, payload, res);
        Atomics.store(this.#ctl, P_DONE, ++this.#done);
        this.#topUp();
        this.#wake();
      } else if (kind === MSG_BAD) {
        r.onReaderBadHeader(this.#header(m[1]!));
      } else if (kind === MSG_END) {
        this.#ended = true;
        this.#clearTimer();
        r.onReaderEnd(m[1]! + m[2]!);
        this.emit('end');
      } else if (kind === MSG_ERROR) {
        this.#ended = true;
        this.emit('error', readError(m[1]!));
      }
    } finally {
      this.#inEvent = false;
    }
  }

  /** Publishes reservations until the ring is full or the parser has none to give. */
  #topUp(): void {
    const r = this.r as PacketReader;
    const ctl = this.#ctl;
    let added = false;
    while (this.#resHead - this.#resTail < RES_SLOTS) {
      const res = r.reserve();
      if (!res) break;
      const i = this.#resHead % RES_SLOTS;
      this.#res[i] = res;
      const e = RES_BASE + i * RES_WORDS;
      if (res.parts.length > RES_PARTS) throw new Error(`reservation of ${res.parts.length} parts (max ${RES_PARTS})`);
      ctl[e] = res.parts.length;
      for (const [j, part] of res.parts.entries()) {
        ctl[e + 1 + 3 * j] = this.#region(part.sab);
        ctl[e + 2 + 3 * j] = part.offset;
        ctl[e + 3 + 3 * j] = part.bytes;
      }
      this.#resHead++;
      added = true;
    }
    if (added) { Atomics.store(ctl, P_RES_HEAD, this.#resHead); this.#wake(); }
  }

  /** Reservations may be available again (a staging slot came back): top the ring up. */
  refill(): void { if (this.#packets && !this.#destroyed) this.#topUp(); }

  #issue(): void {
    if (this.#outstanding || this.#paused || this.#destroyed || this.#ended) return;
    if (!this.#packets && isPacketReader(this.r) && this.r.packetsReady()) {
      // From here the reader thread reads whole packets by itself.
      this.#packets = true;
      this.#topUp();
      this.#command(CMD_PACKETS);
      return;
    }
    const t = this.r.readTarget();
    const exact = this.r.readExact?.() ?? false;
    const ctl = this.#ctl;
    if (t.buffer instanceof SharedArrayBuffer) {
      ctl[CMD_REGION] = this.#region(t.buffer);
      ctl[CMD_OFFSET] = t.byteOffset;
      ctl[CMD_LENGTH] = t.length;
      this.#copyTo = null;
    } else {
      ctl[CMD_REGION] = SCRATCH_REGION;
      ctl[CMD_OFFSET] = 0;
      ctl[CMD_LENGTH] = Math.min(t.length, SCRATCH_BYTES);
      this.#copyTo = t;
    }
    // A target larger than the scratch buffer is read in parts: each part is a complete read.
    ctl[CMD_EXACT] = exact && ctl[CMD_LENGTH] === t.length ? 1 : 0;
    this.#outstanding = true;
    this.#command(CMD_READ);
  }

  #onEvent(): void {
    const ctl = this.#ctl;
    if (Atomics.load(ctl, EVT_SEQ) === this.#evt) return;
    this.#evt = Atomics.load(ctl, EVT_SEQ);
    this.#outstanding = false;
    if (this.#destroyed) return;
    const kind = ctl[EVT_KIND]!, n = ctl[EVT_N]!;
    this.#inEvent = true;
    try {
      if (n > 0) {
        if (this.#copyTo) this.#copyTo.set(this.#scratch.subarray(0, n));
        this.#armTimer();
        this.r.onDirectRead(n);
      }
      if (kind === EVT_END) { this.#ended = true; this.#clearTimer(); this.emit('end'); }
      else if (kind !== EVT_DATA) {
        this.#ended = true;
        this.emit('error', readError(ctl[EVT_ERRNO]!));
      }
    } finally {
      this.#inEvent = false;
    }
    this.#issue();
  }

  #armTimer(): void {
    this.#clearTimer();
    if (this.#timeoutMs <= 0 || this.#destroyed) return;
    this.#timer = setTimeout(() => { this.#timer = null; this.emit('timeout'); }, this.#timeoutMs);
    this.#timer.unref();
  }

  #clearTimer(): void {
    if (this.#timer) { clearTimeout(this.#timer); this.#timer = null; }
  }
}

/** The error a failed read on the reader thread becomes here, as a socket's would. */
function readError(errno: number): NodeJS.ErrnoException {
  let name = 'EIO';
  try { name = getSystemErrorName(errno); } catch { /* not a libuv code */ }
  return Object.assign(new Error(`read ${name}`), { code: name, errno, syscall: 'read' });
}

let state: 'untested' | 'ok' | 'off' = 'untested';
let reason = '';

function adoptable(sock: unknown): sock is Socket & Internal {
  if (!(sock instanceof Socket) || sock.constructor !== Socket) return false;
  const h = (sock as Internal)._handle;
  return !!h && typeof h.readStop === 'function' && typeof h.fd === 'number' && h.fd >= 0;
}

/** Parks an accepted, paused socket's handle and gives its descriptor to a reader thread. */
function adopt(sock: Socket & Internal, r: DirectReader): { sock: ThreadedSocket; buffered: Buffer[] } {
  const { handle, buffered, server } = detachPaused(sock);
  parked.add(handle);
  return { sock: new ThreadedSocket(handle.fd!, r, server), buffered };
}

/**
 * Cores below which multifd connections stay on the main thread by default. Measured on the
 * project's 2-core machine (primary and receiver sharing it), a real QEMU 7.2 COLO multifd-4
 * checkpoint under load took 1.42–1.45x QEMU's C secondary with reader threads and 1.19x
 * with the main thread reading (bench/README.md): the threads' hand-offs cost more than two
 * cores give back, while the main thread's CPU per checkpoint fell by half. With four cores
 * there is one for the main thread, the page writers and the readers to run beside each other
 * (not measured here: no such machine).
 */
export const READER_THREADS_MIN_CORES = 4;

/** `COLO_READER_THREADS=1|0` forces reader threads on or off; otherwise by core count. */
export function readerThreadsWanted(): boolean {
  const v = process.env.COLO_READER_THREADS;
  if (v === '1') return true;
  if (v === '0') return false;
  return availableParallelism() >= READER_THREADS_MIN_CORES;
}

/**
 * A reader thread for this socket, or null (not wanted, not a plain TCP socket, or the
 * self-test did not pass). Bytes the socket had buffered are returned for the caller to
 * consume first; the ThreadedSocket starts paused.
 */
export function adoptForThreadedRead(sock: unknown, r: DirectReader): { sock: ThreadedSocket; buffered: Buffer[] } | null {
  if (state !== 'ok' || !readerThreadsWanted() || !adoptable(sock)) return null;
  return adopt(sock, r);
}

/**
 * Accepts a loopback connection as the listener does, hands it to a reader thread and checks
 * that exact and partial targets, scratch and shared-memory targets, pause, EOF, destroy and
 * the server's connection count behave (and starts the first reader thread).
 */
export async function readerThreadsSelfTest(log?: Logger): Promise<boolean> {
  if (!readerThreadsWanted()) {
    log?.debug({ cores: availableParallelism(), minCores: READER_THREADS_MIN_CORES }, 'multifd connections read on the main thread (COLO_READER_THREADS=1: a thread each)');
    return false;
  }
  if (state !== 'untested') return state === 'ok';
  try {
    await selfTest();
    state = 'ok';
  } catch (e) {
    state = 'off';
    reason = e instanceof Error ? e.message : String(e);
  }
  if (state === 'ok') log?.debug({ cores: availableParallelism() }, 'multifd connections read by a thread each (self-test passed)');
  else log?.warn({ reason }, 'multifd reader threads unavailable: channels are read on the main thread');
  return state === 'ok';
}

async function selfTest(): Promise<void> {
  const mem = new Uint8Array(new SharedArrayBuffer(1 << 17));
  const server = createServer({ noDelay: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  const limit = <T>(p: Promise<T>, what: string) => Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`reader self-test: ${what}`)), 5000).unref())]);
  try {
    const { accepted: s, client } = await pausedLoopbackPair(server, port, Buffer.from([9, 9, 9]));
    if (!adoptable(s)) throw new Error('accepted socket has no adoptable handle');
    // 100 header-sized exact reads into plain Buffers, then one 64 KiB exact read into shared memory.
    const want = 100 * 16 + 65536;
    const payload = Buffer.alloc(want);
    for (let i = 0; i < want; i++) payload[i] = (i * 13 + 5) & 0xff;
    const got: Buffer[] = [];
    let landed = 0, last: Uint8Array = mem;
    let done!: () => void;
    const all = new Promise<void>((res) => { done = res; });
    const reader: DirectReader = {
      readTarget: () => (last = landed < 1600 || landed >= want ? Buffer.alloc(16) : mem.subarray(4096, 4096 + want - landed)),
      readExact: () => true,
      onDirectRead: (n) => {
        if (n !== last.length) throw new Error(`reader self-test: exact read of ${last.length} answered with ${n}`);
        got.push(Buffer.from(last.subarray(0, n)));
        landed += n;
        if (landed >= want) { t.pause(); done(); }
      },
    };
    const { sock: t, buffered } = adopt(s, reader);
    if (buffered.length > 0) throw new Error('reader self-test: bytes buffered after pause');
    t.resume();
    // Sent in pieces across header boundaries.
    for (let at = 0; at < want; at += 1000) client.write(payload.subarray(at, Math.min(want, at + 1000)));
    await limit(all, 'bytes did not arrive');
    if (!Buffer.concat(got).equals(payload)) throw new Error('reader self-test: bytes arrived out of place');
    const ended = once(t, 'end');
    t.resume();
    client.end();
    await limit(ended, 'no EOF');
    const closed = once(t, 'close');
    t.destroy();
    await limit(closed, 'no close');
  } finally {
    const drained = new Promise<void>((res) => server.close(() => res()));
    await limit(drained, 'server still counts the connection');
  }
}
