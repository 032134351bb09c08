// A VM with a disk under colo-receiver, real QEMU 7.2 (README "Disks"): the COLO primary's
// virtio-blk disk is a quorum over its ext4 image, with QEMU's block replication
// (replication,mode=primary over its NBD client) attached as the second child before migrate;
// the receiver serves it with `--nbd` / `--disk colo-disk0=PATH`. The guest stores uploads as
// files on the disk and syncs each before confirming it. The primary is SIGKILLed between
// checkpoints, during the RAM part and around the device-state blob; a fresh QEMU resumes from
// our RAM image with PATH as its disk: every file synced before the committed checkpoint reads
// back with its sha256 with the guest's page cache dropped (from the disk), the guest shows no
// ext4 error, and e2fsck finds PATH consistent. The NBD commands QEMU sent are reported.
import assert from 'node:assert/strict';
import { describe, test, type TestContext } from 'node:test';
import { ensureGuest, haveE2fsprogs, haveQemu } from '../../src/harness/index.js';
import { describeTrial, runFailoverTrial, type KillMoment } from '../helpers/failover-trial.js';

const haveE2fs = haveE2fsprogs();
const skip = !haveQemu() ? 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)'
  : !haveE2fs ? 'mkfs.ext4/e2fsck not installed (apt-get install e2fsprogs)' : false;

async function trial(t: TestContext, moment: KillMoment): Promise<void> {
  const guest = await ensureGuest();
  const r = await runFailoverTrial({ moment, guest, channels: 4, disk: true, log: (m) => t.diagnostic(m) });
  t.diagnostic(describeTrial(r));
  t.diagnostic(`NBD commands from QEMU: ${JSON.stringify(r.nbd?.commands)}; options: ${JSON.stringify(r.nbd?.options)}`);
  t.diagnostic(`disk commit (in the checkpoint pause) ms: ${JSON.stringify(r.nbd?.commitMs)}; PATH write + fdatasync after it, ms: ${JSON.stringify(r.nbd?.applyMs)}; bytes per checkpoint: ${JSON.stringify(r.nbd?.bytesPerCheckpoint)}`);
  assert.equal(r.receiverExit, 0, 'receiver exits 0');
  assert.equal(r.destStatus, 'running', 'destination query-status');
  assert.ok(r.nbd && (r.nbd.commands['colo-disk0']?.['WRITE'] ?? 0) > 0, 'QEMU replicated writes over NBD');
  assert.ok(r.files.eligible > 0, 'some files were synced before the committed checkpoint');
  assert.equal(r.files.verified, r.files.eligible, 'every file synced before the committed checkpoint reads back from the disk');
  assert.deepEqual(r.problems, [], describeTrial(r));
}

describe('real QEMU 7.2 COLO with a replicated disk: primary SIGKILLed, VM resumed from RAM image + PATH', { skip, timeout: 600_000 }, () => {
  test('(a) killed between checkpoints', { timeout: 180_000 }, (t) => trial(t, 'between'));
  test('(b) killed during the RAM part of a checkpoint', { timeout: 180_000 }, (t) => trial(t, 'ram'));
  test('(c) killed around VMSTATE_SIZE / the device-state blob', { timeout: 180_000 }, (t) => trial(t, 'blob'));
});
