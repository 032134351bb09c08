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

export class CheckpointStats {
  readonly done: CheckpointRecord[] = [];
  discarded = 0;

  begin(index: number, tRequest: number): CheckpointRecord {
    return { index, tRequest, tSend: 0, tRamDone: 0, tBlob: 0, tFlushStart: 0, tFlushEnd: 0, tLoaded: 0, pages: 0, zeroPages: 0, flushedPages: 0, blobBytes: 0, channelBytes: [], transferBusyMs: 0 };
  }
  finish(c: CheckpointRecord): void { this.done.push(c); }
  discard(_c: CheckpointRecord): void { this.discarded++; }

  /** One pino line per checkpoint, never per page. */
  logLine(c: CheckpointRecord): Record<string, unknown> {
    const d = durations(c);
    const r = (x: number) => Math.round(x * 1000) / 1000;
    return { checkpoint: c.index, transferMs: r(d.transferMs), transferBusyMs: r(c.transferBusyMs), blobMs: r(d.blobMs), flushMs: r(d.flushMs), pauseMs: r(d.pauseMs), pages: c.pages, zeroPages: c.zeroPages, flushedPages: c.flushedPages, bytes: c.channelBytes.reduce((a, b) => a + b, 0), blobBytes: c.blobBytes };
  }

  summary(): Record<string, unknown> {
    const ds = this.done.map(durations);
    return {
      count: this.done.length,
      discarded: this.discarded,
      transferMs: distribution(ds.map((d) => d.transferMs)),
      transferBusyMs: distribution(this.done.map((c) => c.transferBusyMs)),
      blobMs: distribution(ds.map((d) => d.blobMs)),
      flushMs: distribution(ds.map((d) => d.flushMs)),
      pauseMs: distribution(ds.map((d) => d.pauseMs)),
      pages: distribution(this.done.map((c) => c.pages)),
      zeroPages: distribution(this.done.map((c) => c.zeroPages)),
      mbPerCheckpoint: distribution(this.done.map((c) => c.channelBytes.reduce((a, b) => a + b, 0) / 1e6)),
    };
  }

  csv(): string {
    const chans = Math.max(0, ...this.done.map((c) => c.channelBytes.length));
    const head = ['checkpoint', 'transfer_ms', 'transfer_busy_ms', 'blob_ms', 'flush_ms', 'pause_ms', 'pages', 'zero_pages', 'flushed_pages', 'blob_bytes',
      ...Array.from({ length: chans }, (_, i) => (i === 0 ? 'bytes_main' : `bytes_multifd${i - 1}`))];
    const rows = this.done.map((c) => {
      const d = durations(c);
      return [c.index, d.transferMs.toFixed(3), c.transferBusyMs.toFixed(3), d.blobMs.toFixed(3), d.flushMs.toFixed(3), d.pauseMs.toFixed(3), c.pages, c.zeroPages, c.flushedPages, c.blobBytes,
        ...Array.from({ length: chans }, (_, i) => c.channelBytes[i] ?? 0)].join(',');
    });
    return [head.join(','), ...rows].join('\n') + '\n';
  }
}
