import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import type { FlushTask, PageTask, WriteTask } from '../memory/page-writer.js';
import type { BlockMemory } from '../memory/shared-layout.js';

const WORKER_URL = new URL('../../workers/page-writer.js', import.meta.url).href;

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
    });
  }

  write(task: WriteTask): Promise<number> { return this.#pool.run(task); }

  /**
   * colo_flush_ram_cache(): every worker takes a disjoint range of bitmap words, so the copy
   * cache -> guest runs on all cores. Resolves with the number of pages copied.
   */
  async flush(blocks: BlockMemory[]): Promise<number> {
    const tasks: Promise<number>[] = [];
    for (const mem of blocks) {
      if (!mem.dirty || !mem.cache) continue;
      const words = mem.dirty.byteLength / 4;
      // Ranges of at least 8192 words (256 K pages = 1 GiB) would leave cores idle on a small
      // block; split each block into `threads` ranges and let piscina spread them.
      const per = Math.max(64, Math.ceil(words / this.threads));
      for (let from = 0; from < words; from += per) {
        const t: FlushTask = { op: 'flush', mem, wordFrom: from, wordTo: Math.min(words, from + per) };
        tasks.push(this.#pool.run(t));
      }
    }
    const done = await Promise.all(tasks);
    return done.reduce((a, b) => a + b, 0);
  }

  async close(): Promise<void> { await this.#pool.destroy(); }
}
