// Per-checkpoint timings from the three clocks of a cell: the primary's trace, QEMU's
// secondary's trace, and our receiver's CSV. Everything is keyed by the primary's 0-based
// checkpoint index (our CSV counts from 1: row k is the primary's checkpoint k-1).
import {
  parsePrimaryTrace,
  parseSecondaryTrace,
  parseTraceLines,
  type PrimaryTrace,
  type SecondaryTrace,
} from '../../src/harness/index.js';

/** One checkpoint, every timing in ms (undefined when that clock has no such event). */
export interface CheckpointTimes {
  index: number;
  // the secondary's own clock (our CSV, or QEMU's secondary trace)
  /** VMSTATE_SEND received -> RAM part loaded (EOF processed, every multifd channel synced). */
  transferMs?: number;
  /** RAM loaded -> device-state blob in (QEMU: -> VMSTATE_RECEIVED sent). */
  blobMs?: number;
  /** cache -> guest RAM copy of the dirty pages. */
  flushMs?: number;
  /** CHECKPOINT_REQUEST received -> VMSTATE_LOADED sent. */
  pauseMs?: number;
  // the primary's trace (one clock, same definition for either secondary)
  primaryRequestToReplyMs?: number;
  primarySendToSizeMs?: number;
  primarySendToReceivedMs?: number;
  primarySendToLoadedMs?: number;
  primaryRequestToLoadedMs?: number;
  // across the primary's and QEMU's secondary's traces (same host clock)
  /** NOTES' "memory transfer": primary sends VMSTATE_SEND -> secondary's ram_load_complete. */
  memoryTransferMs?: number;
  /** The harness's memoryTransferMs(): primary sends VMSTATE_SEND -> secondary's cache flushed. */
  sendToFlushedMs?: number;
  /** Pages found dirty by the primary's bitmap sync in this checkpoint (zero pages included). */
  dirtyPages?: number;
  /** Page payload bytes the receiver got, all channels (ours only). */
  payloadBytes?: number;
  /** Pages the secondary flushed from its cache. */
  flushedPages?: number;
}

/**
 * Dirty pages per checkpoint from the primary's bitmap syncs after VMSTATE_SEND.
 *
 * `migration_bitmap_sync_end dirty_pages N` prints 7.2's rs->num_dirty_pages_period, which is
 * only reset when a sync ends more than 1000 ms after the last reset (migration_bitmap_sync():
 * trace first, then `if (end_time > rs->time_last_bitmap_sync + 1000) { ... = 0 }`). With
 * 600 ms checkpoints it often spans two of them, so the per-sync count is replayed here: the
 * pages new in a sync are N minus the period's count so far. The period starts at the first
 * sync (ram_state_init() sets the clock just before it).
 */
export function primaryDirtyPages(text: string): number[] {
  const out: number[] = [];
  let cur = -1;
  let inSend = false;
  let periodStart: number | undefined;
  let acc = 0;
  for (const l of parseTraceLines(text)) {
    if (l.event === 'colo_send_message') {
      if (l.args.includes("'checkpoint-request'")) { cur++; inSend = false; out[cur] = 0; }
      else if (l.args.includes("'vmstate-send'")) inSend = true;
      else if (l.args.includes("'vmstate-size'")) inSend = false;
    } else if (l.event === 'migration_bitmap_sync_start') {
      periodStart ??= l.t;
    } else if (l.event === 'migration_bitmap_sync_end') {
      const m = /dirty_pages (\d+)/.exec(l.args);
      if (!m) continue;
      periodStart ??= l.t;
      const v = Number(m[1]);
      const fresh = v - acc;
      acc = v;
      if (Math.floor(l.t) > Math.floor(periodStart) + 1000) { periodStart = l.t; acc = 0; }
      if (cur >= 0 && inSend) out[cur] = (out[cur] ?? 0) + fresh;
    }
  }
  return out;
}

export function primaryTimes(p: PrimaryTrace, dirty: number[]): Map<number, CheckpointTimes> {
  const out = new Map<number, CheckpointTimes>();
  for (const c of p.checkpoints) {
    if (!c.complete) continue;
    const t: CheckpointTimes = { index: c.index };
    if (c.replyAt !== undefined) t.primaryRequestToReplyMs = c.replyAt - c.requestAt;
    if (c.sendToSizeMs !== undefined) t.primarySendToSizeMs = c.sendToSizeMs;
    if (c.sendToReceivedMs !== undefined) t.primarySendToReceivedMs = c.sendToReceivedMs;
    if (c.sendToLoadedMs !== undefined) t.primarySendToLoadedMs = c.sendToLoadedMs;
    if (c.requestToLoadedMs !== undefined) t.primaryRequestToLoadedMs = c.requestToLoadedMs;
    if (dirty[c.index] !== undefined) t.dirtyPages = dirty[c.index]!;
    out.set(c.index, t);
  }
  return out;
}

/** Adds QEMU's secondary's own-clock timings and the cross-trace ones. */
export function addQemuSecondary(times: Map<number, CheckpointTimes>, p: PrimaryTrace, s: SecondaryTrace): void {
  for (const c of s.checkpoints) {
    const t = times.get(c.index);
    if (!t || !c.complete) continue;
    if (c.vmstateSendAt !== undefined && c.ramLoadedAt !== undefined) t.transferMs = c.ramLoadedAt - c.vmstateSendAt;
    if (c.ramLoadedAt !== undefined && c.receivedAt !== undefined) t.blobMs = c.receivedAt - c.ramLoadedAt;
    if (c.flushMs !== undefined) t.flushMs = c.flushMs;
    if (c.loadedAt !== undefined) t.pauseMs = c.loadedAt - c.requestAt;
    if (c.flushPages !== undefined) t.flushedPages = c.flushPages;
    const pc = p.checkpoints[c.index];
    if (pc?.vmstateSendAt !== undefined) {
      if (c.ramLoadedAt !== undefined) t.memoryTransferMs = c.ramLoadedAt - pc.vmstateSendAt;
      if (c.flushEndAt !== undefined) t.sendToFlushedMs = c.flushEndAt - pc.vmstateSendAt;
    }
  }
}

export interface OursRow {
  checkpoint: number;
  transferMs: number;
  blobMs: number;
  flushMs: number;
  pauseMs: number;
  pages: number;
  zeroPages: number;
  flushedPages: number;
  bytes: number;
}

/** Our --checkpoints-csv. */
export function parseOursCsv(text: string): OursRow[] {
  const lines = text.trim().split('\n');
  const head = lines.shift()?.split(',') ?? [];
  const col = (n: string) => head.indexOf(n);
  const bytesCols = head.map((h, i) => (h.startsWith('bytes_') ? i : -1)).filter((i) => i >= 0);
  return lines.filter(Boolean).map((l) => {
    const v = l.split(',').map(Number);
    return {
      checkpoint: v[col('checkpoint')]!, transferMs: v[col('transfer_ms')]!, blobMs: v[col('blob_ms')]!,
      flushMs: v[col('flush_ms')]!, pauseMs: v[col('pause_ms')]!, pages: v[col('pages')]!,
      zeroPages: v[col('zero_pages')]!, flushedPages: v[col('flushed_pages')]!,
      bytes: bytesCols.reduce((s, i) => s + (v[i] ?? 0), 0),
    };
  });
}

/**
 * Adds our CSV (row k = the primary's checkpoint k-1). Returns how many measured checkpoints
 * disagree with the primary on the dirty-page count (a pairing check: ours pages + zero pages
 * must match the primary's bitmap-sync count, within 1 %).
 */
export function addOurs(times: Map<number, CheckpointTimes>, rows: OursRow[]): { paired: number; mismatched: number } {
  let paired = 0, mismatched = 0;
  for (const r of rows) {
    const t = times.get(r.checkpoint - 1);
    if (!t) continue;
    paired++;
    t.transferMs = r.transferMs;
    t.blobMs = r.blobMs;
    t.flushMs = r.flushMs;
    t.pauseMs = r.pauseMs;
    t.payloadBytes = r.bytes;
    t.flushedPages = r.flushedPages;
    // multifd streams differ by a page or a few (pages counted in the next packet): allow 1 %
    const got = r.pages + r.zeroPages;
    if (t.dirtyPages !== undefined && Math.abs(t.dirtyPages - got) > Math.max(2, 0.01 * got)) mismatched++;
  }
  return { paired, mismatched };
}

export { parsePrimaryTrace, parseSecondaryTrace };
