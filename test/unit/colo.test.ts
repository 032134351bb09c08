// The COLO secondary's checkpoint state machine (colo.ts) on its own, against a fake host:
// the message order on the main channel, the replies, the commit, the 'auto' heartbeat.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { RAMBlockList } from '../../src/memory/ram-block.js';
import { CheckpointStats } from '../../src/migration/checkpoint-stats.js';
import { ColoIncoming, HEARTBEAT_AUTO_FIRST_MS, slotsToMapAhead, mapAheadFloor, DirtyHistory, type ColoHost, type ColoPhase } from '../../src/migration/colo.js';
import { DEFAULT_LIMITS } from '../../src/migration/limits.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import {
  COLO_MESSAGE_CHECKPOINT_READY, COLO_MESSAGE_CHECKPOINT_REPLY, COLO_MESSAGE_CHECKPOINT_REQUEST,
  COLO_MESSAGE_VMSTATE_LOADED, COLO_MESSAGE_VMSTATE_RECEIVED, COLO_MESSAGE_VMSTATE_SEND, COLO_MESSAGE_VMSTATE_SIZE, QEMU_VM_EOF,
} from '../../src/wire/constants.js';
import { be32 } from '../../src/wire/reader.js';

function fakeHost(heartbeatTimeoutMs: number | 'auto' = 0) {
  const sent: number[] = [], failed: MigrationError[] = [], events: unknown[] = [];
  let phase: ColoPhase | 'savevm' = 'savevm', committed = 0, image: Buffer | null = null;
  const host: ColoHost = {
    log: silentLogger, limits: DEFAULT_LIMITS, blocks: new RAMBlockList(), stats: new CheckpointStats(),
    mainQ: new ByteQueue(), heartbeatTimeoutMs,
    ended: () => failed.length > 0,
    setPhase: (p) => { phase = p; },
    send: (b) => { sent.push(b.readUInt32BE(0)); },
    pauseMain: () => {}, resumeMain: () => {}, pump: () => {}, beginRecords: () => {}, checkAtRest: () => {},
    committed: () => committed,
    commitImage: (i, blob) => { committed = i; image = blob; },
    commitParticipants: async () => {},
    counters: () => ({ main: { pages: 0, zeroPages: 0, bytes: 0 }, channels: [] }),
    fail: (e) => { failed.push(e); },
    emitCheckpoint: (ev) => { events.push(ev); },
  };
  return { host, sent, failed, events, phase: () => phase, image: () => image };
}

/** Steps like the main channel's pump: until bytes are needed or the commit runs. */
function run(c: ColoIncoming, f: ReturnType<typeof fakeHost>): 'data' | 'wait' {
  for (;;) {
    const p = f.phase();
    if (p === 'savevm') { c.ramDone(); continue; }   // the RAM part, parsed elsewhere
    if (p !== 'colo-idle' && p !== 'colo-send' && p !== 'colo-size' && p !== 'colo-blob') return 'wait';
    const r = c.step(p);
    if (r !== 'next') return r;
  }
}

describe('ColoIncoming', () => {
  test('runs a checkpoint: REQUEST, VMSTATE_SEND, VMSTATE_SIZE + blob, then commits and sends LOADED', async () => {
    const f = fakeHost();
    const c = new ColoIncoming(f.host);
    c.enter();
    assert.deepEqual(f.sent, [COLO_MESSAGE_CHECKPOINT_READY]);
    assert.equal(f.phase(), 'colo-idle');
    const blob = Buffer.from([1, 2, 3, QEMU_VM_EOF]);
    const size = Buffer.alloc(8); size.writeUInt32BE(blob.length, 4);
    f.host.mainQ.push(Buffer.concat([be32(COLO_MESSAGE_CHECKPOINT_REQUEST), be32(COLO_MESSAGE_VMSTATE_SEND), be32(COLO_MESSAGE_VMSTATE_SIZE), size]));
    assert.equal(run(c, f), 'data');
    f.host.mainQ.push(blob);
    assert.equal(run(c, f), 'wait');
    assert.equal(f.phase(), 'colo-check');
    assert.deepEqual(f.sent, [COLO_MESSAGE_CHECKPOINT_READY, COLO_MESSAGE_CHECKPOINT_REPLY, COLO_MESSAGE_VMSTATE_RECEIVED]);
    await c.commitInFlight;
    assert.equal(c.commitInFlight, null);
    assert.deepEqual(f.sent.at(-1), COLO_MESSAGE_VMSTATE_LOADED);
    assert.equal(f.phase(), 'colo-idle');
    assert.deepEqual(f.image(), Buffer.from([1, 2, 3]));
    assert.equal(f.host.stats.count, 1);
    assert.deepEqual(f.events.map((e) => (e as { index: number }).index), [0, 1]);
    assert.deepEqual(f.failed, []);
  });

  test('rejects VMSTATE_SEND where CHECKPOINT_REQUEST is expected with ERR_COLO_PROTOCOL', () => {
    const f = fakeHost();
    const c = new ColoIncoming(f.host);
    c.enter();
    f.host.mainQ.push(be32(COLO_MESSAGE_VMSTATE_SEND));
    assert.throws(() => run(c, f), (e: unknown) => e instanceof MigrationError && e.code === 'ERR_COLO_PROTOCOL');
  });

  test('rejects a blob that does not end with QEMU_VM_EOF with ERR_COLO_PROTOCOL', () => {
    const f = fakeHost();
    const c = new ColoIncoming(f.host);
    c.enter();
    const size = Buffer.alloc(8); size.writeUInt32BE(2, 4);
    f.host.mainQ.push(Buffer.concat([be32(COLO_MESSAGE_CHECKPOINT_REQUEST), be32(COLO_MESSAGE_VMSTATE_SEND), be32(COLO_MESSAGE_VMSTATE_SIZE), size, Buffer.from([7, 7])]));
    assert.throws(() => run(c, f), (e: unknown) => e instanceof MigrationError && e.code === 'ERR_COLO_PROTOCOL');
  });

  test("the 'auto' heartbeat waits HEARTBEAT_AUTO_FIRST_MS until two idle gaps are known; a number is used as given", () => {
    const f = fakeHost('auto');
    const c = new ColoIncoming(f.host);
    assert.equal(c.heartbeatMs, HEARTBEAT_AUTO_FIRST_MS);
    c.enter();
    c.stop();
    assert.equal(new ColoIncoming(fakeHost(1234).host).heartbeatMs, 1234);
    assert.equal(new ColoIncoming(fakeHost(0).host).heartbeatMs, 0);
  });
});

describe('slots mapped ahead of the next checkpoint', () => {
  test('steady load: 1.25 x the largest recent checkpoint', () => {
    assert.equal(slotsToMapAhead([]), 0);
    assert.equal(slotsToMapAhead([11_000, 10_500, 11_200, 10_900]), Math.ceil(1.25 * 11_200));
    assert.equal(slotsToMapAhead([200, 260, 210]), Math.ceil(1.25 * 260));
  });
  test('a clear step up (load ramping up) maps for one more step of the same size', () => {
    // Real QEMU 7.2 upload run: ~260 pages idle, then 5,895, then 11,491.
    const r = slotsToMapAhead([260, 250, 5_895]);
    assert.equal(r, Math.ceil(1.25 * (2 * 5_895 - 260)));
    assert.ok(r >= 11_491, 'the second step of the ramp finds its slots mapped');
    // The step after a new high that did not grow again: back to the largest.
    assert.equal(slotsToMapAhead([260, 5_895, 11_491, 11_000]), Math.ceil(1.25 * 11_491));
    // A new high below three times the recent ones is noise, not a step.
    assert.equal(slotsToMapAhead([10_000, 9_000, 12_000]), Math.ceil(1.25 * 12_000));
    assert.equal(slotsToMapAhead([10_000, 9_000, 29_000]), Math.ceil(1.25 * 29_000));
    assert.equal(slotsToMapAhead([10_000, 9_000, 30_000]), Math.ceil(1.25 * 50_000));
    // The first checkpoint alone is no step.
    assert.equal(slotsToMapAhead([5_000]), Math.ceil(1.25 * 5_000));
  });
});

describe('slots kept mapped however quiet the guest is', () => {
  test('an eighth of the guest, at most one slab chunk', () => {
    assert.equal(mapAheadFloor(131_072, 8192), 8192);     // 512 MiB guest, 32 MiB chunks
    assert.equal(mapAheadFloor(16_384, 8192), 2048);      // 64 MiB guest
    assert.equal(mapAheadFloor(4_194_304, 8192), 8192);   // 16 GiB guest: still one chunk
    assert.equal(mapAheadFloor(0, 8192), 0);
  });
});

describe('dirty history: what the slab maps ahead and keeps', () => {
  test('mapAhead follows the recent checkpoints; keepFree remembers the peak of the long window', () => {
    const h = new DirtyHistory();
    assert.equal(h.mapAhead(), 0);
    assert.equal(h.keepFree(8192), 8192);
    for (let i = 0; i < 20; i++) h.note(40_000);        // a loaded phase, 40,000 pages each
    assert.equal(h.mapAhead(), 50_000);
    assert.equal(h.keepFree(8192), 80_000);             // twice the largest recent one
    for (let i = 0; i < 100; i++) h.note(250);          // idle, 100 checkpoints
    assert.equal(h.mapAhead(), Math.ceil(1.25 * 250));
    assert.deepEqual(h.last(3), [250, 250, 250]);
    // The loaded phase is out of the recent window, not out of the kept one.
    assert.equal(h.keepFree(8192), 50_000);
    for (let i = 0; i < DirtyHistory.KEEP; i++) h.note(250);
    assert.equal(h.keepFree(8192), 8192);               // long gone: one chunk
    assert.equal(h.last(DirtyHistory.KEEP + 10).length, DirtyHistory.KEEP);
  });

  test('a step up keeps its expected second step mapped while it is recent', () => {
    // A real QEMU 7.2 upload run (bench:colo s8-rusage1): idle, the first step, a pause, the second step.
    const h = new DirtyHistory();
    for (const p of [249, 200, 221, 184, 251]) h.note(p);
    h.note(5_925);
    const step = Math.ceil(1.25 * (2 * 5_925 - 251));
    assert.equal(h.mapAhead(), step);
    for (const p of [6_502, 6_496, 210, 212, 5_698]) {
      h.note(p);
      assert.equal(h.mapAhead(), step, `after ${p} pages the second step is still expected`);
    }
    assert.ok(h.mapAhead() >= 11_351, 'the second step (11,351 pages) finds its slots mapped');
    h.note(11_351);
    // 16 checkpoints after the step it is forgotten: back to 1.25 x the largest recent one.
    for (let i = 0; i < DirtyHistory.RECENT; i++) h.note(6_500);
    assert.equal(h.mapAhead(), Math.ceil(1.25 * 6_500));
    // Noise (below 3x the recent ones) never holds anything.
    const n = new DirtyHistory();
    for (const p of [6_000, 5_000, 7_000, 17_000, 6_000]) n.note(p);
    assert.equal(n.mapAhead(), Math.ceil(1.25 * 17_000));
  });
});
