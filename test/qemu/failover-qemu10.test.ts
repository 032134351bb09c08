// Failover with QEMU 10.0.2 built with COLO (scripts/build-qemu10-colo.sh; issue 13): the trials
// of failover.test.ts — a 10.0.2 COLO primary (multifd 4 channels, 600 ms checkpoints, upload
// workload) into `colo-receiver listen --on-failover resume=tcp:...`, SIGKILLed between
// checkpoints, during the RAM part, around VMSTATE_SIZE / the blob — resuming each time in a
// fresh 10.0.2 `-incoming`: heartbeat continues, no reboot, no oops, every file confirmed
// before the committed checkpoint reads back with its sha256.
// `npm run failover-trials -- --qemu 10.0 --trials N` runs the same trial N times.
import assert from 'node:assert/strict';
import { describe, test, type TestContext } from 'node:test';
import { ensureGuest, qemuBinaryFor, qemuMissing } from '../../src/harness/index.js';
import { describeTrial, runFailoverTrial, type KillMoment } from '../helpers/failover-trial.js';

const skip = qemuMissing('10.0-colo');

async function trial(t: TestContext, moment: KillMoment): Promise<void> {
  const guest = await ensureGuest();
  const r = await runFailoverTrial({ moment, guest, channels: 4, fileBytes: 3 << 20, binary: qemuBinaryFor('10.0-colo'), log: (m) => t.diagnostic(m) });
  t.diagnostic(describeTrial(r));
  assert.equal(r.receiverExit, 0, 'receiver exits 0');
  assert.equal(r.destStatus, 'running', 'destination query-status');
  assert.ok(r.hb.destFirst !== null && r.hb.destFirst > 0, `destination heartbeat continues (first HB ${r.hb.destFirst})`);
  assert.ok(r.files.eligible > 0, 'some files were confirmed before the committed checkpoint');
  assert.equal(r.files.verified, r.files.eligible, 'every file confirmed before the committed checkpoint reads back intact');
  assert.deepEqual(r.problems, [], describeTrial(r));
}

describe('QEMU 10.0.2 (built with COLO) failover: primary SIGKILLed, committed checkpoint resumed in a fresh 10.0.2', { skip, timeout: 400_000 }, () => {
  test('(a) killed at a random time between checkpoints', { timeout: 120_000 }, (t) => trial(t, 'between'));
  test('(b) killed during the RAM part of a checkpoint', { timeout: 120_000 }, (t) => trial(t, 'ram'));
  test('(c) killed around VMSTATE_SIZE / the device-state blob', { timeout: 120_000 }, (t) => trial(t, 'blob'));
});
