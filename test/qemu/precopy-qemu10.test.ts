// Stock QEMU 10.0.2 (Debian bookworm-backports, unpacked by scripts/install-qemu10.sh; issue 12
// point 5) as a second real precopy peer: plain, multifd 4 and 8 channels, zlib, zstd, and
// multifd 4 with zero-page-detection multifd (10.x's default: zero pages inside packets) and
// legacy (zero pages on the main channel); every case byte-exact against the stopped source's
// pmemsave, once with `--multifd-channels` and once without (the receiver learns the count: the
// CLI's default path). Then an image received from 10.0 is sent by the receiver's restore
// stream into a fresh 10.0 `-incoming`, whose RAM must equal the source's.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test, type TestContext } from 'node:test';
import { qemuBinaryFor, qemuMissing, startPrecopyDestination, startPrecopySource } from '../../src/harness/index.js';
import { receive } from '../../src/cli/receive.js';
import { silentLogger } from '../../src/log.js';
import type { CommittedImage } from '../../src/migration/committed-image.js';
import { sendImage } from '../../src/restore/image-stream.js';
import { assertSameRam, PRECOPY_MEM, precopyIntoReceiver } from '../helpers/qemu-precopy.js';

const skip = qemuMissing('10.0');
const cleanups: (() => unknown)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

/**
 * `scale` 4 for 8 channels: QEMU's sender skips a channel still writing its previous packet, so
 * with ~17 packets over 8 channels one channel got none once (CI), and the helper checks that
 * every channel carried pages.
 */
const data = (scale = 1) => [randomBytes(scale * 3 * 1024 * 1024 + 4096), randomBytes(scale * 5 * 1024 * 1024)] as const;
/** Random and compressible data (for the compression cases). */
function mixed(): readonly [Buffer, Buffer] {
  const a = randomBytes(3 * 1024 * 1024 + 4096);
  const b = Buffer.alloc(5 * 1024 * 1024);
  for (let i = 0; i < b.length; i += 4096) b.write(`page ${i / 4096} of a compressible region `.repeat(40), i, 4096, 'latin1');
  return [a, b];
}

interface Case {
  name: string;
  multifd?: { channels: number; compression?: 'none' | 'zlib' | 'zstd' };
  zeroPageDetection?: 'multifd' | 'legacy';
}
const CASES: Case[] = [
  { name: 'plain' },
  { name: 'multifd 4 channels', multifd: { channels: 4 } },
  { name: 'multifd 8 channels', multifd: { channels: 8 } },
  { name: 'multifd 4 channels, zlib', multifd: { channels: 4, compression: 'zlib' } },
  { name: 'multifd 4 channels, zstd', multifd: { channels: 4, compression: 'zstd' } },
  { name: 'multifd 4 channels, zero-page-detection=multifd', multifd: { channels: 4 }, zeroPageDetection: 'multifd' },
  { name: 'multifd 4 channels, zero-page-detection=legacy', multifd: { channels: 4 }, zeroPageDetection: 'legacy' },
];

async function run(t: TestContext, c: Case, noChannelOption: boolean): Promise<void> {
  const t0 = Date.now();
  const [a, b] = c.multifd?.compression && c.multifd.compression !== 'none' ? mixed() : data(c.multifd?.channels === 8 ? 4 : 1);
  const stats = await precopyIntoReceiver(`q10-${c.name.replace(/[^a-z0-9]+/g, '-')}`, a, b, cleanups, c.multifd, {
    binary: qemuBinaryFor('10.0'), noChannelOption, ...(c.zeroPageDetection ? { zeroPageDetection: c.zeroPageDetection } : {}),
  });
  if (c.multifd?.compression && c.multifd.compression !== 'none') {
    const mf = stats.channels.slice(1);
    const wire = mf.reduce((s, x) => s + x.bytes, 0), plain = mf.reduce((s, x) => s + x.pages, 0) * 4096;
    assert.ok(wire < plain, `payloads are compressed: ${wire} bytes on the wire for ${plain} bytes of pages`);
  }
  t.diagnostic(`10.0.2 ${c.name}${noChannelOption ? ' (no --multifd-channels)' : ''}: ${stats.pages} pages, channels ${stats.channels.map((x) => x.pages).join('/')}, ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

describe('stock QEMU 10.0.2 precopy into colo-receiver', { skip, timeout: 1_200_000 }, () => {
  for (const c of CASES) {
    test(`${c.name}: pc.ram equals the source byte for byte`, { timeout: 150_000 }, (t) => run(t, c, false));
    test(`${c.name}, no --multifd-channels (count learned): pc.ram equals the source byte for byte`, { timeout: 150_000 }, (t) => run(t, c, true));
  }

  test('an image received from 10.0 (multifd 4) restored into a fresh 10.0 -incoming: same RAM as the source', { timeout: 180_000 }, async (t) => {
    const bin = qemuBinaryFor('10.0');
    const dir = await mkdtemp(join(tmpdir(), 'colo-q10-restore-'));
    const [a, b] = data();
    await writeFile(join(dir, 'a.bin'), a);
    await writeFile(join(dir, 'b.bin'), b);
    const dst = await startPrecopyDestination({ runDir: dir, memMiB: 256, binary: bin });
    cleanups.push(() => dst.kill());
    let delivered = 0;
    let onPort!: (p: number) => void;
    const portReady = new Promise<number>((resolve) => { onPort = resolve; });
    const received = receive({
      host: '127.0.0.1', port: 0, multifdChannels: 4, compression: 'none', colo: false, expectVmdesc: true,
      ioTimeoutMs: 10_000, heartbeatTimeoutMs: 'auto', log: silentLogger,
      onListening: (p) => onPort(p),
      onEnded: async (mig) => {
        const img: CommittedImage | null = await mig.committedImage();
        assert.ok(img, 'a committed image after the precopy');
        delivered = await sendImage(img, { kind: 'tcp', host: '127.0.0.1', port: dst.port });
      },
    });
    const port = await portReady;
    const src = await startPrecopySource({
      runDir: dir, memMiB: 256, binary: bin, multifd: { channels: 4 },
      loaderFiles: [{ path: join(dir, 'a.bin'), addr: 0x100000 }, { path: join(dir, 'b.bin'), addr: 0xc800000 }],
    });
    cleanups.push(() => src.kill());
    await src.stop();
    await src.migrate(`tcp:127.0.0.1:${port}`);
    await src.waitMigrationDone(120_000);
    const r = await received;
    assert.equal(r.outcome.kind, 'completed', JSON.stringify(r.outcome));
    const dinfo = await dst.waitMigrationDone(60_000);
    const srcMem = await readFile(await src.pmemsave(0, PRECOPY_MEM, join(dir, 'source.mem')));
    const dstMem = await readFile(await dst.pmemsave(0, PRECOPY_MEM, join(dir, 'dest.mem')));
    await src.kill();
    await dst.kill();
    assert.ok(srcMem.subarray(0x100000, 0x100000 + a.length).equals(a));
    assertSameRam(srcMem, dstMem);
    t.diagnostic(`restore stream ${(delivered / 1e6).toFixed(1)} MB accepted by 10.0.2 -incoming (status ${dinfo.status}); RAM equal to the source`);
  });
});
