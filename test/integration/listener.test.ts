// Connections that never identify themselves (silence, a partial header, garbage) cost only
// themselves: dropped and logged within the identify timeout, never taken for the main
// channel, and a real migration succeeds while they come and go.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import { Writable } from 'node:stream';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, test } from 'node:test';
import pino from 'pino';
import { IncomingMigration } from '../../src/migration/incoming.js';
import { listenForMigration } from '../../src/net/listener.js';
import { migrateAndVerify } from '../helpers/synthetic.js';

function capturingLogger(): { log: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const dest = new Writable({ write(chunk, _e, cb) { for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l)); cb(); } });
  return { log: pino({ level: 'info' }, dest), lines };
}

/** Opens a connection, writes `bytes`, and resolves when the receiver closes it (or after `ms`). */
async function intruder(port: number, bytes: Buffer, ms: number): Promise<{ closedAfterMs: number | null }> {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  await once(s, 'connect');
  if (bytes.length) s.write(bytes);
  const t0 = performance.now();
  const closed = await Promise.race([once(s, 'close').then(() => true), sleep(ms).then(() => false)]);
  s.destroy();
  return { closedAfterMs: closed ? performance.now() - t0 : null };
}

describe('listener: unidentified connections', () => {
  test('silent, partial-magic, partial-header and garbage connections are dropped; the real migration succeeds meanwhile', async () => {
    const { log, lines } = capturingLogger();
    const mig = new IncomingMigration({ threads: 2, log, multifdChannels: 2 });
    const server = await listenForMigration(mig, { port: 0, log, identifyTimeoutMs: 400 });
    const port = (server.address() as net.AddressInfo).port;
    try {
      // Before the migration: these would have held the listener (or failed the migration) forever.
      const early = [
        intruder(port, Buffer.alloc(0), 3000),                         // silent
        intruder(port, Buffer.from('QE', 'latin1'), 3000),             // part of the file magic
        intruder(port, Buffer.from('QEVM\0\0', 'latin1'), 3000),       // magic, half a version
        intruder(port, Buffer.from([0x11, 0x22, 0x33, 0x44, 0, 0]), 3000), // multifd magic, part of MultiFDInit
        intruder(port, Buffer.from('GET / HTTP/1.1\r\n\r\n', 'latin1'), 3000), // garbage
      ];
      await sleep(50);
      // ... and more while it runs.
      const during = [intruder(port, Buffer.alloc(0), 3000), intruder(port, Buffer.from('QEVM\0\0\0\x02', 'latin1'), 3000)];
      await migrateAndVerify(mig, port, { layout: '7.2', channels: 2, iterations: 2, seed: 5, memory: { ramMiB: 16 } });
      const results = await Promise.all([...early, ...during]);
      for (const [i, r] of results.entries()) assert.ok(r.closedAfterMs !== null, `intruder ${i} was closed by the receiver`);
      // silence and partial headers wait for the timeout; garbage and a wrong version go at once
      assert.ok(results[0]!.closedAfterMs! >= 300, 'silent: dropped at the identify timeout');
      assert.ok(results[4]!.closedAfterMs! < 300, 'garbage: dropped at once');
      const reasons = lines.filter((l) => l['reason']).map((l) => l['reason']);
      assert.equal(reasons.filter((r) => r === 'identify-timeout').length, 5, JSON.stringify(reasons));
      assert.ok(reasons.includes('bad-magic'));
      assert.ok(reasons.includes('bad-version'));
    } finally {
      server.close();
      await mig.close().catch(() => undefined);
    }
  });

  test('at most maxUnidentified connections wait to identify; more are refused at accept', async () => {
    const { log, lines } = capturingLogger();
    const mig = new IncomingMigration({ threads: 1, log, multifdChannels: 0 });
    const server = await listenForMigration(mig, { port: 0, log, identifyTimeoutMs: 2000, maxUnidentified: 3 });
    const port = (server.address() as net.AddressInfo).port;
    try {
      const held = [0, 1, 2].map(() => intruder(port, Buffer.alloc(0), 1500));
      await sleep(100);
      const extra = await intruder(port, Buffer.alloc(0), 1000);
      assert.ok(extra.closedAfterMs !== null && extra.closedAfterMs < 500, 'the fourth is refused at once');
      assert.ok(lines.some((l) => l['reason'] === 'too-many-unidentified'));
      for (const r of await Promise.all(held)) assert.equal(r.closedAfterMs, null, 'the first three wait for their timeout');
    } finally {
      server.close();
      await mig.close().catch(() => undefined);
    }
  });
});
