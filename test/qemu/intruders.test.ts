// The CLI as a user runs it (`colo-receiver listen`, no --multifd-channels) receives a real
// QEMU 7.2 migration while strangers connect: silent, a partial magic, garbage. They are
// dropped and logged; the migration is byte-exact (issue: "one silent connection blocks the
// VM's protection").
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, describe, test } from 'node:test';
import { haveQemu, startPrecopySource } from '../../src/harness/index.js';
import { assertSameRam, PRECOPY_MEM } from '../helpers/qemu-precopy.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const cleanups: (() => unknown)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

function intruder(port: number, bytes: Buffer): { closed: Promise<boolean>; sock: net.Socket } {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  s.on('connect', () => { if (bytes.length) s.write(bytes); });
  cleanups.push(() => s.destroy());
  return { sock: s, closed: once(s, 'close').then(() => true) };
}

describe('real QEMU 7.2 precopy into the CLI default path with strangers connected', { skip, timeout: 300_000 }, () => {
  for (const channels of [0, 4]) {
    test(`${channels ? `multifd-${channels}` : 'plain'}, count learned: byte-exact; silent, partial and garbage connections dropped`, async () => {
      const dir = await mkdtemp(join(tmpdir(), 'colo-intruders-'));
      const a = randomBytes(2 * 1024 * 1024), b = randomBytes(3 * 1024 * 1024);
      await writeFile(join(dir, 'a.bin'), a);
      await writeFile(join(dir, 'b.bin'), b);
      const recv = ReceiverProcess.start(['--dump-ram', join(dir, 'dump'), '--stats-json', join(dir, 'stats.json'), '--io-timeout', '1500']);
      cleanups.push(() => recv.kill());
      const port = await recv.port();
      const strangers = [intruder(port, Buffer.alloc(0)), intruder(port, Buffer.from('QE', 'latin1')), intruder(port, Buffer.from('SSH-2.0-OpenSSH_9.2\r\n', 'latin1'))];
      await sleep(200);
      const src = await startPrecopySource({
        runDir: dir, memMiB: 256,
        loaderFiles: [{ path: join(dir, 'a.bin'), addr: 0x100000 }, { path: join(dir, 'b.bin'), addr: 0xc800000 }],
        ...(channels ? { multifd: { channels } } : {}),
      });
      cleanups.push(() => src.kill());
      await src.stop();
      strangers.push(intruder(port, Buffer.alloc(0)));   // one more while the source sets up
      await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000 } });
      await src.waitMigrationDone(120_000);
      const code = await recv.wait(60_000);
      assert.equal(code, 0, `receiver exit code (stderr: ${recv.stderr.slice(-1500)})`);
      const srcMem = await readFile(await src.pmemsave(0, PRECOPY_MEM, join(dir, 'source.mem')));
      await src.kill();
      assertSameRam(srcMem, await readFile(join(dir, 'dump', 'pc.ram.bin')));
      const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as { outcome: string; channels: unknown[] };
      assert.equal(stats.outcome, 'completed');
      assert.equal(stats.channels.length, 1 + channels, 'the channel count was learned');
      for (const s of strangers) assert.equal(await Promise.race([s.closed, sleep(5000).then(() => false)]), true, 'every stranger was closed by the receiver');
      const reasons = recv.lines.filter((l) => typeof l['reason'] === 'string').map((l) => l['reason']);
      assert.ok(reasons.includes('bad-magic'), JSON.stringify(reasons));
      assert.ok(reasons.filter((r) => r === 'identify-timeout').length >= 2, JSON.stringify(reasons));
    });
  }
});
