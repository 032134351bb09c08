import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { DirtyBitmap } from '../../src/memory/dirty-bitmap.js';

function drained(bm: DirtyBitmap, from = 0, to = bm.words.length): { pages: number[]; n: number } {
  const pages: number[] = [];
  const n = bm.drain(from, to, (p) => pages.push(p));
  return { pages, n };
}

describe('DirtyBitmap', () => {
  test('allocates one bit per page, rounded up to whole 32-bit words', () => {
    assert.equal(DirtyBitmap.alloc(1).words.length, 1);
    assert.equal(DirtyBitmap.alloc(32).words.length, 1);
    assert.equal(DirtyBitmap.alloc(33).words.length, 2);
    assert.equal(DirtyBitmap.alloc(16384).sab.byteLength, 2048);
    assert.equal(DirtyBitmap.alloc(100).pages, 100);
  });

  test('mark returns true for a clean page and false for a dirty one', () => {
    const bm = DirtyBitmap.alloc(64);
    assert.equal(bm.mark(5), true);
    assert.equal(bm.mark(5), false);
    assert.equal(bm.mark(37), true);
    assert.ok(bm.test(5));
    assert.ok(bm.test(37));
    assert.ok(!bm.test(4));
    assert.ok(!bm.test(6));
    assert.ok(!bm.test(36));
    assert.equal(bm.count(), 2);
  });

  test('handles bit 31 of a word (the sign bit of an Int32)', () => {
    const bm = DirtyBitmap.alloc(64);
    assert.ok(bm.mark(31));
    assert.ok(bm.mark(63));
    assert.ok(!bm.mark(31));
    assert.ok(bm.test(31));
    assert.ok(!bm.test(32));
    assert.equal(bm.count(), 2);
    assert.deepEqual(drained(bm), { pages: [31, 63], n: 2 });
  });

  test('counts a full word', () => {
    const bm = DirtyBitmap.alloc(96);
    for (let p = 32; p < 64; p++) bm.mark(p);
    assert.equal(bm.count(), 32);
    assert.equal(bm.words[1], -1);
  });

  test('drain reports every dirty page in ascending order and clears them', () => {
    const bm = DirtyBitmap.alloc(200);
    const set = [199, 0, 64, 65, 31, 32, 130];
    for (const p of set) bm.mark(p);
    assert.deepEqual(drained(bm), { pages: [...set].sort((a, b) => a - b), n: set.length });
    assert.equal(bm.count(), 0);
    assert.deepEqual(drained(bm), { pages: [], n: 0 });
  });

  test('drain touches only words [from, to)', () => {
    const bm = DirtyBitmap.alloc(128);
    for (const p of [3, 40, 70, 127]) bm.mark(p);
    assert.deepEqual(drained(bm, 1, 3), { pages: [40, 70], n: 2 });
    assert.ok(bm.test(3));
    assert.ok(bm.test(127));
    assert.ok(!bm.test(40));
    assert.equal(bm.count(), 2);
  });

  test('two views of one SharedArrayBuffer see the same bits', () => {
    const a = DirtyBitmap.alloc(64);
    const b = new DirtyBitmap(a.sab, 0);
    a.mark(10);
    assert.ok(b.test(10));
    assert.equal(b.mark(10), false);
    b.drain(0, b.words.length, () => undefined);
    assert.ok(!a.test(10));
  });

  test('a page marked during drain is either reported now or kept for the next drain', () => {
    const bm = DirtyBitmap.alloc(128);
    bm.mark(1);
    bm.mark(100);
    const seen: number[] = [];
    // A writer marks pages while the flush runs: 2 sits in a word already taken, 101 in one not yet read.
    bm.drain(0, 4, (p) => { seen.push(p); if (p === 1) { bm.mark(2); bm.mark(101); } });
    const second = drained(bm);
    assert.deepEqual([...seen, ...second.pages].sort((x, y) => x - y), [1, 2, 100, 101]);
    assert.equal(new Set([...seen, ...second.pages]).size, 4, 'no page reported twice');
  });
});

describe('DirtyBitmap.record (gathered per word)', () => {
  test('every recorded page is seen by test, count and drain, across words and out of order', () => {
    const bm = DirtyBitmap.alloc(200);
    for (const p of [3, 4, 31, 32, 33, 199, 5, 64]) bm.record(p);
    assert.ok(bm.test(199));
    bm.record(100);
    assert.equal(bm.count(), 9);
    bm.record(7);
    const { pages } = drained(bm);
    assert.deepEqual(pages, [3, 4, 5, 7, 31, 32, 33, 64, 100, 199]);
    assert.equal(bm.count(), 0);
  });
});
