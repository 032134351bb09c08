/**
 * Per-checkpoint timing on the secondary's side (DESIGN "Measuring"):
 *  transfer = VMSTATE_SEND received -> RAM part's EOF processed, every channel synced;
 *  blob     = RAM EOF -> device-state blob complete;
 *  flush    = cache -> guest copy of the dirty pages;
 *  pause    = CHECKPOINT_REQUEST received -> VMSTATE_LOADED sent.
 */
export interface CheckpointRecord {
  index: number;
  tRequest: number;
  tSend: number;
  tRamDone: number;
  tBlob: number;
  tFlushStart: number;
  tFlushEnd: number;
  tLoaded: number;
  pages: number;
  zeroPages: number;
  flushedPages: number;
  blobBytes: number;
  /** Page payload bytes per channel: [main, multifd/0, multifd/1, ...]. */
  channelBytes: number[];
  /**
   * Main event loop busy time during the transfer (eventLoopUtilization): near transferMs, the
   * receiver's main thread is the bottleneck; far below it, the sender or the wire is.
   */
  transferBusyMs: number;
  /** Slots this checkpoint took from never-mapped memory (each faulted in during a write). */
  freshPages?: number;
  /** Main-thread GC pauses that began between CHECKPOINT_REQUEST and VMSTATE_LOADED (src/ops/gc-time.ts). */
  gcMs?: number;
  /**
   * Multifd only: normal pages the kernel read straight into their slots (the rest went
   * through a staging slot and a page writer), and the channels' socket reads.
   */
  directPages?: number;
  reads?: number;
  /**
   * getrusage() of the whole process over the transfer: CPU in user and kernel space, page
   * faults, and how often a thread was preempted. With transferBusyMs it tells a slow
   * checkpoint's causes apart: our code (user), the kernel's copies and faults (sys,
   * minorFaults), or waiting for a CPU (busy far above user + sys, involuntary switches).
   */
  transferCpu?: { userMs: number; sysMs: number; minorFaults: number; involuntarySwitches: number };
}

export interface Dist { n: number; mean: number; p50: number; p99: number; max: number }

export function distribution(xs: number[]): Dist {
  if (xs.length === 0) return { n: 0, mean: 0, p50: 0, p99: 0, max: 0 };
  const s = [...xs].sort((a, b) => a - b);
  // nearest-rank percentiles: p99 of 100 samples is the 99th smallest
  const pct = (p: number) => s[Math.min(s.length - 1, Math.max(0, Math.ceil((p / 100) * s.length) - 1))]!;
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { n: s.length, mean: r(s.reduce((a, b) => a + b, 0) / s.length), p50: r(pct(50)), p99: r(pct(99)), max: r(s[s.length - 1]!) };
}

export const durations = (c: CheckpointRecord) => ({
  transferMs: c.tRamDone - c.tSend,
  blobMs: c.tBlob - c.tRamDone,
  flushMs: c.tFlushEnd - c.tFlushStart,
  pauseMs: c.tLoaded - c.tRequest,
});

/**
 * Checkpoints kept for the distributions. A secondary runs for days (144,000 checkpoints a
 * day at a 600 ms interval), so the records cannot all stay in memory: the summary covers the
 * last STATS_WINDOW, the CSV is written a row at a time as checkpoints commit (cli/receive.ts).
 */
export const STATS_WINDOW = 10_000;

export class CheckpointStats {
  /** Committed checkpoints measured, all of them. */
  count = 0;
  discarded = 0;
  #recent: CheckpointRecord[] = [];
  #head = 0;

  constructor(readonly window = STATS_WINDOW) {}

  /** The last `window` committed checkpoints, oldest first. */
  get done(): CheckpointRecord[] { return this.#head === 0 ? this.#recent : this.#recent.slice(this.#head); }

  begin(index: number, tRequest: number): CheckpointRecord {
    return { index, tRequest, tSend: 0, tRamDone: 0, tBlob: 0, tFlushStart: 0, tFlushEnd: 0, tLoaded: 0, pages: 0, zeroPages: 0, flushedPages: 0, blobBytes: 0, channelBytes: [], transferBusyMs: 0 };
  }
  finish(c: CheckpointRecord): void {
    this.count++;
    this.#recent.push(c);
    // drop the oldest by moving a head index; compact once the dead prefix is as long as the window
    if (this.#recent.length - this.#head > this.window) this.#head++;
    if (this.#head >= this.window) { this.#recent = this.#recent.slice(this.#head); this.#head = 0; }
  }
  discard(_c: CheckpointRecord): void { this.discarded++; }

  /** One pino line per checkpoint, never per page. */
  logLine(c: CheckpointRecord): Record<string, unknown> {
    const d = durations(c);
    const r = (x: number) => Math.round(x * 1000) / 1000;
    return { checkpoint: c.index, transferMs: r(d.transferMs), transferBusyMs: r(c.transferBusyMs), blobMs: r(d.blobMs), flushMs: r(d.flushMs), pauseMs: r(d.pauseMs), pages: c.pages, zeroPages: c.zeroPages, flushedPages: c.flushedPages, bytes: c.channelBytes.reduce((a, b) => a + b, 0), blobBytes: c.blobBytes, freshPages: c.freshPages, gcMs: c.gcMs, directPages: c.directPages, reads: c.reads, transferCpu: c.transferCpu };
  }

  summary(): Record<string, unknown> {
    const done = this.done;
    const ds = done.map(durations);
    return {
      count: this.count,
      discarded: this.discarded,
      // distributions below are over the last `window` checkpoints
      window: done.length,
      transferMs: distribution(ds.map((d) => d.transferMs)),
      transferBusyMs: distribution(done.map((c) => c.transferBusyMs)),
      blobMs: distribution(ds.map((d) => d.blobMs)),
      flushMs: distribution(ds.map((d) => d.flushMs)),
      pauseMs: distribution(ds.map((d) => d.pauseMs)),
      pages: distribution(done.map((c) => c.pages)),
      zeroPages: distribution(done.map((c) => c.zeroPages)),
      mbPerCheckpoint: distribution(done.map((c) => c.channelBytes.reduce((a, b) => a + b, 0) / 1e6)),
    };
  }

  static csvHeader(channels: number): string {
    return ['checkpoint', 'transfer_ms', 'transfer_busy_ms', 'blob_ms', 'flush_ms', 'pause_ms', 'pages', 'zero_pages', 'flushed_pages', 'blob_bytes',
      ...Array.from({ length: channels }, (_, i) => (i === 0 ? 'bytes_main' : `bytes_multifd${i - 1}`))].join(',');
  }

  static csvRow(c: CheckpointRecord, channels: number): string {
    const d = durations(c);
    return [c.index, d.transferMs.toFixed(3), c.transferBusyMs.toFixed(3), d.blobMs.toFixed(3), d.flushMs.toFixed(3), d.pauseMs.toFixed(3), c.pages, c.zeroPages, c.flushedPages, c.blobBytes,
      ...Array.from({ length: channels }, (_, i) => c.channelBytes[i] ?? 0)].join(',');
  }

  /** The window as CSV (the CLI streams every row instead: csvHeader / csvRow). */
  csv(): string {
    const done = this.done;
    const chans = Math.max(0, ...done.map((c) => c.channelBytes.length));
    return [CheckpointStats.csvHeader(chans), ...done.map((c) => CheckpointStats.csvRow(c, chans))].join('\n') + '\n';
  }
}
