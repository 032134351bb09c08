// COLO with the synthetic primary: after every checkpoint (VMSTATE_LOADED received by the
// primary) the receiver's committed image equals the primary's memory and device blob.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { SyntheticSource } from '../../src/sender/source.js';
import { coloRoundTrip, startReceiver } from '../helpers/synthetic.js';
import { compareImage } from '../../src/verify/compare.js';
import { mapAheadFloor } from '../../src/migration/colo.js';

const cases = [
  { layout: '7.2', channels: 0, workload: 'load' }, { layout: '7.2', channels: 4, workload: 'load' },
  { layout: '10.x', channels: 4, workload: 'load' }, { layout: '10.x', channels: 0, workload: 'idle' },
] as const;

describe('COLO checkpoints from the synthetic primary', () => {
  for (const c of cases) {
    test(`${c.layout}, ${c.channels} channel(s), ${c.workload}: every committed checkpoint equals the primary`, async () => {
      await coloRoundTrip({ multifdChannels: c.channels }, { layout: c.layout, channels: c.channels, checkpoints: 8, workload: c.workload, seed: 11, memory: { ramMiB: 64 } });
    });
  }
  // The CLI's default: no channel count given, learned at the first barrier.
  for (const c of [{ layout: '7.2', channels: 0 }, { layout: '10.x', channels: 2 }] as const) {
    test(`${c.layout}, ${c.channels} channel(s) learned: every committed checkpoint equals the primary`, async () => {
      const mig = await coloRoundTrip({}, { layout: c.layout, channels: c.channels, checkpoints: 4, workload: 'load', seed: 13, memory: { ramMiB: 32 } });
      assert.equal(mig.channels.length, c.channels);
    });
  }
});

describe('slots kept mapped while the guest is idle', () => {
  test('an idle COLO session keeps mapAheadFloor() free slots mapped for the first loaded checkpoint', async () => {
    const r = await startReceiver({ multifdChannels: 4, heartbeatTimeoutMs: 0 });
    try {
      const src = new SyntheticSource({ colo: true, port: r.port, layout: '7.2', channels: 4, checkpoints: 4, workload: 'idle', seed: 17, memory: { ramMiB: 64 }, intervalMs: 200 });
      await src.run();
      src.close();
      await new Promise((res) => setTimeout(res, 200));
      const slab = r.mig.blocks.slab;
      const floor = mapAheadFloor(64 * 256, slab.chunkSlots);
      assert.equal(floor, 2048, 'an eighth of a 64 MiB guest');
      assert.ok(slab.mappedFreeSlots >= floor, `${slab.mappedFreeSlots} free slots mapped, want ${floor}`);
    } finally {
      await r.close();
    }
  });
});

describe('heartbeat timeout: auto', () => {
  test('30 s until two idle gaps are known, then 3x the longest recent gap, at least 1 s', async () => {
    const r = await startReceiver({ multifdChannels: 0, heartbeatTimeoutMs: 'auto' });
    try {
      const seen: number[] = [];
      const src = new SyntheticSource({
        colo: true, port: r.port, layout: '7.2', channels: 0, checkpoints: 5, workload: 'idle', seed: 3, memory: { ramMiB: 16 },
        intervalMs: 450,
        onCheckpoint: () => { seen.push(r.mig.heartbeatMs); },
      });
      assert.equal(r.mig.heartbeatMs, 30_000);
      await src.run();
      src.close();
      // after checkpoint 1 one gap is known (still 30 s); from checkpoint 2 on, ~3 x 450 ms
      assert.equal(seen[0], 30_000, JSON.stringify(seen));
      for (const ms of seen.slice(1)) assert.ok(ms >= 3 * 450 && ms < 3 * 450 + 1500, JSON.stringify(seen));
    } finally {
      await r.close();
    }
  });
});

describe('--max-memory: a checkpoint that needs more page memory than the cap', () => {
  test('fails with ERR_LIMIT and the committed checkpoint stays the one before it, byte for byte', async () => {
    // 64 MiB guest: 32 MiB slab chunks; the initial image (~60 % non-zero) fits in two, a
    // checkpoint of 12,000 pages needs a third.
    const r = await startReceiver({ multifdChannels: 4, maxMemoryBytes: 64 * 2 ** 20, heartbeatTimeoutMs: 0 });
    try {
      let atInitial: Map<string, Uint8Array> | null = null;
      const src = new SyntheticSource({ colo: true, port: r.port, layout: '7.2', channels: 4, checkpoints: 3, workload: { pages: 12_000 }, seed: 5, memory: { ramMiB: 64 } });
      src.once('precopy', () => { atInitial = new Map(src.model.blocks.map((b) => [b.idstr, Buffer.from(b.host) as Uint8Array])); });
      await src.run().catch(() => undefined);
      src.close();
      const outcome = await r.mig.done;
      assert.equal(outcome.kind, 'failed', JSON.stringify(outcome));
      assert.equal(outcome.kind === 'failed' ? outcome.error.code : '', 'ERR_LIMIT');
      const img = await r.mig.committedImage();
      assert.ok(img && atInitial);
      assert.equal(img.checkpoint, 0);
      assert.equal(compareImage(img, atInitial), null);
      const mem = r.mig.memoryStats();
      assert.ok(mem.slabBytes! <= 64 * 2 ** 20, `slab ${mem.slabBytes} within the cap`);
    } finally {
      await r.close();
    }
  });
});
