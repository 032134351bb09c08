// Failover with real QEMU 7.2: a COLO primary (multifd 4 channels, 600 ms checkpoints, upload
// workload) checkpoints into `colo-receiver listen --on-failover resume=tcp:...`; the primary is
// SIGKILLed (a) between checkpoints, (b) during the RAM part of a checkpoint, (c) around
// VMSTATE_SIZE / the device-state blob. Each time the receiver must exit 0 after migrating the
// committed checkpoint into a waiting `qemu-system-x86_64 -incoming`, which then runs the
// guest on: heartbeat continues from the checkpoint, no reboot, no oops, and every file the
// guest confirmed before the committed checkpoint (one checkpoint of margin) reads back with
// its sha256. Each trial is a fresh primary + receiver + destination.
// `node scripts/failover-trials.mjs --trials N` runs the same trial N times.
import assert from 'node:assert/strict';
import { describe, test, type TestContext } from 'node:test';
import { ensureGuest, haveQemu } from '../../src/harness/index.js';
import { describeTrial, runFailoverTrial, type KillMoment } from '../helpers/failover-trial.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';

async function trial(t: TestContext, moment: KillMoment, receiverEnv: Record<string, string> = {}): Promise<void> {
  const guest = await ensureGuest();
  const r = await runFailoverTrial({ moment, guest, channels: 4, fileBytes: 3 << 20, log: (m) => t.diagnostic(m), receiverEnv });
  if (receiverEnv.COLO_READER_THREADS === '1') {
    t.diagnostic(`multifd packets read whole by reader threads: ${r.threadPackets}`);
    assert.ok((r.threadPackets ?? 0) > 0, 'the reader threads carried the checkpoints');
  }
  t.diagnostic(`kill moment: ${r.trigger}; primary was ${r.primaryPhase}`);
  t.diagnostic(`receiver: "${r.receiverSaid}" -> committed checkpoint ${r.committed}${r.discarded !== null ? `, checkpoint ${r.discarded} discarded` : ', nothing discarded'}`);
  t.diagnostic(`files verified in the resumed guest: ${r.files.verified}/${r.files.eligible} (confirmed ${r.files.confirmed} of ${r.files.uploaded}; confirmed later, present anyway: ${r.files.laterPresent}/${r.files.laterChecked})`);
  t.diagnostic(`heartbeat: primary last HB ${r.hb.primaryLast}, destination HB ${r.hb.destFirst}..${r.hb.destLast} (${r.hb.destLines} lines)`);
  t.diagnostic(`failover: delivered ${r.deliveredMs?.toFixed(0)} ms (receiver), SIGKILL -> running ${r.failoverToRunningMs?.toFixed(0)} ms, ${((r.failoverBytes ?? 0) / 1e6).toFixed(0)} MB; trial ${(r.totalMs / 1000).toFixed(1)} s${r.intact ? '' : `, run dir kept: ${r.dir}`}`);

  for (const a of r.anomalies) t.diagnostic(`RECEIVER ANOMALY (does not affect the resumed guest): ${a}`);

  assert.equal(r.receiverExit, 0, 'receiver exits 0');
  assert.equal(r.destStatus, 'running', 'destination query-status');
  assert.ok(r.hb.destFirst !== null && r.hb.destFirst > 0, `destination heartbeat continues (first HB ${r.hb.destFirst})`);
  assert.ok(r.hb.primaryLast !== null && r.hb.destFirst <= r.hb.primaryLast + 1, `first destination HB ${r.hb.destFirst} <= primary's last ${r.hb.primaryLast} + 1`);
  assert.ok(r.files.eligible > 0, 'some files were confirmed before the committed checkpoint');
  assert.equal(r.files.verified, r.files.eligible, 'every file confirmed before the committed checkpoint reads back intact');
  assert.deepEqual(r.problems, [], describeTrial(r));
}

describe('real QEMU 7.2 COLO failover: primary SIGKILLed, committed checkpoint resumed in a fresh QEMU', { skip, timeout: 300_000 }, () => {
  test('(a) killed at a random time between checkpoints', { timeout: 120_000 }, (t) => trial(t, 'between'));
  test('(b) killed during the RAM part of a checkpoint', { timeout: 120_000 }, (t) => trial(t, 'ram'));
  test('(c) killed around VMSTATE_SIZE / the device-state blob', { timeout: 120_000 }, (t) => trial(t, 'blob'));
  // Reader threads are the default from 4 cores on (this machine has 2): forced, so that the
  // checkpoint in flight when the primary dies is on the reader threads.
  test('(d) killed during the RAM part, multifd read by a thread per connection (COLO_READER_THREADS=1)', { timeout: 120_000 }, (t) => trial(t, 'ram', { COLO_READER_THREADS: '1' }));
});
