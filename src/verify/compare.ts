import type { CommittedImage } from '../migration/committed-image.js';
import type { ImageBlock } from '../memory/ram-block.js';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';

const ZERO = Buffer.alloc(TARGET_PAGE_SIZE);

/** First differing byte between an image block (read through its page table) and an expected buffer, or -1. */
export function firstDifference(block: ImageBlock, expected: Uint8Array): number {
  const pages = Math.min(block.pages, Math.ceil(expected.length / TARGET_PAGE_SIZE));
  for (let p = 0; p < pages; p++) {
    const at = p * TARGET_PAGE_SIZE;
    const n = Math.min(TARGET_PAGE_SIZE, expected.length - at);
    const v = block.page(p);
    const a = v ? Buffer.from(v.buffer, v.byteOffset, n) : ZERO.subarray(0, n);
    const b = Buffer.from(expected.buffer, expected.byteOffset + at, n);
    if (!a.equals(b)) for (let j = 0; j < n; j++) if (a[j] !== b[j]) return at + j;
  }
  return -1;
}

/** Compares every block of `img` with `expected` (by idstr). Returns a description of the first mismatch, or null. */
export function compareImage(img: CommittedImage, expected: Map<string, Uint8Array>): string | null {
  for (const b of img.blocks) {
    const e = expected.get(b.idstr);
    if (!e) return `block ${b.idstr}: not in the source`;
    if (e.length !== b.usedLength) return `block ${b.idstr}: ${b.usedLength} bytes, source has ${e.length}`;
    const d = firstDifference(b, e);
    if (d >= 0) return `block ${b.idstr}: differs first at offset 0x${d.toString(16)}`;
  }
  if (img.blocks.length !== expected.size) return `${img.blocks.length} blocks received, source has ${expected.size}`;
  return null;
}
