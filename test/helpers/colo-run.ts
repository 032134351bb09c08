import assert from 'node:assert/strict';
import type { ColoPrimary, UploadWorkload } from '../../src/harness/index.js';
import type { ReceiverProcess } from './receiver-process.js';

/**
 * The end of a real-QEMU COLO run into `colo-receiver listen`: the primary reached
 * `checkpoints` and is still in COLO with the receiver alive; then the primary dies and the
 * receiver, holding its last committed checkpoint, exits 0. No error line on either side.
 */
export async function endColoRun(primary: ColoPrimary, recv: ReceiverProcess, upload: UploadWorkload, checkpoints: number): Promise<Awaited<ReturnType<UploadWorkload['stop']>>> {
  await primary.waitCheckpoints(checkpoints, 180_000, []);
  assert.equal(recv.child.exitCode, null, `receiver still running (stderr: ${recv.stderr.slice(-1500)})`);
  assert.equal((await primary.status()).status, 'colo', 'primary still in COLO state');
  const uploaded = await upload.stop({ waitAcks: false });
  await primary.kill();
  const code = await recv.wait(30_000);
  assert.equal(code, 0, `receiver exit (stderr: ${recv.stderr.slice(-1500)})`);
  assert.deepEqual(recv.lines.filter((l) => Number(l.level) >= 50), [], 'no error lines from the receiver');
  assert.doesNotMatch(primary.proc.stderrTail(), /error|failed/i, 'no errors from the primary');
  return uploaded;
}
