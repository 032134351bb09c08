import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import type { DecodeResult, DecodeTask } from '../compression/decoder.js';
import { MigrationError } from '../errors.js';
import type { PageTask, WriteTask } from '../memory/page-writer.js';

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
}

/**
 * The only importer of piscina. Page writes of different packets are independent (spec §3.4:
 * no order between channels between barriers), so one shared pool serves every channel.
 */
export class PagePool {
  readonly threads: number;
  readonly #pool: Piscina<PageTask, number>;
  readonly #inflight = new Set<Promise<number>>();

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
  }

  write(task: WriteTask): Promise<number> { return this.#track(this.#pool.run(task)); }

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
