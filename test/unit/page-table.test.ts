import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { runWriteTask, SLOT_BYTES, SLOT_INDEX_BYTES, WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, writePages } from '../../src/memory/page-writer.js';
import { imageBlockBytes, NONE, RAMBlock, RAMBlockList, ZERO } from '../../src/memory/ram-block.js';
import { chunksFor, Slab, SlotMemory } from '../../src/memory/slab.js';
import { MigrationError } from '../../src/errors.js';

const P = 4096;
const ZPAGE = Buffer.alloc(P);

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 17 + i * 11 + (i >> 10)) & 0xff;
  return b;
}

function block(pages: number, colo = true, slab = new Slab({ chunkSlotBits: 4 })): RAMBlock {
  const b = new RAMBlock(0, 'pc.ram', pages * P, slab);
  if (colo) b.enableColo();
  return b;
}

/** What a worker does for one packet: slots chosen on this thread, bytes copied by runWriteTask. */
function writePacket(b: RAMBlock, mode: 0 | 1 | 2, normal: [number, number][], zeros: number[] = []): void {
  const staging = new SharedArrayBuffer(2 * SLOT_BYTES);
  const at = SLOT_BYTES;
  const slots = normal.map(([page]) => b.slotFor(page, mode));
  for (const z of zeros) b.zeroPage(z, mode);
  new Uint32Array(staging, at, slots.length).set(slots);
  new Uint8Array(staging, at + SLOT_INDEX_BYTES, normal.length * P).set(Buffer.concat(normal.map(([, seed]) => pageBytes(seed))));
  assert.equal(runWriteTask({ op: 'write', staging, slotOffset: at, normalPages: normal.length, mem: chunksFor(b.slab, slots, slots.length) }), normal.length);
}

const committed = (b: RAMBlock, p: number): Buffer => Buffer.from(b.committedPage(p) ?? ZPAGE);

describe('page table', () => {
  test('the initial migration writes each page once, in place; zero pages take no slot', () => {
    for (const mode of [WRITE_GUEST, WRITE_BOTH] as const) {
      const b = block(8);
      writePacket(b, mode, [[5, 1], [2, 2]], [7]);
      assert.deepEqual(committed(b, 5), pageBytes(1));
      assert.deepEqual(committed(b, 2), pageBytes(2));
      assert.equal(b.committed[7], ZERO);
      assert.equal(b.slab.usedSlots, 2);
      assert.equal(b.dirty!.count(), 0, 'no dirty bits before COLO state');
      // precopy resends a page: same slot, new bytes
      const s = b.committed[5];
      writePacket(b, mode, [[5, 9]]);
      assert.equal(b.committed[5], s);
      assert.deepEqual(committed(b, 5), pageBytes(9));
      // a page resent as zero gives its slot back at the next quiescent point
      writePacket(b, mode, [], [5]);
      assert.equal(b.committed[5], ZERO);
      assert.equal(b.slab.usedSlots, 2);
      b.slab.releaseDeferred();
      assert.equal(b.slab.usedSlots, 1);
    }
  });

  test('a checkpoint writes pending slots and marks normal and zero pages dirty; committed untouched until the commit', () => {
    const b = block(8);
    writePacket(b, WRITE_GUEST, [[0, 1], [4, 2], [6, 3]]);
    writePacket(b, WRITE_CACHE, [[0, 5], [3, 6]], [6]);
    assert.deepEqual(committed(b, 0), pageBytes(1));
    assert.deepEqual(committed(b, 6), pageBytes(3));
    assert.equal(b.committed[3], ZERO);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].filter((p) => b.dirty!.test(p)), [0, 3, 6]);
    assert.deepEqual(Buffer.from(b.cache!.page(0)), pageBytes(5));
    assert.equal(b.commit(), 3);
    assert.deepEqual(committed(b, 0), pageBytes(5));
    assert.deepEqual(committed(b, 3), pageBytes(6));
    assert.equal(b.committed[6], ZERO);
    assert.deepEqual(committed(b, 4), pageBytes(2), 'clean page kept');
    assert.equal(b.dirty!.count(), 0);
    assert.ok(b.pending!.every((e) => e === NONE));
    b.slab.releaseDeferred();
    assert.equal(b.slab.usedSlots, 3, 'old slots of 0 and 6 freed, 0/3/4 in use');
  });

  test('a page written twice in one checkpoint reuses its pending slot', () => {
    const b = block(8);
    writePacket(b, WRITE_CACHE, [[2, 1]]);
    const s = b.pending![2];
    writePacket(b, WRITE_CACHE, [[2, 2]]);
    assert.equal(b.pending![2], s);
    assert.equal(b.slab.usedSlots, 1);
    b.commit();
    assert.deepEqual(committed(b, 2), pageBytes(2));
  });

  test('a discarded checkpoint frees its slots and leaves every committed entry as it was', () => {
    const b = block(16);
    writePacket(b, WRITE_GUEST, [[1, 1], [2, 2]]);
    const before = [...b.committed];
    const img = imageBlockBytes(b.imageBlock());
    writePacket(b, WRITE_CACHE, [[1, 7], [9, 8]], [2]);
    assert.equal(b.discard(), 3);
    b.slab.releaseDeferred();
    assert.deepEqual([...b.committed], before);
    assert.ok(imageBlockBytes(b.imageBlock()).equals(img));
    assert.equal(b.slab.usedSlots, 2);
    assert.equal(b.dirty!.count(), 0);
  });

  test('no page copy at commit: the committed entry takes the pending slot number', () => {
    const b = block(4);
    writePacket(b, WRITE_CACHE, [[1, 3]]);
    const s = b.pending![1];
    b.commit();
    assert.equal(b.committed[1], s);
  });
});

describe('slab', () => {
  test('allocates lowest-first, so freed high chunks can be returned whole', () => {
    const slab = new Slab({ chunkSlotBits: 4 });
    const slots = Array.from({ length: 64 }, () => slab.alloc());
    assert.equal(slab.liveChunks, 4);
    for (const s of slots.slice(8)) slab.free(s);
    // lowest-first: the next allocation comes from chunk 0
    const again = slab.alloc();
    assert.equal(again >>> 4, 0);
    slab.free(again);
    assert.equal(slab.trim(16), 1, 'chunk 3 goes back: the reserve (16 slots) and one chunk of slack stay');
    assert.equal(slab.trim(0), 1, 'chunk 2 goes back too with no reserve; one chunk of slack stays');
    assert.equal(slab.liveChunks, 2);
    assert.equal(slab.usedSlots, 8);
    for (let i = 0; i < 24; i++) assert.ok(slab.alloc() >>> 4 < 2 || slab.liveChunks <= 3);
  });

  test('--max-memory: allocation beyond the cap is ERR_LIMIT', () => {
    const slab = new Slab({ chunkSlotBits: 4, maxBytes: 2 * 16 * P });
    for (let i = 0; i < 32; i++) slab.alloc();
    assert.throws(() => slab.alloc(), (e: unknown) => e instanceof MigrationError && e.code === 'ERR_LIMIT');
  });

  test('a worker never writes outside the slots it was given', () => {
    const slab = new Slab({ chunkSlotBits: 4 });
    const s = [slab.alloc(), slab.alloc()];
    const mem = new SlotMemory(chunksFor(slab, s, 2));
    assert.throws(() => mem.view(16 * 5), /not in the task's chunks/);
    writePages(mem, Uint32Array.from(s), 2, new Uint8Array(Buffer.concat([pageBytes(1), pageBytes(2)])));
    assert.deepEqual(Buffer.from(slab.page(s[0]!)), pageBytes(1));
    assert.deepEqual(Buffer.from(slab.page(s[1]!)), pageBytes(2));
    for (let k = 2; k < 16; k++) assert.ok(Buffer.from(slab.views[0]!.subarray(k * P, (k + 1) * P)).equals(ZPAGE), `slot ${k} untouched`);
  });

  test('blocks of one list share the slab', () => {
    const list = new RAMBlockList(new Slab({ chunkSlotBits: 4 }));
    const a = list.add('a', 4 * P), b = list.add('b', 4 * P);
    a.slotFor(0, WRITE_GUEST);
    b.slotFor(0, WRITE_GUEST);
    assert.equal(list.slab.usedSlots, 2);
    assert.notEqual(a.committed[0], b.committed[0]);
  });
});

describe('slab allocation', () => {
  test('single slots come lowest first and ascending, holes first', () => {
    const slab = new Slab({ chunkSlotBits: 6 });
    const a = Array.from({ length: 10 }, () => slab.alloc());
    assert.deepEqual(a, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    slab.free(7); slab.free(3); slab.free(4);
    assert.deepEqual([slab.alloc(), slab.alloc(), slab.alloc(), slab.alloc()], [3, 4, 7, 10]);
    assert.throws(() => { slab.free(5); slab.free(5); }, /freed twice/);
  });

  test('allocRun: the lowest run of n free slots inside one existing chunk, never a new chunk', () => {
    const slab = new Slab({ chunkSlotBits: 6 });   // 64 slots per chunk
    for (let i = 0; i < 64; i++) slab.alloc();
    assert.equal(slab.liveChunks, 1);
    assert.equal(slab.allocRun(4), -1, 'a full chunk has no run, and no chunk is added for one');
    assert.equal(slab.liveChunks, 1);
    for (const s of [10, 11, 20, 21, 22, 23, 24, 40, 41, 42, 43, 44, 45]) slab.free(s);
    assert.equal(slab.allocRun(5), 20);
    assert.equal(slab.allocRun(5), 40);
    assert.equal(slab.allocRun(2), 10);
    assert.equal(slab.allocRun(2), -1, 'one slot (45) left');
    assert.equal(slab.alloc(), 45);
    assert.equal(slab.usedSlots, 64);
    // a run across a chunk boundary is two chunks' memory: never handed out as one
    slab.alloc();                                  // adds chunk 1 (slot 64)
    slab.free(63); slab.free(62);
    assert.equal(slab.allocRun(4), 65);
    assert.equal(slab.allocRun(2), 62);
  });

  test('allocRun finds what a bit-by-bit search finds (random fragmentation, run sizes 2..200)', () => {
    let seed = 12345;
    const rnd = (k: number): number => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % k; };
    for (let round = 0; round < 40; round++) {
      const slab = new Slab({ chunkSlotBits: 8 });   // 256 slots per chunk
      const used = new Set<number>();
      for (let i = 0; i < 512; i++) used.add(slab.alloc());
      for (let i = 0; i < 200; i++) { const s = rnd(512); if (used.delete(s)) slab.free(s); }
      for (let q = 0; q < 20; q++) {
        const n = 2 + rnd(round % 2 ? 40 : 200);
        let expect = -1;
        for (let c = 0; c < 2 && expect < 0; c++) {
          for (let st = c * 256; st + n <= (c + 1) * 256; st++) {
            let ok = true;
            for (let i = st; i < st + n; i++) if (used.has(i)) { ok = false; break; }
            if (ok) { expect = st; break; }
          }
        }
        const got = slab.allocRun(n);
        assert.equal(got, expect, `round ${round}, run of ${n}`);
        if (got >= 0) for (let i = got; i < got + n; i++) used.add(i);
      }
    }
  });

  test('allocRun(n, mappedOnly) stays below the touched mark (random fragmentation, bit-by-bit check)', () => {
    let seed = 777;
    const rnd = (k: number): number => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % k; };
    for (let round = 0; round < 40; round++) {
      const slab = new Slab({ chunkSlotBits: 8 });
      const touched = 40 + rnd(200);                 // slots below it were handed out once
      const used = new Set<number>();
      for (let i = 0; i < touched; i++) used.add(slab.alloc());
      for (let i = 0; i < touched / 2; i++) { const s = rnd(touched); if (used.delete(s)) slab.free(s); }
      for (let q = 0; q < 12; q++) {
        const n = 2 + rnd(round % 2 ? 20 : 80);
        let expect = -1;
        for (let st = 0; st + n <= touched; st++) {
          let ok = true;
          for (let i = st; i < st + n; i++) if (used.has(i)) { ok = false; break; }
          if (ok) { expect = st; break; }
        }
        const fresh = slab.freshSlots;
        const got = slab.allocRun(n, true);
        assert.equal(got, expect, `round ${round}, mapped run of ${n} below ${touched}`);
        assert.equal(slab.freshSlots, fresh, 'no fresh slot');
        if (got >= 0) for (let i = got; i < got + n; i++) used.add(i);
      }
    }
  });

  test('takeRun: mapped runs first (halving), then nothing while mapped holes remain, fresh runs only when none does', () => {
    const slab = new Slab({ chunkSlotBits: 8 });   // 256 slots per chunk
    for (let i = 0; i < 64; i++) slab.alloc();
    assert.equal(slab.freshSlots, 64);
    for (const s of [10, 11, 12, 13, 20, 30]) slab.free(s);
    assert.equal(slab.takeRun(16, 4), 10, 'no mapped run of 16 or 8: the run of 4 at 10');
    assert.equal(slab.runLength, 4);
    assert.equal(slab.takeRun(16, 4), -1, 'holes 20 and 30 are mapped: the caller takes them singly, no fresh run');
    assert.deepEqual([slab.alloc(), slab.alloc()], [20, 30]);
    assert.equal(slab.freshSlots, 64, 'nothing new faulted in so far');
    assert.equal(slab.takeRun(16, 4), 64, 'nothing mapped is free: a run of fresh memory');
    assert.equal(slab.runLength, 16);
    assert.equal(slab.freshSlots, 80);
    assert.equal(slab.prefaultStep(32, 32), false, 'maps 80..111');
    assert.equal(slab.takeRun(128, 8), 80, 'the prefaulted slots, not the fresh ones above them');
    assert.equal(slab.runLength, 32);
    assert.equal(slab.freshSlots, 80);
  });

  test('allocRun of 16-slot test chunks (half a bitmap word)', () => {
    const slab = new Slab({ chunkSlotBits: 4 });
    slab.alloc();
    assert.equal(slab.allocRun(15), 1);
    assert.equal(slab.allocRun(2), -1);
    assert.equal(slab.usedSlots, 16);
  });
});

describe('slab prefault', () => {
  test('maps never-used slots up to the reserve, adds a chunk only when none has any, respects --max-memory', () => {
    const slab = new Slab({ chunkSlotBits: 6, maxBytes: 2 * 64 * P });   // 2 chunks of 64 slots
    for (let i = 0; i < 10; i++) slab.alloc();
    assert.equal(slab.mappedFreeSlots, 0);
    assert.equal(slab.prefaultStep(20, 16), true);
    assert.equal(slab.mappedFreeSlots, 16);
    assert.equal(slab.prefaultStep(20, 16), false);
    assert.equal(slab.mappedFreeSlots, 32);
    assert.equal(slab.liveChunks, 1);
    assert.deepEqual([slab.alloc(), slab.alloc()], [10, 11], 'allocation is unchanged: lowest first');
    while (slab.prefaultStep(100, 64)) { /* until the cap */ }
    assert.equal(slab.liveChunks, 2, 'a second chunk, not a third (max-memory)');
    assert.equal(slab.mappedFreeSlots, 128 - 12);
    assert.equal(slab.prefaultStep(1000), false);
  });
});
