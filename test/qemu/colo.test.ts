// A real QEMU 7.2 COLO primary (TCG, the project's shim, a small Linux guest with an upload
// workload) checkpoints into `colo-receiver listen`, plain and with multifd 4 channels
// (issue "COLO secondary"). >= 20 checkpoints each, no errors on either side, the primary
// keeps running, the per-checkpoint CSV is written; killing the primary ends COLO with the
// committed image dumped and exit 0.
import assert from 'node:assert/strict';
import { mkdtemp, readFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import { ensureGuest, haveQemu, startColoPrimary, UploadWorkload } from '../../src/harness/index.js';
import { endColoRun } from '../helpers/colo-run.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const CHECKPOINTS = Number(process.env.COLO_TEST_CHECKPOINTS ?? 22);
const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

interface Dist { n: number; mean: number; p50: number; p99: number; max: number }

async function coloRun(t: TestContext, name: string, channels: number, env: Record<string, string> = {}): Promise<void> {
  const guest = await ensureGuest();
  const dir = await mkdtemp(join(tmpdir(), `colo-${name}-`));
  const recv = ReceiverProcess.start([
    '--multifd-channels', String(channels), '--dump-ram', join(dir, 'dump'),
    '--stats-json', join(dir, 'stats.json'), '--checkpoints-csv', join(dir, 'checkpoints.csv'),
  ], env);
  cleanups.push(() => recv.kill());
  const port = await recv.port();
  // TCP_NODELAY on the primary too: stock 7.2 pays ~40 ms per checkpoint without it (NOTES).
  const primary = await startColoPrimary({ guest, runDir: dir, memMiB: 512, checkpointDelayMs: 600, nodelay: true, ...(channels ? { multifd: { channels } } : {}) });
  cleanups.push(() => primary.kill());
  await primary.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
  await primary.waitColo(120_000);
  const upload = new UploadWorkload({ port: primary.uploadPort, rateMBps: 40, fileBytes: 8 << 20, checkpointCount: () => primary.checkpointCount() }).start();
  cleanups.push(() => upload.stop());
  const uploaded = await endColoRun(primary, recv, upload, CHECKPOINTS);
  const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as { checkpoints: { count: number; transferMs: Dist; flushMs: Dist; pauseMs: Dist; mbPerCheckpoint: Dist }; committedCheckpoint: number; channels: { channel: string; packets?: number; threadPackets?: number }[] };
  if (env.COLO_READER_THREADS === '1') {
    const mf = stats.channels.filter((c) => c.channel.startsWith('multifd/'));
    assert.ok(mf.length === channels && mf.every((c) => (c.threadPackets ?? 0) > (c.packets ?? 0) / 2), `every channel's packets read whole by its reader thread: ${JSON.stringify(mf)}`);
  }
  assert.ok(stats.checkpoints.count >= CHECKPOINTS - 1, `committed ${stats.checkpoints.count} checkpoints`);
  const csv = (await readFile(join(dir, 'checkpoints.csv'), 'utf8')).trim().split('\n');
  assert.equal(csv.length - 1, stats.checkpoints.count, 'one CSV row per committed checkpoint');
  assert.equal((await stat(join(dir, 'dump', 'pc.ram.bin'))).size, 512 * 1024 * 1024);
  assert.ok((await stat(join(dir, 'dump', 'device-state.bin'))).size > 1000);
  const held = recv.lines.find((l) => typeof l.msg === 'string' && l.msg.includes('holding committed checkpoint'));
  assert.ok(held, 'the receiver says which checkpoint it holds');
  const c = stats.checkpoints;
  const fmt = (d: Dist) => `mean ${d.mean.toFixed(2)} p50 ${d.p50.toFixed(2)} p99 ${d.p99.toFixed(2)} max ${d.max.toFixed(2)} ms`;
  t.diagnostic(`${name}: ${c.count} checkpoints, ${c.mbPerCheckpoint.mean.toFixed(1)} MB/checkpoint mean (p99 ${c.mbPerCheckpoint.p99.toFixed(1)}), upload ${uploaded.length} files ${upload.rateMBps().toFixed(1)} MB/s`);
  t.diagnostic(`${name}: transfer ${fmt(c.transferMs)}`);
  t.diagnostic(`${name}: flush ${fmt(c.flushMs)}`);
  t.diagnostic(`${name}: pause ${fmt(c.pauseMs)}`);
}

describe('real QEMU 7.2 COLO primary into colo-receiver', { skip, timeout: 600_000 }, () => {
  test('plain: >= 20 checkpoints under upload load, committed image dumped at failover', (t) => coloRun(t, 'plain', 0));
  test('multifd 4 channels: >= 20 checkpoints under upload load, committed image dumped at failover', (t) => coloRun(t, 'mfd4', 4));
  // Reader threads are the default from 4 cores on (this machine has 2): forced here.
  test('multifd 4 channels read by a thread each (COLO_READER_THREADS=1): >= 20 checkpoints under upload load', (t) => coloRun(t, 'mfd4-threads', 4, { COLO_READER_THREADS: '1' }));
});
