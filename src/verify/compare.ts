import type { CommittedImage } from '../migration/committed-image.js';

/** First differing byte between an image block and an expected buffer, or -1. */
export function firstDifference(views: Uint8Array[], expected: Uint8Array): number {
  let base = 0;
  for (const v of views) {
    const n = Math.min(v.length, expected.length - base);
    const a = Buffer.from(v.buffer, v.byteOffset, n);
    const b = Buffer.from(expected.buffer, expected.byteOffset + base, n);
    if (!a.equals(b)) {
      for (let i = 0; i < n; i += 4096) {
        const k = Math.min(4096, n - i);
        if (a.compare(b, i, i + k, i, i + k) !== 0) {
          for (let j = i; j < i + k; j++) if (a[j] !== b[j]) return base + j;
        }
      }
    }
    base += n;
    if (base >= expected.length) break;
  }
  return -1;
}

/** Compares every block of `img` with `expected` (by idstr). Returns a description of the first mismatch, or null. */
export function compareImage(img: CommittedImage, expected: Map<string, Uint8Array>): string | null {
  for (const b of img.blocks) {
    const e = expected.get(b.idstr);
    if (!e) return `block ${b.idstr}: not in the source`;
    if (e.length !== b.usedLength) return `block ${b.idstr}: ${b.usedLength} bytes, source has ${e.length}`;
    const d = firstDifference(b.views, e);
    if (d >= 0) return `block ${b.idstr}: differs first at offset 0x${d.toString(16)}`;
  }
  if (img.blocks.length !== expected.size) return `${img.blocks.length} blocks received, source has ${expected.size}`;
  return null;
}
