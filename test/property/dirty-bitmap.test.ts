// The dirty bitmap against a Set<number> model, and the page table against a dense image.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { DirtyBitmap } from '../../src/memory/dirty-bitmap.js';
import { WRITE_BOTH, WRITE_CACHE } from '../../src/memory/page-writer.js';
import { RAMBlock } from '../../src/memory/ram-block.js';
import { Slab } from '../../src/memory/slab.js';

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

describe('page table against a dense model', () => {
  type TOp = { op: 'page'; page: number; seed: number } | { op: 'zero'; page: number } | { op: 'end'; commit: boolean };
  const tOpArb = (pages: number): fc.Arbitrary<TOp> => fc.oneof(
    { weight: 6, arbitrary: fc.record({ op: fc.constant('page' as const), page: fc.nat(pages - 1), seed: fc.integer({ min: 1, max: 255 }) }) },
    { weight: 3, arbitrary: fc.record({ op: fc.constant('zero' as const), page: fc.nat(pages - 1) }) },
    { weight: 1, arbitrary: fc.record({ op: fc.constant('end' as const), commit: fc.boolean() }) },
  );

  test('checkpoints of normal and zero pages, committed or discarded: the image is the model, no slot leaks', () => {
    const arb = fc.integer({ min: 1, max: 200 }).chain((pages) => fc.tuple(
      fc.constant(pages), fc.array(fc.tuple(fc.nat(pages - 1), fc.integer({ min: 1, max: 255 })), { maxLength: 100 }), fc.array(tOpArb(pages), { maxLength: 300 })));
    fc.assert(fc.property(arb, ([pages, initial, ops]) => {
      const b = new RAMBlock(0, 'pc.ram', pages * P, new Slab({ chunkSlotBits: 4 }));
      b.enableColo();
      const model: number[] = new Array(pages).fill(0);   // fill byte of each committed page (0: zero page)
      for (const [page, seed] of initial) { b.slab.page(b.slotFor(page, WRITE_BOTH)).fill(seed); model[page] = seed; }
      b.slab.releaseDeferred();
      let cp = new Map<number, number>();
      const check = () => {
        for (let p = 0; p < pages; p++) {
          const v = b.committedPage(p);
          if (model[p] === 0) assert.ok(v === null || Buffer.from(v).equals(ZERO), `page ${p} should be zero`);
          else assert.ok(v !== null && v.every((x) => x === model[p]), `page ${p} should be ${model[p]}`);
        }
        b.slab.releaseDeferred();
        assert.equal(b.slab.usedSlots, b.committedSlots, 'every slot in use is a committed page (no leak)');
      };
      for (const o of ops) {
        if (o.op === 'page') { b.slab.page(b.slotFor(o.page, WRITE_CACHE)).fill(o.seed); cp.set(o.page, o.seed); }
        else if (o.op === 'zero') { b.zeroPage(o.page, WRITE_CACHE); cp.set(o.page, 0); }
        else {
          assert.equal(b.dirty!.count(), cp.size);
          if (o.commit) { assert.equal(b.commit(), cp.size); for (const [p, v] of cp) model[p] = v; }
          else assert.equal(b.discard(), cp.size);
          cp = new Map();
          check();
        }
      }
      b.discard();
      check();
    }), { numRuns: RUNS });
  });
});
