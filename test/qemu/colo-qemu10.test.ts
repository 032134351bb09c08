// COLO with QEMU 10.0.2 built by scripts/build-qemu10-colo.sh (native/qemu-10.0.2-colo.patch;
// issue 13): a 10.0.2 primary (TCG, the project's shim, the test guest with an upload workload)
// checkpoints into `colo-receiver listen`, plain, multifd 4 channels and multifd 4 + zstd: >= 20
// checkpoints each, the primary still in COLO, no error lines on either side. Zero pages reach
// the image: 10.x sends them inside multifd packets (zero-page-detection=multifd) or as ZERO
// records on the main channel (plain). Between checkpoints the guest fills a tmpfs file of 1024
// pages with pattern A, then overwrites all of it with zeros in place, then the first half with
// pattern B; in the committed image dumped at failover no page may still hold pattern A, and at
// least 512 pages hold pattern B. (The guest boots with init_on_free=1, so freed copies of the
// patterns are zero too.)
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import {
  ensureGuest, guestShell, qemuBinaryFor, qemuMissing, startColoPrimary, UploadWorkload, type ColoPrimary,
} from '../../src/harness/index.js';
import { endColoRun } from '../helpers/colo-run.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const skip = qemuMissing('10.0-colo');
const CHECKPOINTS = Number(process.env.COLO_TEST_CHECKPOINTS ?? 22);
const MEM_MIB = 512;
const cleanups: (() => Promise<unknown> | void)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

interface Dist { n: number; mean: number; p50: number; p99: number; max: number }

/** A 16-byte line (`yes` output) that tiles a 4 KiB page exactly. */
function pattern(tag: string): string {
  return `ZP${tag}-${randomBytes(6).toString('hex').slice(0, 11)}`; // 2 + 1 + 1 + 11 = 15 (+ '\n')
}

/** Pages of `mem` made only of `line + '\n'` repeated. */
function countPages(mem: Buffer, line: string): number {
  const page = Buffer.from((line + '\n').repeat(4096 / 16), 'latin1');
  assert.equal(page.length, 4096);
  const head = page.subarray(0, 16);
  let n = 0;
  for (let off = 0; off + 4096 <= mem.length; off += 4096) {
    if (mem.compare(head, 0, 16, off, off + 16) === 0 && mem.compare(page, 0, 4096, off, off + 4096) === 0) n++;
  }
  return n;
}

async function waitMore(primary: ColoPrimary, k: number): Promise<void> {
  await primary.waitCheckpoints(primary.checkpointCount() + k, 60_000, []);
}

/** The guest writes `line` into pages [from, from+count) of /run/zp.bin (in place). */
function fill(line: string, from: number, count: number): string {
  // the pattern is split so that the command text itself never holds it
  return `a=${line.slice(0, 3)}; b=${line.slice(3)}; yes "$a$b" | head -c ${count * 4096} | dd of=/run/zp.bin bs=4096 seek=${from} conv=notrunc 2>/dev/null; echo done`;
}

async function coloRun(t: TestContext, name: string, channels: number, compression: 'none' | 'zstd' = 'none'): Promise<void> {
  const t0 = Date.now();
  const guest = await ensureGuest();
  const dir = await mkdtemp(join(tmpdir(), `colo-q10-${name}-`));
  const recv = ReceiverProcess.start([
    '--multifd-channels', String(channels), '--compression', compression, '--dump-ram', join(dir, 'dump'),
    '--stats-json', join(dir, 'stats.json'), '--checkpoints-csv', join(dir, 'checkpoints.csv'),
  ]);
  cleanups.push(() => recv.kill());
  const port = await recv.port();
  const primary = await startColoPrimary({
    guest, runDir: dir, memMiB: MEM_MIB, checkpointDelayMs: 600, nodelay: true, binary: qemuBinaryFor('10.0-colo'),
    ...(channels ? { multifd: { channels, compression } } : {}),
  });
  cleanups.push(() => primary.kill());
  await primary.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
  await primary.waitColo(120_000);
  const upload = new UploadWorkload({ port: primary.uploadPort, rateMBps: 40, fileBytes: 8 << 20, checkpointCount: () => primary.checkpointCount() }).start();
  cleanups.push(() => upload.stop());

  // zero pages: A over 1024 pages, zeros over all of them, B over the first 512
  await primary.waitCheckpoints(3, 60_000, []);
  const A = pattern('A'), B = pattern('B');
  const sh = (cmd: string) => guestShell(primary.shellPort, cmd, { timeoutMs: 60_000 });
  assert.match(await sh(fill(A, 0, 1024)), /done/);
  await waitMore(primary, 3);
  assert.match(await sh('dd if=/dev/zero of=/run/zp.bin bs=4096 count=1024 conv=notrunc 2>/dev/null; echo done'), /done/);
  await waitMore(primary, 3);
  assert.match(await sh(fill(B, 0, 512)), /done/);
  await waitMore(primary, 3);
  assert.match(await sh('ls -l /run/zp.bin'), /4194304/);

  const uploaded = await endColoRun(primary, recv, upload, CHECKPOINTS);
  const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as {
    checkpoints: { count: number; transferMs: Dist; flushMs: Dist; mbPerCheckpoint: Dist }; channels: { pages: number; bytes: number }[];
  };
  assert.ok(stats.checkpoints.count >= CHECKPOINTS - 1, `committed ${stats.checkpoints.count} checkpoints`);
  if (channels) assert.ok(stats.channels.slice(1).every((c) => c.pages > 0), 'every multifd channel carried pages');
  if (compression !== 'none') {
    const mf = stats.channels.slice(1);
    const wire = mf.reduce((s, c) => s + c.bytes, 0), plain = mf.reduce((s, c) => s + c.pages, 0) * 4096;
    assert.ok(wire < plain, `payloads are compressed: ${wire} bytes for ${plain} bytes of pages`);
  }
  const mem = await readFile(join(dir, 'dump', 'pc.ram.bin'));
  assert.equal(mem.length, MEM_MIB * 1024 * 1024);
  const pagesA = countPages(mem, A), pagesB = countPages(mem, B);
  t.diagnostic(`${name}: zero-page check: pattern A in ${pagesA} pages (want 0), pattern B in ${pagesB} pages (want >= 512)`);
  assert.equal(pagesA, 0, 'pages zeroed by the guest are zero in the committed image');
  assert.ok(pagesB >= 512, `pattern B in ${pagesB} pages`);
  const c = stats.checkpoints;
  const fmt = (d: Dist) => `mean ${d.mean.toFixed(2)} p99 ${d.p99.toFixed(2)} ms`;
  t.diagnostic(`${name}: ${c.count} checkpoints, ${c.mbPerCheckpoint.mean.toFixed(1)} MB/checkpoint mean, transfer ${fmt(c.transferMs)}, flush ${fmt(c.flushMs)}; upload ${uploaded.length} files; ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

describe('QEMU 10.0.2 (built with COLO) primary into colo-receiver', { skip, timeout: 900_000 }, () => {
  test('plain: >= 20 checkpoints under upload load, zero pages land in the image', { timeout: 240_000 }, (t) => coloRun(t, 'plain', 0));
  test('multifd 4 channels: >= 20 checkpoints under upload load, zero pages from packets land in the image', { timeout: 240_000 }, (t) => coloRun(t, 'mfd4', 4));
  test('multifd 4 channels + zstd: >= 20 checkpoints under upload load, zero pages from packets land in the image', { timeout: 240_000 }, (t) => coloRun(t, 'mfd4-zstd', 4, 'zstd'));
});
