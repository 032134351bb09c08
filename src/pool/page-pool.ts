import { availableParallelism } from 'node:os';
import { MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { sabIds } from './sab-ids.js';
import type { DecodeResult, DecodeTask } from '../compression/decoder.js';
import { MigrationError } from '../errors.js';
import {
  REC_BITS, REC_CHUNKS, REC_MAX_CHUNKS, REC_NCHUNKS, REC_NORMAL, REC_SLOT_OFFSET, REC_STAGING, REC_STATUS, REC_WORDS,
  RING_CTL_WORDS, RING_DONE, RING_HEAD, RING_STOP, RING_WAKE, ringBytes, type PageTask, type ServeTask, type WriteTask,
} from '../memory/page-writer.js';

/**
 * piscina first require()s the worker file and imports it only if that throws. On Node
 * 20.19+ require() of an ES module succeeds, and under load it was seen to abort the process
 * ("v8::Module::IsGraphAsync must be used on an instantiated module", SIGABRT). Turning
 * require(esm) off in the workers makes piscina take its import() path.
 */
const WORKER_EXEC_ARGV = ['--no-experimental-require-module'];

const WORKER_URL = new URL('../../workers/page-writer.js', import.meta.url).href;
const DECODER_URL = new URL('../../workers/page-decoder.js', import.meta.url).href;

export interface PagePoolOptions {
  /** Page-writer threads; default: every core. */
  threads?: number;
  /** Tasks queued beyond the running ones before run() callers should back off. */
  maxQueue?: number;
  /** Per-worker task rings (default); false: one piscina task per packet, as before. */
  rings?: boolean;
  /** A ring idle this long ends its worker loop (default RING_IDLE_MS). */
  ringIdleMs?: number;
}

/** Records per ring; more wait in the ring's queue on this thread (callers bound them anyway). */
const RING_CAPACITY = 32;
/**
 * A ring idle this long ends its worker loop, so a pool nobody closes holds no thread for ever.
 * It must outlast the checkpoint interval (QEMU's x-checkpoint-delay: 200 ms to its 20 s
 * default): a loop that ended is restarted by the next packet with a piscina task and every
 * SharedArrayBuffer sent again, which with 250 ms here cost every idle 600 ms checkpoint with
 * multifd ~9 ms (transfer 14.5 ms vs 5.6 plain, bench/results/2026-12-06-final-7.2-idle.md).
 * A sleeping loop costs nothing: the worker waits in Atomics.wait.
 */
export const RING_IDLE_MS = 60_000;

/** ES2024's Atomics.waitAsync (V8 has it since 8.7; the TypeScript lib here predates it). */
type WaitAsync = (a: Int32Array, index: number, value: number) => { async: false; value: string } | { async: true; value: Promise<string> };
const waitAsync = (Atomics as unknown as { waitAsync?: WaitAsync }).waitAsync;

interface Entry { task: WriteTask; resolve: (pages: number) => void; reject: (e: unknown) => void }

/**
 * One worker's task ring (see serveRing): records are published with Atomics stores and a
 * notify; completion is read from RING_DONE with Atomics.waitAsync, so neither direction
 * costs a postMessage per packet. A record slot is reused only after its completion was read.
 */
class Ring {
  readonly #sab = new SharedArrayBuffer(ringBytes(RING_CAPACITY));
  readonly #ctl = new Int32Array(this.#sab);
  /** Published, in order; the first is the oldest not yet read back. */
  readonly #pending: Entry[] = [];
  /** Not yet published: the ring was full, or its loop not running. */
  readonly #queue: Entry[] = [];
  #head = 0;
  #done = 0;
  #port: MessagePort | null = null;
  /** uids of the SharedArrayBuffers this ring's worker loop holds. */
  readonly #sent = new Set<number>();
  #serving: Promise<unknown> | null = null;
  #stopping = false;
  #armed = false;
  #idle: NodeJS.Timeout | null = null;
  #closed = false;

  constructor(
    private readonly pool: Piscina<PageTask, number>,
    private readonly uidOf: (sab: SharedArrayBuffer) => number,
    private readonly idleMs: number,
  ) {}

  get load(): number { return this.#pending.length + this.#queue.length; }

  push(e: Entry): void {
    if (this.#idle) { clearTimeout(this.#idle); this.#idle = null; }
    this.#queue.push(e);
    if (this.#serving === null) this.#start();
    else if (!this.#stopping) this.#publish();
  }

  /** The pool is closing: nothing is in flight any more (close() waited); ends the loop. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#idle) { clearTimeout(this.#idle); this.#idle = null; }
    this.#stop();
    await this.#serving?.catch(() => undefined);
  }

  /** A SharedArrayBuffer's object on this thread was collected: the worker loop forgets it too. */
  forget(uid: number): void {
    if (!this.#sent.delete(uid) || !this.#port) return;
    this.#port.postMessage({ uid, evict: true });
    Atomics.add(this.#ctl, RING_WAKE, 1);
    Atomics.notify(this.#ctl, RING_WAKE);
  }

  #start(): void {
    const ch = new MessageChannel();
    this.#port = ch.port1;
    this.#sent.clear();
    this.#head = 0;
    this.#done = 0;
    this.#stopping = false;
    Atomics.store(this.#ctl, RING_HEAD, 0);
    Atomics.store(this.#ctl, RING_DONE, 0);
    Atomics.store(this.#ctl, RING_STOP, 0);
    const task: ServeTask = { op: 'serve', ring: this.#sab, port: ch.port2, capacity: RING_CAPACITY };
    const serving = this.pool.run(task, { transferList: [ch.port2] });
    this.#serving = serving;
    serving.then(() => this.#ended(null), (e: unknown) => this.#ended(e));
    this.#publish();
  }

  /** The worker loop returned (stopped) or its thread died: what was published fails. */
  #ended(err: unknown): void {
    this.#serving = null;
    this.#armed = false;
    // Completions the loop stored before it ended are still results (errors' texts on the port).
    this.#collect(false);
    this.#port?.close();
    this.#port = null;
    const lost = this.#pending.splice(0);
    for (const e of lost) e.reject(new Error(`page writer thread ended with a write in flight: ${String(err ?? 'stopped')}`, { cause: err }));
    if (this.#queue.length > 0 && !this.#closed) this.#start();
    else for (const e of this.#queue.splice(0)) e.reject(new Error('page pool closed'));
  }

  #stop(): void {
    if (this.#serving === null || this.#stopping) return;
    this.#stopping = true;
    Atomics.store(this.#ctl, RING_STOP, 1);
    Atomics.add(this.#ctl, RING_WAKE, 1);
    Atomics.notify(this.#ctl, RING_WAKE);
  }

  #publish(): void {
    const ctl = this.#ctl;
    let n = 0;
    while (this.#queue.length > 0 && this.#pending.length < RING_CAPACITY) {
      const e = this.#queue.shift()!;
      const t = e.task;
      const r = RING_CTL_WORDS + (this.#head % RING_CAPACITY) * REC_WORDS;
      ctl[r + REC_STAGING] = this.#send(t.staging);
      ctl[r + REC_SLOT_OFFSET] = t.slotOffset;
      ctl[r + REC_NORMAL] = t.normalPages;
      ctl[r + REC_BITS] = t.mem.chunkSlotBits;
      const ids = t.mem.ids;
      ctl[r + REC_NCHUNKS] = ids.length;
      for (let j = 0; j < ids.length; j++) {
        ctl[r + REC_CHUNKS + 2 * j] = ids[j]!;
        ctl[r + REC_CHUNKS + 2 * j + 1] = this.#send(t.mem.chunks[j]!);
      }
      ctl[r + REC_STATUS] = 0;
      this.#pending.push(e);
      this.#head++;
      n++;
    }
    if (n === 0) return;
    // The stores above happen-before this one (Atomics are sequentially consistent).
    Atomics.store(ctl, RING_HEAD, this.#head);
    Atomics.add(ctl, RING_WAKE, 1);
    Atomics.notify(ctl, RING_WAKE);
    this.#arm();
  }

  #send(sab: SharedArrayBuffer): number {
    const uid = this.uidOf(sab);
    if (!this.#sent.has(uid)) {
      // Queued on the worker's port before the record that names it is published.
      this.#port!.postMessage({ uid, sab });
      this.#sent.add(uid);
    }
    return uid;
  }

  #arm(): void {
    if (this.#armed || this.#pending.length === 0 || this.#serving === null) return;
    this.#armed = true;
    const w = waitAsync!(this.#ctl, RING_DONE, this.#done);
    if (w.async) void w.value.then(() => { this.#armed = false; this.#collect(true); });
    else queueMicrotask(() => { this.#armed = false; this.#collect(true); });
  }

  /** Settles every record the worker finished, in order; then publishes what waited. */
  #collect(more: boolean): void {
    const ctl = this.#ctl;
    const done = Atomics.load(ctl, RING_DONE);
    while (this.#done < done && this.#pending.length > 0) {
      const e = this.#pending.shift()!;
      const status = ctl[RING_CTL_WORDS + (this.#done % RING_CAPACITY) * REC_WORDS + REC_STATUS]!;
      this.#done++;
      if (status >= 0) e.resolve(status);
      else {
        const m = this.#port ? receiveMessageOnPort(this.#port) : undefined;
        e.reject(new Error(m ? String(m.message) : 'unknown error'));
      }
    }
    if (!more || this.#serving === null) return;
    if (!this.#stopping) this.#publish();
    if (this.#pending.length > 0) this.#arm();
    else if (this.#queue.length === 0 && !this.#idle) {
      this.#idle = setTimeout(() => { this.#idle = null; if (this.load === 0) this.#stop(); }, this.idleMs);
      this.#idle.unref();
    }
  }
}

/**
 * The only importer of piscina. Page writes of different packets are independent (spec §3.4:
 * no order between channels between barriers), so one shared pool serves every channel.
 */
export class PagePool {
  readonly threads: number;
  readonly #pool: Piscina<PageTask, number>;
  readonly #inflight = new Set<Promise<number>>();
  readonly #rings: Ring[] = [];
  #next = 0;
  /** SharedArrayBuffers named by number in ring records; a buffer gone here is evicted there. */
  #unsubscribe: () => void = () => undefined;

  constructor(opts: PagePoolOptions = {}) {
    const threads = opts.threads ?? Math.max(1, availableParallelism());
    if (!Number.isInteger(threads) || threads < 1 || threads > 256) throw new RangeError('options.threads must be an integer in 1..256');
    this.threads = threads;
    this.#pool = new Piscina<PageTask, number>({
      filename: WORKER_URL,
      name: 'handle',
      minThreads: threads,
      maxThreads: threads,
      // Callers bound their own in-flight work (staging slots per channel), so this cap is a
      // backstop against a bug, never the backpressure mechanism.
      maxQueue: opts.maxQueue ?? 4096,
      idleTimeout: 60_000,
      concurrentTasksPerWorker: 1,
      execArgv: WORKER_EXEC_ARGV,
    });
    // piscina reports a worker message that arrives after destroy() as an 'error' event; with
    // no listener that would end the process. Task failures still reach their run() callers.
    this.#pool.on('error', () => undefined);
    if (opts.rings !== false && typeof waitAsync === 'function') {
      const uidOf = (sab: SharedArrayBuffer): number => sabIds.uidOf(sab);
      this.#unsubscribe = sabIds.onGone((uid) => { for (const r of this.#rings) r.forget(uid); });
      const idleMs = opts.ringIdleMs ?? RING_IDLE_MS;
      for (let k = 0; k < threads; k++) this.#rings.push(new Ring(this.#pool, uidOf, idleMs));
    }
  }

  /**
   * Copies one packet's pages; resolves once every byte is in its slot (the staging slot may
   * be reused then). Rejects with the worker's Error, as a piscina task does: the channel
   * types it (ERR_WORKER, with its name and the packet's stream offset). Goes to the least loaded
   * worker's ring (round robin among equals).
   */
  write(task: WriteTask): Promise<number> {
    const rings = this.#rings;
    if (rings.length === 0 || task.mem.ids.length > REC_MAX_CHUNKS) return this.#track(this.#pool.run(task));
    let best = rings[this.#next]!;
    for (let k = 1; k < rings.length; k++) {
      const r = rings[(this.#next + k) % rings.length]!;
      if (r.load < best.load) best = r;
    }
    this.#next = (this.#next + 1) % rings.length;
    const ring = best;
    return this.#track(new Promise<number>((resolve, reject) => ring.push({ task, resolve, reject })));
  }

  #track(run: Promise<number>): Promise<number> {
    this.#inflight.add(run);
    const forget = () => { this.#inflight.delete(run); };
    run.then(forget, forget);
    return run;
  }

  /**
   * A failed migration may still have page writes on the pool (one per staging slot): they
   * finish first (each well under a millisecond), so destroy() never races a worker's answer
   * and no write is cut off mid-page.
   */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#inflight]);
    await Promise.all(this.#rings.map((r) => r.close()));
    this.#unsubscribe();
    await this.#pool.destroy();
  }
}

/**
 * One compressed multifd channel's decoder thread (spec §2.10, §8.1): its zlib/zstd stream
 * state lives in one worker, so the channel's packets must all run there, one at a time, in
 * arrival order. piscina cannot pin a task to a worker, hence a pool of exactly one thread
 * per channel; `stricterFIFO` keeps queued tasks in order (without it a task that found the
 * worker busy could be requeued behind a later one), and `idleTimeout: Infinity` keeps the
 * worker, and the stream with it, between checkpoints.
 */
export class DecoderThread {
  readonly #pool: Piscina<DecodeTask, DecodeResult>;
  readonly #inflight = new Set<Promise<DecodeResult>>();

  /** `maxQueue`: the channel's staging slots bound its tasks; this is a backstop. */
  constructor(maxQueue = 64) {
    this.#pool = new Piscina<DecodeTask, DecodeResult>({
      filename: DECODER_URL,
      name: 'handle',
      minThreads: 1,
      maxThreads: 1,
      concurrentTasksPerWorker: 1,
      stricterFIFO: true,
      idleTimeout: Infinity,
      maxQueue,
      execArgv: WORKER_EXEC_ARGV,
    });
    // piscina reports a worker's answer to a task it already dropped (destroy() raced the
    // answer) as an 'error' event; close() waits for every task first, so this is a backstop.
    this.#pool.on('error', () => undefined);
  }

  /**
   * Decodes and writes one packet; resolves with the pages written, rejects with the
   * decoder's MigrationError (ERR_DECOMPRESS for a bad payload) at `streamOffset`.
   */
  async decode(task: DecodeTask, streamOffset?: number): Promise<number> {
    const run = this.#pool.run(task);
    this.#inflight.add(run);
    let r: DecodeResult;
    try { r = await run; } finally { this.#inflight.delete(run); }
    if (typeof r === 'number') return r;
    throw new MigrationError(r.code, r.message, task.channel, streamOffset);
  }

  /**
   * Lets the queued packets finish (a few at most: one per staging slot, each well under a
   * millisecond), so no decode is cut off mid-write, then ends the thread.
   */
  async close(): Promise<void> {
    await Promise.allSettled([...this.#inflight]);
    await this.#pool.destroy();
  }
}
