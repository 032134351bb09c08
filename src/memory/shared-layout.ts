import { TARGET_PAGE_BITS, TARGET_PAGE_SIZE } from '../wire/constants.js';

/**
 * Node 20 cannot view more than 4 GiB through one typed array, so a RAMBlock's memory is a
 * list of SharedArrayBuffer windows of 2^WINDOW_BITS bytes (1 GiB; the last one shorter).
 * A page never straddles two windows because windows are page-aligned.
 */
export const WINDOW_BITS = 30;
export const WINDOW_BYTES = 2 ** WINDOW_BITS;
export const PAGES_PER_WINDOW_BITS = WINDOW_BITS - TARGET_PAGE_BITS;

/** What a worker needs to write into one RAMBlock: plain SAB handles, cheap to post. */
export interface BlockMemory {
  /** Guest memory: the committed image in COLO, the migrated RAM in precopy. */
  guest: SharedArrayBuffer[];
  /** COLO cache (colo_cache): staging for checkpoints; absent without COLO. */
  cache: SharedArrayBuffer[] | null;
  /** One bit per page (RAMBlock->bmap as colo_record_bitmap uses it); Int32 words for Atomics. */
  dirty: SharedArrayBuffer | null;
}

export function allocWindows(bytes: number): SharedArrayBuffer[] {
  const out: SharedArrayBuffer[] = [];
  for (let at = 0; at < bytes; at += WINDOW_BYTES) out.push(new SharedArrayBuffer(Math.min(WINDOW_BYTES, bytes - at)));
  return out;
}

/** Byte views over windows; built once per thread, then indexed by page. */
export class WindowedMemory {
  readonly views: Uint8Array[];
  constructor(windows: SharedArrayBuffer[]) { this.views = windows.map((w) => new Uint8Array(w)); }
  /** The 4 KiB view of one page (a view, no copy). */
  page(pageIndex: number): Uint8Array {
    const v = this.views[pageIndex >>> PAGES_PER_WINDOW_BITS]!;
    const at = (pageIndex & ((1 << PAGES_PER_WINDOW_BITS) - 1)) * TARGET_PAGE_SIZE;
    return v.subarray(at, at + TARGET_PAGE_SIZE);
  }
  /** Window and byte offset of a page, for copies without a subarray per page. */
  locate(pageIndex: number): [Uint8Array, number] {
    return [this.views[pageIndex >>> PAGES_PER_WINDOW_BITS]!, (pageIndex & ((1 << PAGES_PER_WINDOW_BITS) - 1)) * TARGET_PAGE_SIZE];
  }
}
