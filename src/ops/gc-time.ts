import { PerformanceObserver, constants } from 'node:perf_hooks';

/**
 * The main thread's garbage-collection pauses, for the checkpoint log line: a checkpoint whose
 * main thread was busy far longer than its pages explain is either a GC pause or our own
 * code, and only this tells them apart (`--trace-gc` is not allowed in NODE_OPTIONS).
 * Entries arrive on a later turn of the event loop than the pause, so a pause in the last
 * turn of a checkpoint may be counted with the next one.
 */

const KINDS: Record<number, string> = {
  [constants.NODE_PERFORMANCE_GC_MINOR]: 'scavenge',
  [constants.NODE_PERFORMANCE_GC_MAJOR]: 'mark-compact',
  [constants.NODE_PERFORMANCE_GC_INCREMENTAL]: 'incremental-marking',
  [constants.NODE_PERFORMANCE_GC_WEAKCB]: 'weak-callbacks',
};

/** One pause this long or longer is worth a line of its own. */
export const LONG_GC_MS = 20;

export interface GcPause { start: number; ms: number; kind: string }

const RING = 256;
const starts = new Float64Array(RING);
const lengths = new Float64Array(RING);
let head = 0;
let seen = 0;
let observer: PerformanceObserver | null = null;
let onLong: ((p: GcPause) => void) | null = null;

/** Starts watching (once per process); `long` hears of every pause of LONG_GC_MS or more. */
export function watchGc(long?: (p: GcPause) => void): void {
  if (long) onLong = long;
  if (observer) return;
  observer = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      starts[head] = e.startTime;
      lengths[head] = e.duration;
      head = (head + 1) % RING;
      seen++;
      if (e.duration >= LONG_GC_MS && onLong) {
        const kind = (e as unknown as { detail?: { kind?: number } }).detail?.kind ?? -1;
        onLong({ start: e.startTime, ms: e.duration, kind: KINDS[kind] ?? `kind ${kind}` });
      }
    }
  });
  observer.observe({ entryTypes: ['gc'] });
}

/** Milliseconds of GC pauses that began in [t0, t1) (performance.now() times), of those seen so far. */
export function gcMsBetween(t0: number, t1: number): number {
  let ms = 0;
  for (let i = 0, n = Math.min(seen, RING); i < n; i++) {
    const s = starts[i]!;
    if (s >= t0 && s < t1) ms += lengths[i]!;
  }
  return ms;
}

/** For tests: stop watching and forget what was seen. */
export function unwatchGc(): void {
  observer?.disconnect();
  observer = null;
  onLong = null;
  head = 0;
  seen = 0;
}
