// The dirty bitmap against a Set<number> model, and planFlush against the set it must cover.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { planFlush } from '../../src/memory/colo-flush.js';
import { DirtyBitmap } from '../../src/memory/dirty-bitmap.js';
import { runFlushTask, type FlushTask } from '../../src/memory/page-writer.js';
import { RAMBlock } from '../../src/memory/ram-block.js';
import type { BlockMemory } from '../../src/memory/shared-layout.js';

const P = 4096;
const RUNS = Number(process.env.FUZZ_RUNS ?? 200);
const ZERO = Buffer.alloc(P);

type Op = { op: 'mark'; page: number } | { op: 'test'; page: number } | { op: 'drain'; from: number; to: number } | { op: 'count' };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: fc.record({ op: fc.constant('mark' as const), page: fc.nat() }) },
  { weight: 2, arbitrary: fc.record({ op: fc.constant('test' as const), page: fc.nat() }) },
  { weight: 1, arbitrary: fc.record({ op: fc.constant('drain' as const), from: fc.nat(), to: fc.nat() }) },
  { weight: 1, arbitrary: fc.constant({ op: 'count' as const }) },
);

/** Pages: scattered ones and runs (whole words, runs across word and 256-word boundaries). */
function dirtyArb(pages: number): fc.Arbitrary<Set<number>> {
  return fc.tuple(
    fc.array(fc.nat(pages - 1), { maxLength: 60 }),
    fc.array(fc.record({ start: fc.nat(pages - 1), len: fc.integer({ min: 1, max: 3000 }) }), { maxLength: 4 }),
  ).map(([singles, runs]) => {
    const s = new Set(singles);
    for (const r of runs) for (let p = r.start; p < Math.min(pages, r.start + r.len); p++) s.add(p);
    return s;
  });
}

function bitmapWith(pages: number, dirty: Iterable<number>): DirtyBitmap {
  const bm = DirtyBitmap.alloc(pages);
  for (const p of dirty) bm.mark(p);
  return bm;
}

/** Pages whose bits lie in a task's word range, read without clearing. */
function covered(t: FlushTask): number[] {
  const words = new Int32Array(t.mem.dirty!);
  const out: number[] = [];
  for (let i = t.wordFrom; i < t.wordTo; i++) for (let b = 0; b < 32; b++) if (words[i]! & (1 << b)) out.push(i * 32 + b);
  return out;
}

const sorted = (s: Iterable<number>): number[] => [...s].sort((a, b) => a - b);

describe('DirtyBitmap against a Set model', () => {
  test('mark, test, count and drain agree with a Set<number>', () => {
    fc.assert(fc.property(fc.integer({ min: 1, max: 400 }), fc.array(opArb, { maxLength: 200 }), (pages, ops) => {
      const bm = DirtyBitmap.alloc(pages);
      const words = bm.words.length;
      const model = new Set<number>();
      for (const o of ops) {
        switch (o.op) {
          case 'mark': {
            const p = o.page % pages;
            assert.equal(bm.mark(p), !model.has(p), `mark(${p})`);
            model.add(p);
            break;
          }
          case 'test': {
            const p = o.page % pages;
            assert.equal(bm.test(p), model.has(p), `test(${p})`);
            break;
          }
          case 'count':
            assert.equal(bm.count(), model.size);
            break;
          case 'drain': {
            const from = o.from % (words + 1), to = from + (o.to % (words + 1 - from));
            const got: number[] = [];
            const n = bm.drain(from, to, (p) => got.push(p));
            const want = sorted([...model].filter((p) => p >= from * 32 && p < to * 32));
            assert.deepEqual(got, want, `drain(${from}, ${to})`);
            assert.equal(n, want.length);
            for (const p of want) model.delete(p);
            break;
          }
        }
      }
      assert.equal(bm.count(), model.size);
      for (let p = 0; p < pages; p++) assert.equal(bm.test(p), model.has(p));
    }), { numRuns: RUNS });
  });

  test('drain of every word returns exactly the marked set and leaves the bitmap clean', () => {
    fc.assert(fc.property(fc.integer({ min: 1, max: 20000 }).chain((pages) => fc.tuple(fc.constant(pages), dirtyArb(pages))), ([pages, dirty]) => {
      const bm = bitmapWith(pages, dirty);
      assert.equal(bm.count(), dirty.size);
      const got: number[] = [];
      assert.equal(bm.drain(0, bm.words.length, (p) => got.push(p)), dirty.size);
      assert.deepEqual(got, sorted(dirty));
      assert.equal(bm.count(), 0);
      assert.ok(bm.words.every((w) => w === 0));
    }), { numRuns: RUNS });
  });
});

describe('planFlush', () => {
  const blockArb = fc.record({ pages: fc.integer({ min: 1, max: 40000 }), colo: fc.boolean() })
    .chain(({ pages, colo }) => fc.record({ pages: fc.constant(pages), colo: fc.constant(colo), dirty: colo ? dirtyArb(pages) : fc.constant(new Set<number>()) }));

  test('covers exactly the dirty pages with non-overlapping ranges', () => {
    fc.assert(fc.property(fc.array(blockArb, { minLength: 1, maxLength: 4 }), fc.integer({ min: 1, max: 16 }), (specs, parts) => {
      const mems: BlockMemory[] = specs.map((s) => s.colo
        ? { guest: [], cache: [], dirty: bitmapWith(s.pages, s.dirty).sab }
        : { guest: [], cache: null, dirty: null });
      const { tasks, pages } = planFlush(mems, parts);
      const total = specs.reduce((n, s) => n + s.dirty.size, 0);
      assert.equal(pages, total);
      if (total === 0) assert.deepEqual(tasks, []);
      specs.forEach((s, i) => {
        const mem = mems[i]!;
        const mine = tasks.filter((t) => t.mem === mem).sort((a, b) => a.wordFrom - b.wordFrom);
        if (!s.colo) { assert.equal(mine.length, 0, 'a block without COLO cache is never flushed'); return; }
        const words = Math.ceil(s.pages / 32);
        for (const t of mine) {
          assert.equal(t.op, 'flush');
          assert.ok(t.wordFrom >= 0 && t.wordFrom < t.wordTo && t.wordTo <= words, `range [${t.wordFrom}, ${t.wordTo}) of ${words} words`);
          assert.ok(covered(t).length > 0, 'no task without a dirty page');
        }
        for (let k = 1; k < mine.length; k++) assert.ok(mine[k - 1]!.wordTo <= mine[k]!.wordFrom, 'ranges overlap');
        assert.deepEqual(sorted(mine.flatMap(covered)), sorted(s.dirty));
      });
      // every task belongs to a listed block
      for (const t of tasks) assert.ok(mems.includes(t.mem));
      // no more tasks than ranges allow: at most parts per block plus one per 256-word cut
      const bound = specs.reduce((n, s) => n + (s.colo ? Math.ceil(Math.ceil(s.pages / 32) / 256) + parts : 0), 0);
      assert.ok(tasks.length <= bound, `${tasks.length} tasks > ${bound}`);
    }), { numRuns: RUNS });
  });

  test('flushing every planned task copies exactly the dirty pages from cache to guest', () => {
    const arb = fc.array(fc.integer({ min: 1, max: 128 }).chain((pages) => fc.tuple(fc.constant(pages), dirtyArb(pages), fc.nat(255))), { minLength: 1, maxLength: 3 });
    fc.assert(fc.property(arb, fc.integer({ min: 1, max: 8 }), (specs, parts) => {
      const blocks = specs.map(([pages, dirty, seed], i) => {
        const b = new RAMBlock(i, `b${i}`, pages * P);
        b.enableColo();
        for (let p = 0; p < pages; p++) b.cache!.page(p).fill((seed + p) & 0xff | 1);   // every cache page differs from guest (zero)
        for (const p of dirty) b.dirty!.mark(p);
        return b;
      });
      const { tasks, pages } = planFlush(blocks.map((b) => b.memory()), parts);
      assert.equal(tasks.reduce((n, t) => n + runFlushTask(t), 0), pages);
      specs.forEach(([n, dirty], i) => {
        const b = blocks[i]!;
        for (let p = 0; p < n; p++) {
          const g = Buffer.from(b.guest.page(p));
          if (dirty.has(p)) assert.ok(g.equals(Buffer.from(b.cache!.page(p))), `block ${i} page ${p} not flushed`);
          else assert.ok(g.equals(ZERO), `block ${i} page ${p} written although clean`);
        }
        assert.equal(b.dirty!.count(), 0);
      });
    }), { numRuns: RUNS });
  });
});
