// The multifd barrier (multifd-sync.ts) against fake channels: when it closes, what it
// releases, and that the fast path (every channel already parked) behaves as the slow one.
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { MigrationError } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import type { MultiFDChannel } from '../../src/migration/multifd-channel.js';
import { MultifdSync, type SyncHost } from '../../src/migration/multifd-sync.js';

/** What the barrier reads of a channel, settable by the test. */
class FakeChannel {
  synced = false;
  atSync = false;
  exhausted = false;
  syncNum = -1;
  packets = 0;
  pagesSinceRelease = 0;
  released = 0;
  readonly q = { consumed: 0 };
  constructor(readonly name: string) {}
  park(num: number): void { this.synced = true; this.atSync = true; this.syncNum = num; }
  release(): void { if (!this.atSync) return; this.released++; this.synced = false; this.atSync = false; }
}

function setup(n: number, ioTimeoutMs = 0) {
  const channels = Array.from({ length: n }, (_, i) => new FakeChannel(`multifd/${i}`));
  const failed: MigrationError[] = [];
  let rounds = 0;
  const host: SyncHost = {
    channels: channels as unknown as MultiFDChannel[],
    log: silentLogger,
    ioTimeoutMs,
    ended: () => failed.length > 0,
    ramOpen: () => true,
    phaseName: () => 'colo-send',
    mainAt: () => 0,
    fail: (e) => { failed.push(e); },
    roundClosed: () => { rounds++; },
  };
  const sync = new MultifdSync(host, n);
  return { sync, channels, failed, rounds: () => rounds };
}

describe('multifd barrier', () => {
  test('every channel already at its SYNC: closes at once, without a promise, and releases each channel once', () => {
    const { sync, channels, failed, rounds } = setup(4);
    channels.forEach((c, i) => c.park(10 + i));
    assert.equal(sync.run(), undefined);
    assert.equal(sync.waiting, false);
    assert.deepEqual(channels.map((c) => c.released), [1, 1, 1, 1]);
    assert.equal(rounds(), 1);
    assert.equal(failed.length, 0);
    assert.equal(sync.barriers, 1);
  });

  test('a channel still short of its SYNC: the barrier waits, and closes when the last one parks', async () => {
    const { sync, channels, rounds } = setup(3);
    channels[0]!.park(5);
    channels[1]!.park(6);
    const p = sync.run();
    assert.ok(p instanceof Promise);
    assert.equal(sync.waiting, true);
    assert.deepEqual(channels.map((c) => c.released), [0, 0, 0]);
    assert.equal(rounds(), 0);
    channels[2]!.park(7);
    sync.check();
    await p;
    assert.deepEqual(channels.map((c) => c.released), [1, 1, 1]);
    assert.equal(rounds(), 1);
  });

  test('a SYNC from another round is refused on the waiting path, not closed by the fast path', () => {
    const { sync, channels, failed, rounds } = setup(2);
    // Round floor is -1; with 2 channels a round spans at most 3 packets past the first SYNC.
    channels[0]!.park(1);
    channels[1]!.park(2);
    assert.equal(sync.run(), undefined);
    channels[0]!.park(50);
    channels[1]!.park(51);
    // A packet numbered far beyond the first SYNC of the round: checkRound raised the round's maximum.
    sync.checkRound(channels[0] as unknown as MultiFDChannel, { flags: 0, normalPages: 1, zeroPages: 0, packetNum: 60 } as never, 0);
    const p = sync.run();
    assert.ok(p instanceof Promise, 'an inconsistent round must not close');
    p.catch(() => {});
    assert.equal(failed.length, 1);
    assert.equal(failed[0]!.code, 'ERR_SYNC');
    assert.equal(rounds(), 1);
  });

  test('a channel that closed before its SYNC fails the barrier, as before', () => {
    const { sync, channels, failed } = setup(2);
    channels[0]!.park(1);
    channels[1]!.exhausted = true;
    const p = sync.run();
    assert.ok(p instanceof Promise);
    p.catch(() => {});
    assert.equal(failed.length, 1);
    assert.match(failed[0]!.message, /closed before its SYNC/);
  });
});
