// Real QEMU 7.2 with multifd-compression (issue "Multifd compression"): precopy with zlib and
// with zstd over 4 channels into `colo-receiver listen`, pc.ram byte-exact against the stopped
// source; and a COLO primary with multifd 4 + zstd, and + zlib, for >= 20 checkpoints under
// upload load.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import { ensureGuest, haveQemu, startColoPrimary, UploadWorkload } from '../../src/harness/index.js';
import { precopyIntoReceiver, type PrecopyStats } from '../helpers/qemu-precopy.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const CHECKPOINTS = Number(process.env.COLO_TEST_CHECKPOINTS ?? 22);
const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

interface Stats extends PrecopyStats {
  checkpoints: { count: number; transferMs: { mean: number; p99: number }; mbPerCheckpoint: { mean: number } };
}

async function precopy(t: TestContext, compression: 'zlib' | 'zstd'): Promise<void> {
  // random (incompressible) and repetitive (compressible) data at two addresses
  const a = randomBytes(3 * 1024 * 1024 + 4096);
  const b = Buffer.alloc(5 * 1024 * 1024);
  for (let i = 0; i < b.length; i += 4096) b.write(`page ${i / 4096} of a compressible region `.repeat(40), i, 4096, 'latin1');
  const stats = await precopyIntoReceiver(compression, a, b, cleanups, { channels: 4, compression });
  const mf = stats.channels.slice(1);
  const wire = mf.reduce((s, c) => s + c.bytes, 0), plain = mf.reduce((s, c) => s + c.pages, 0) * 4096;
  assert.ok(wire < plain, `payloads are compressed: ${wire} bytes on the wire for ${plain} bytes of pages`);
  t.diagnostic(`${compression}: ${mf.reduce((s, c) => s + c.pages, 0)} multifd pages, ${(wire / 1e6).toFixed(1)} MB of payload for ${(plain / 1e6).toFixed(1)} MB of pages`);
}

async function colo(t: TestContext, compression: 'zlib' | 'zstd'): Promise<void> {
  const guest = await ensureGuest();
  const dir = await mkdtemp(join(tmpdir(), `colo-${compression}-`));
  const recv = ReceiverProcess.start([
    '--multifd-channels', '4', '--compression', compression, '--dump-ram', join(dir, 'dump'),
    '--stats-json', join(dir, 'stats.json'), '--checkpoints-csv', join(dir, 'checkpoints.csv'),
  ]);
  cleanups.push(() => recv.kill());
  const port = await recv.port();
  const primary = await startColoPrimary({ guest, runDir: dir, memMiB: 512, checkpointDelayMs: 600, nodelay: true, multifd: { channels: 4, compression } });
  cleanups.push(() => primary.kill());
  await primary.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
  await primary.waitColo(60_000);
  const upload = new UploadWorkload({ port: primary.uploadPort, rateMBps: 40, fileBytes: 8 << 20, checkpointCount: () => primary.checkpointCount() }).start();
  cleanups.push(() => upload.stop());
  await primary.waitCheckpoints(CHECKPOINTS, 90_000, []);
  assert.equal(recv.child.exitCode, null, `receiver still running (stderr: ${recv.stderr.slice(-1500)})`);
  assert.equal((await primary.status()).status, 'colo', 'primary still in COLO state');
  await upload.stop({ waitAcks: false });
  await primary.kill();
  const code = await recv.wait(30_000);
  assert.equal(code, 0, `receiver exit (stderr: ${recv.stderr.slice(-1500)})`);
  assert.deepEqual(recv.lines.filter((l) => Number(l.level) >= 50), [], 'no error lines from the receiver');
  assert.doesNotMatch(primary.proc.stderrTail(), /error|failed/i, 'no errors from the primary');
  const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as Stats;
  assert.ok(stats.checkpoints.count >= CHECKPOINTS - 1, `committed ${stats.checkpoints.count} checkpoints`);
  const mf = stats.channels.slice(1);
  assert.ok(mf.every((c) => c.pages > 0), 'every multifd channel carried pages');
  const wire = mf.reduce((s, c) => s + c.bytes, 0), plain = mf.reduce((s, c) => s + c.pages, 0) * 4096;
  assert.ok(wire < plain, `payloads are compressed: ${wire} bytes for ${plain} bytes of pages`);
  assert.equal((await stat(join(dir, 'dump', 'pc.ram.bin'))).size, 512 * 1024 * 1024);
  assert.ok(recv.lines.some((l) => typeof l.msg === 'string' && l.msg.includes('holding committed checkpoint')), 'the receiver says which checkpoint it holds');
  const c = stats.checkpoints;
  t.diagnostic(`${compression}: ${c.count} checkpoints, ${c.mbPerCheckpoint.mean.toFixed(1)} MB/checkpoint mean, transfer mean ${c.transferMs.mean.toFixed(1)} ms p99 ${c.transferMs.p99.toFixed(1)} ms; multifd ${(wire / 1e6).toFixed(1)} MB of payload for ${(plain / 1e6).toFixed(1)} MB of pages`);
}

describe('real QEMU 7.2 multifd compression into colo-receiver', { skip, timeout: 600_000 }, () => {
  test('precopy, multifd 4 channels, zlib: pc.ram equals the source byte for byte', { timeout: 150_000 }, (t) => precopy(t, 'zlib'));
  test('precopy, multifd 4 channels, zstd: pc.ram equals the source byte for byte', { timeout: 150_000 }, (t) => precopy(t, 'zstd'));
  test('COLO, multifd 4 channels, zstd: >= 20 checkpoints under upload load', { timeout: 180_000 }, (t) => colo(t, 'zstd'));
  test('COLO, multifd 4 channels, zlib: >= 20 checkpoints under upload load', { timeout: 180_000 }, (t) => colo(t, 'zlib'));
});
