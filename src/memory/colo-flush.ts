import type { FlushTask } from './page-writer.js';
import type { BlockMemory } from './shared-layout.js';

/**
 * Splits colo_flush_ram_cache() into tasks of about equal page counts. The bitmap is scanned
 * here first (4 KiB of words per 512 MiB of guest: microseconds), so workers get only ranges
 * that hold dirty pages and an idle checkpoint costs no pool round trips for clean blocks.
 */
export function planFlush(blocks: BlockMemory[], parts: number): { tasks: FlushTask[]; pages: number } {
  const ranges: { mem: BlockMemory; from: number; to: number; pages: number }[] = [];
  let pages = 0;
  for (const mem of blocks) {
    if (!mem.dirty || !mem.cache) continue;
    const words = new Int32Array(mem.dirty);
    let from = -1, n = 0;
    for (let i = 0; i < words.length; i++) {
      const w = Atomics.load(words, i);
      if (w === 0) continue;
      if (from < 0) from = i;
      n += popcount(w);
      // Cut a range every 256 words so large checkpoints can be spread over every core.
      if (i - from >= 255) { ranges.push({ mem, from, to: i + 1, pages: n }); pages += n; from = -1; n = 0; }
    }
    if (from >= 0) { ranges.push({ mem, from, to: words.length, pages: n }); pages += n; }
  }
  // Greedy: consecutive ranges up to pages/parts each; tasks never overlap in words.
  const target = Math.max(1, Math.ceil(pages / Math.max(1, parts)));
  const tasks: FlushTask[] = [];
  let cur: FlushTask | null = null, curPages = 0;
  for (const r of ranges) {
    if (cur && cur.mem === r.mem && cur.wordTo <= r.from && curPages < target) {
      cur.wordTo = r.to;
      curPages += r.pages;
      continue;
    }
    cur = { op: 'flush', mem: r.mem, wordFrom: r.from, wordTo: r.to };
    curPages = r.pages;
    tasks.push(cur);
  }
  return { tasks, pages };
}

function popcount(w: number): number {
  w = w - ((w >>> 1) & 0x55555555);
  w = (w & 0x33333333) + ((w >>> 2) & 0x33333333);
  return (((w + (w >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}
