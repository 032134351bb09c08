// PagePool's task rings (src/pool/page-pool.ts, serveRing in src/memory/page-writer.ts):
// packets reach the workers as records in a SharedArrayBuffer, not as piscina tasks.
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test } from 'node:test';
import { SLOT_BYTES, SLOT_INDEX_BYTES, type WriteTask } from '../../src/memory/page-writer.js';
import { chunksFor, Slab } from '../../src/memory/slab.js';
import { PagePool } from '../../src/pool/page-pool.js';

const P = 4096;

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 31 + i * 7 + (i >> 9)) & 0xff;
  return b;
}

/** A packet of `slots.length` pages (page k carries seed base+k) in staging slot `at`. */
function packet(slab: Slab, staging: SharedArrayBuffer, at: number, slots: number[], base: number): WriteTask {
  new Uint32Array(staging, at, slots.length).set(slots);
  const bytes = new Uint8Array(staging, at + SLOT_INDEX_BYTES, slots.length * P);
  for (let k = 0; k < slots.length; k++) bytes.set(pageBytes(base + k), k * P);
  return { op: 'write', staging, slotOffset: at, normalPages: slots.length, mem: chunksFor(slab, slots, slots.length) };
}

for (const rings of [true, false]) {
  describe(`PagePool (${rings ? 'task rings' : 'one piscina task per packet'})`, () => {
    let pool: PagePool;
    // A short idle stop, so the restart below is exercised (the default outlasts any checkpoint interval).
    before(() => { pool = new PagePool({ threads: 2, rings, ringIdleMs: 250 }); });
    after(() => pool.close());

    test('many packets in flight from several stagings, pages scattered over many chunks, every byte lands', async () => {
      // 16-slot chunks: a 128-page packet of every 3rd slot spans 24 chunks.
      const slab = new Slab({ chunkSlotBits: 4 });
      const all: number[] = [];
      for (let i = 0; i < 6 * 128 * 3; i++) all.push(slab.alloc());
      const stagings = [0, 1, 2].map(() => new SharedArrayBuffer(4 * SLOT_BYTES));
      const expect = new Map<number, number>();
      for (let round = 0; round < 3; round++) {
        const runs: Promise<number>[] = [];
        for (let p = 0; p < 6; p++) {
          const slots = all.filter((_, i) => i % 3 === round && Math.floor(i / 3) % 6 === p).slice(0, 128);
          const base = round * 10_000 + p * 1000;
          slots.forEach((s, k) => expect.set(s, base + k));
          runs.push(pool.write(packet(slab, stagings[p % 3]!, (p % 2) * SLOT_BYTES, slots, base)));
        }
        assert.deepEqual(await Promise.all(runs), runs.map(() => 128));
      }
      for (const [s, seed] of expect) assert.ok(Buffer.from(slab.page(s)).equals(pageBytes(seed)), `slot ${s}`);
    });

    test('a bad task rejects with the worker\'s error (the channel types it ERR_WORKER); the pool keeps working', async () => {
      const slab = new Slab({ chunkSlotBits: 4 });
      const s = [slab.alloc(), slab.alloc()];
      const staging = new SharedArrayBuffer(SLOT_BYTES);
      const bad = packet(slab, staging, 0, s, 1);
      bad.mem = { chunkSlotBits: 4, ids: [7], chunks: [slab.chunks[0]!] };
      await assert.rejects(pool.write(bad), (e: unknown) => e instanceof Error && /slot 0 is not in the task's chunks/.test(e.message));
      assert.equal(await pool.write(packet(slab, staging, 0, s, 5)), 2);
      assert.ok(Buffer.from(slab.page(s[1]!)).equals(pageBytes(6)));
    });

    test('after an idle pause the rings start again', async () => {
      const slab = new Slab({ chunkSlotBits: 4 });
      const s = [slab.alloc()];
      const staging = new SharedArrayBuffer(SLOT_BYTES);
      assert.equal(await pool.write(packet(slab, staging, 0, s, 9)), 1);
      await sleep(400);
      assert.equal(await pool.write(packet(slab, staging, 0, s, 10)), 1);
      assert.ok(Buffer.from(slab.page(s[0]!)).equals(pageBytes(10)));
    });
  });
}

test('close() waits for the writes in flight', async () => {
  const pool = new PagePool({ threads: 2 });
  const slab = new Slab();
  const slots = Array.from({ length: 256 }, () => slab.alloc());
  const staging = new SharedArrayBuffer(8 * SLOT_BYTES);
  const runs = [];
  for (let k = 0; k < 8; k++) runs.push(pool.write(packet(slab, staging, k * SLOT_BYTES, slots.slice(k * 32, k * 32 + 32), k * 100)));
  let settled = 0;
  for (const r of runs) void r.then(() => settled++);
  await pool.close();
  await Promise.resolve();
  assert.equal(settled, 8);
  for (let k = 0; k < 256; k++) assert.ok(Buffer.from(slab.page(slots[k]!)).equals(pageBytes(Math.floor(k / 32) * 100 + (k % 32))));
});
