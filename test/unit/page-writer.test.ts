import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { planFlush } from '../../src/memory/colo-flush.js';
import { DirtyBitmap } from '../../src/memory/dirty-bitmap.js';
import {
  runFlushTask, runWriteTask, SLOT_BYTES, SLOT_INDEX_BYTES, WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, writePages, type FlushTask,
} from '../../src/memory/page-writer.js';
import { RAMBlock } from '../../src/memory/ram-block.js';
import type { BlockMemory } from '../../src/memory/shared-layout.js';

const P = 4096;
const ZERO = Buffer.alloc(P);

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 17 + i * 11 + (i >> 10)) & 0xff;
  return b;
}

function block(pages: number, colo = true): RAMBlock {
  const b = new RAMBlock(0, 'pc.ram', pages * P);
  if (colo) b.enableColo();
  return b;
}

const guest = (b: RAMBlock, i: number): Buffer => Buffer.from(b.guest.page(i));
const cache = (b: RAMBlock, i: number): Buffer => Buffer.from(b.cache!.page(i));

/** Normal pages back to back, as a NOCOMP payload. */
function payload(seeds: number[]): Uint8Array { return new Uint8Array(Buffer.concat(seeds.map(pageBytes))); }

describe('writePages', () => {
  test('writes guest memory only in WRITE_GUEST mode', () => {
    const b = block(8);
    const n = writePages(b.memory(), WRITE_GUEST, Uint32Array.of(5, 2), 2, 0, payload([1, 2]));
    assert.equal(n, 2);
    assert.deepEqual(guest(b, 5), pageBytes(1));
    assert.deepEqual(guest(b, 2), pageBytes(2));
    assert.deepEqual(cache(b, 5), ZERO);
    assert.equal(b.dirty!.count(), 0);
  });

  test('writes guest memory of a block without COLO', () => {
    const b = block(4, false);
    writePages(b.memory(), WRITE_GUEST, Uint32Array.of(3), 1, 0, payload([3]));
    assert.deepEqual(guest(b, 3), pageBytes(3));
  });

  test('writes cache and guest without dirty bits in WRITE_BOTH mode', () => {
    const b = block(8);
    writePages(b.memory(), WRITE_BOTH, Uint32Array.of(1, 7), 1, 1, payload([4]));
    assert.deepEqual(guest(b, 1), pageBytes(4));
    assert.deepEqual(cache(b, 1), pageBytes(4));
    assert.deepEqual(guest(b, 7), ZERO);
    assert.equal(b.dirty!.count(), 0);
  });

  test('writes the cache only and marks normal and zero pages dirty in WRITE_CACHE mode', () => {
    const b = block(8);
    b.cache!.page(6).fill(0xaa);
    const n = writePages(b.memory(), WRITE_CACHE, Uint32Array.of(0, 4, 6), 2, 1, payload([5, 6]));
    assert.equal(n, 3);
    assert.deepEqual(cache(b, 0), pageBytes(5));
    assert.deepEqual(cache(b, 4), pageBytes(6));
    assert.deepEqual(cache(b, 6), ZERO);
    for (let i = 0; i < 8; i++) assert.deepEqual(guest(b, i), ZERO, `guest page ${i} untouched`);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].filter((p) => b.dirty!.test(p)), [0, 4, 6]);
  });

  test('zero pages overwrite earlier contents', () => {
    const b = block(4, false);
    b.guest.page(2).fill(0xff);
    writePages(b.memory(), WRITE_GUEST, Uint32Array.of(2), 0, 1, new Uint8Array(0));
    assert.deepEqual(guest(b, 2), ZERO);
  });

  test('a later page of one packet wins when an index repeats', () => {
    const b = block(4, false);
    writePages(b.memory(), WRITE_GUEST, Uint32Array.of(1, 1), 2, 0, payload([1, 2]));
    assert.deepEqual(guest(b, 1), pageBytes(2));
  });
});

describe('runWriteTask', () => {
  test('takes page indexes and payload from its staging slot', () => {
    const b = block(16);
    const staging = new SharedArrayBuffer(2 * SLOT_BYTES);
    const slot = SLOT_BYTES;   // the second slot: the first must not be read
    new Uint32Array(staging, 0, 2).set([9, 9]);
    new Uint32Array(staging, slot, 3).set([15, 0, 8]);
    new Uint8Array(staging, slot + SLOT_INDEX_BYTES, 2 * P).set(payload([7, 8]));
    const n = runWriteTask({ op: 'write', mem: b.memory(), mode: WRITE_CACHE, staging, slotOffset: slot, normalPages: 2, zeroPages: 1 });
    assert.equal(n, 3);
    assert.deepEqual(cache(b, 15), pageBytes(7));
    assert.deepEqual(cache(b, 0), pageBytes(8));
    assert.deepEqual(cache(b, 8), ZERO);
    assert.ok(!b.dirty!.test(9));
    assert.equal(b.dirty!.count(), 3);
  });
});

describe('runFlushTask', () => {
  test('copies dirty pages from the cache to guest memory and clears their bits', () => {
    const b = block(96);
    for (const p of [0, 33, 95]) { b.cache!.page(p).set(pageBytes(p)); b.dirty!.mark(p); }
    b.cache!.page(50).set(pageBytes(50));   // clean: stays out of guest memory
    const n = runFlushTask({ op: 'flush', mem: b.memory(), wordFrom: 0, wordTo: 3 });
    assert.equal(n, 3);
    for (const p of [0, 33, 95]) assert.deepEqual(guest(b, p), pageBytes(p));
    assert.deepEqual(guest(b, 50), ZERO);
    assert.equal(b.dirty!.count(), 0);
  });

  test('flushes only the words of its range', () => {
    const b = block(96);
    for (const p of [1, 40, 70]) { b.cache!.page(p).set(pageBytes(p)); b.dirty!.mark(p); }
    assert.equal(runFlushTask({ op: 'flush', mem: b.memory(), wordFrom: 1, wordTo: 2 }), 1);
    assert.deepEqual(guest(b, 40), pageBytes(40));
    assert.deepEqual(guest(b, 1), ZERO);
    assert.deepEqual(guest(b, 70), ZERO);
    assert.ok(b.dirty!.test(1));
    assert.ok(b.dirty!.test(70));
  });

  test('does nothing for a block without a COLO cache', () => {
    const b = block(4, false);
    assert.equal(runFlushTask({ op: 'flush', mem: b.memory(), wordFrom: 0, wordTo: 1 }), 0);
  });
});

/** A BlockMemory with only a bitmap: planFlush reads nothing else. */
function bitmapOnly(pages: number, dirty: Iterable<number>): BlockMemory {
  const bm = DirtyBitmap.alloc(pages);
  for (const p of dirty) bm.mark(p);
  return { guest: [], cache: [], dirty: bm.sab };
}

/** Pages each task would flush, without clearing anything. */
function covered(t: FlushTask): number[] {
  const words = new Int32Array(t.mem.dirty!);
  const out: number[] = [];
  for (let i = t.wordFrom; i < t.wordTo; i++) for (let bit = 0; bit < 32; bit++) if (words[i]! & (1 << bit)) out.push(i * 32 + bit);
  return out;
}

describe('planFlush', () => {
  test('plans nothing when no page is dirty', () => {
    assert.deepEqual(planFlush([bitmapOnly(1024, [])], 4), { tasks: [], pages: 0 });
  });

  test('skips blocks without a COLO cache', () => {
    const noColo: BlockMemory = { guest: [], cache: null, dirty: null };
    const { tasks, pages } = planFlush([noColo, bitmapOnly(64, [3])], 2);
    assert.equal(pages, 1);
    assert.equal(tasks.length, 1);
    assert.notEqual(tasks[0]!.mem, noColo);
  });

  test('puts a few dirty pages of one block into one task', () => {
    const mem = bitmapOnly(4096, [5, 6, 1000, 4095]);
    const { tasks, pages } = planFlush([mem], 1);
    assert.equal(pages, 4);
    assert.equal(tasks.length, 1);
    assert.equal(tasks[0]!.wordFrom, 0);
    assert.deepEqual(covered(tasks[0]!), [5, 6, 1000, 4095]);
  });

  test('starts the first range at the first dirty word', () => {
    const { tasks } = planFlush([bitmapOnly(4096, [64 * 32 + 1])], 1);
    assert.deepEqual(tasks.map((t) => [t.wordFrom, t.wordTo]), [[64, 128]]);
  });

  test('splits evenly dirty memory into one task per part', () => {
    // 4096 words with one dirty page each: ranges of 256 words, 4 per task
    const mem = bitmapOnly(4096 * 32, Array.from({ length: 4096 }, (_, w) => w * 32 + (w % 32)));
    const { tasks, pages } = planFlush([mem], 4);
    assert.equal(pages, 4096);
    assert.equal(tasks.length, 4);
    assert.deepEqual(tasks.map((t) => covered(t).length), [1024, 1024, 1024, 1024]);
    for (let k = 1; k < tasks.length; k++) assert.ok(tasks[k - 1]!.wordTo <= tasks[k]!.wordFrom, 'tasks do not overlap');
  });

  test('never merges ranges of different blocks into one task', () => {
    const a = bitmapOnly(256, [0, 255]), b = bitmapOnly(256, [7]);
    const { tasks, pages } = planFlush([a, b], 1);
    assert.equal(pages, 3);
    assert.deepEqual(tasks.map((t) => t.mem === a ? 'a' : 'b'), ['a', 'b']);
    assert.deepEqual(tasks.map(covered), [[0, 255], [7]]);
  });

  test('flushing every planned task copies every dirty page once', () => {
    const b = block(300);
    const dirty = [0, 31, 32, 100, 299];
    for (const p of dirty) { b.cache!.page(p).set(pageBytes(p)); b.dirty!.mark(p); }
    const { tasks, pages } = planFlush([b.memory()], 3);
    assert.equal(pages, dirty.length);
    assert.equal(tasks.reduce((n, t) => n + runFlushTask(t), 0), dirty.length);
    for (let p = 0; p < 300; p++) assert.deepEqual(guest(b, p), dirty.includes(p) ? pageBytes(p) : ZERO, `page ${p}`);
    assert.equal(b.dirty!.count(), 0);
  });
});
