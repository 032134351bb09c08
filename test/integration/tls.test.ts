// --tls-creds on loopback, with node:tls clients standing in for a QEMU source (the real-QEMU
// counterpart is test/qemu/tls.test.ts): every channel is its own TLS session, precopy and COLO
// arrive byte-exact through it; every refusal is logged with its reason, reported to the
// onRefused hook, leaves the migration untouched, and a good migration follows; failover
// writes the image as a TLS client that verifies the destination.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import { IncomingMigration } from '../../src/migration/incoming.js';
import type { CommittedImage } from '../../src/migration/committed-image.js';
import { listenForMigration } from '../../src/net/listener.js';
import { loadClientCreds, loadServerCreds, parseAuthzList, type TlsServerConfig } from '../../src/net/tls.js';
import { imageStream, parseTarget, sendImage } from '../../src/restore/image-stream.js';
import { SyntheticSource } from '../../src/sender/source.js';
import { compareImage } from '../../src/verify/compare.js';
import { makePki, type Pki } from '../../src/harness/pki.js';
import { migrateAndVerify, modelImage } from '../helpers/synthetic.js';
import { capturingLogger, clientOptions, plainAttempt, tlsAttempt, tlsProxy } from '../helpers/tls-clients.js';

let pki: Pki;
before(() => { pki = makePki(); });

async function tlsReceiver(cfg: TlsServerConfig, o: { channels: number; identifyMs?: number; colo?: boolean }) {
  const { log, lines } = capturingLogger();
  const refused: string[] = [];
  const mig = new IncomingMigration({ threads: 2, log, multifdChannels: o.channels, ...(o.colo ? { heartbeatTimeoutMs: 0 } : {}) });
  const server = await listenForMigration(mig, { port: 0, log, identifyTimeoutMs: o.identifyMs ?? 10_000, tls: cfg, onRefused: (r) => refused.push(r) });
  const port = (server.address() as net.AddressInfo).port;
  return { mig, server, port, lines, refused, close: async () => { server.close(); await mig.close().catch(() => undefined); } };
}

let precopyImage: CommittedImage | null = null;
const closeLater: (() => Promise<void>)[] = [];

describe('TLS listener (--tls-creds)', { timeout: 180_000 }, () => {
  test('precopy multifd-4 over TLS: one session per channel, memory equals the source', async () => {
    const r = await tlsReceiver(await loadServerCreds(pki.serverDir, { authz: [pki.clientDn] }), { channels: 4 });
    const proxy = await tlsProxy(r.port, clientOptions(pki.clientDir));
    try {
      const { img } = await migrateAndVerify(r.mig, proxy.port, { layout: '7.2', channels: 4, iterations: 2, seed: 11, memory: { ramMiB: 32 } });
      precopyImage = img;
      assert.equal(proxy.sessions(), 5, 'main + 4 multifd channels, each its own TLS session');
      assert.deepEqual(r.refused, []);
    } finally {
      proxy.close();
      // keep the memory readable for the failover test below
      closeLater.push(r.close);
    }
  });

  test('COLO multifd-2 over TLS: the committed image equals the primary after every checkpoint', async () => {
    const r = await tlsReceiver(await loadServerCreds(pki.serverDir), { channels: 2, colo: true });
    const proxy = await tlsProxy(r.port, clientOptions(pki.clientDir));
    try {
      const bad: string[] = [];
      const src: SyntheticSource = new SyntheticSource({
        port: proxy.port, layout: '7.2', channels: 2, seed: 12, memory: { ramMiB: 32 }, colo: true, checkpoints: 8, intervalMs: 20,
        onCheckpoint: async (info) => {
          const img = await r.mig.committedImage();
          assert.ok(img);
          assert.equal(img.checkpoint, info.index + 1);
          const d = compareImage(img, modelImage(info.model));
          if (d) bad.push(`checkpoint ${info.index + 1}: ${d}`);
          if (!img.deviceState.equals(src.devices.coloBlob().subarray(0, -1))) bad.push(`checkpoint ${info.index + 1}: device blob`);
        },
      });
      const res = await src.run();
      src.close();
      assert.equal(res.checkpoints, 8);
      assert.deepEqual(bad, []);
      assert.equal((await r.mig.done).kind, 'primary-lost');
    } finally {
      proxy.close();
      await r.close();
    }
  });

  test('refusals: plaintext, no client certificate, another CA, DN not allowed, no handshake; each logged with its reason, the migration untouched, a good one follows', async () => {
    const r = await tlsReceiver(await loadServerCreds(pki.serverDir, { authz: parseAuthzList([`${pki.clientDn.replace(/,/g, ',,')}`]) }), { channels: 2, identifyMs: 1500 });
    const untouched = (what: string) => {
      assert.equal(r.mig.phase, 'savevm', `${what}: migration not started`);
      assert.equal(r.mig.channels.length, 0, `${what}: no channel attached`);
      assert.equal(r.mig.totals.bytes, 0, `${what}: no bytes taken`);
    };
    try {
      const header = Buffer.from('QEVM\0\0\0\x03', 'latin1');
      const cases: [string, () => Promise<void>][] = [
        ['tls-plaintext', () => plainAttempt(r.port, header)],
        ['tls-no-client-cert', () => tlsAttempt(r.port, clientOptions(pki.noCertDir), header)],
        ['tls-untrusted-cert', () => tlsAttempt(r.port, clientOptions(pki.foreignDir), header)],
        ['tls-untrusted-cert', () => tlsAttempt(r.port, clientOptions(pki.impostorDir), header)],
        ['tls-authz-denied', () => tlsAttempt(r.port, clientOptions(pki.otherDnDir), header)],
        ['tls-handshake-timeout', () => plainAttempt(r.port, Buffer.alloc(0))],
      ];
      for (const [reason, attempt] of cases) {
        await attempt();
        // the receiver closed the connection: its log line and hook call came first
        const line = r.lines.find((l) => l.reason === reason);
        assert.ok(line, `${reason}: logged (${JSON.stringify(r.lines.map((l) => l.reason))})`);
        assert.match(String(line.msg), /^connection refused: /);
        assert.equal(line.level, 40);
        assert.ok(r.refused.includes(reason), `${reason}: reported to onRefused`);
        untouched(reason);
      }
      const denied = r.lines.find((l) => l.reason === 'tls-authz-denied')!;
      assert.equal(denied.dn, pki.otherDn, 'the refused DN is logged in QEMU form');
      const proxy = await tlsProxy(r.port, clientOptions(pki.clientDir));
      try {
        const src = new SyntheticSource({ port: proxy.port, layout: '7.2', channels: 2, iterations: 1, seed: 13, memory: { ramMiB: 16 } });
        assert.equal((await src.run()).killed, false);
        src.close();
        assert.equal((await r.mig.done).kind, 'completed');
        const img = await r.mig.committedImage();
        assert.ok(img);
        assert.equal(compareImage(img, modelImage(src.model)), null);
      } finally { proxy.close(); }
      assert.equal(r.refused.length, cases.length, JSON.stringify(r.refused));
    } finally {
      await r.close();
    }
  });

  test('--tls-no-verify-peer: a client without a certificate is served', async () => {
    const r = await tlsReceiver(await loadServerCreds(pki.serverDir, { verifyPeer: false }), { channels: 0 });
    const proxy = await tlsProxy(r.port, clientOptions(pki.noCertDir));
    try {
      const src = new SyntheticSource({ port: proxy.port, layout: '7.2', channels: 0, iterations: 1, seed: 14, memory: { ramMiB: 16 } });
      assert.equal((await src.run()).killed, false);
      src.close();
      assert.equal((await r.mig.done).kind, 'completed');
      assert.equal(compareImage((await r.mig.committedImage())!, modelImage(src.model)), null);
    } finally { proxy.close(); await r.close(); }
  });

  test('credentials: authz list syntax (QEMU comma doubling), missing files, authz without verification', async () => {
    assert.deepEqual(parseAuthzList(['CN=a,,O=x,CN=b,,O=y', 'C=GB,,CN=c']), ['CN=a,O=x', 'CN=b,O=y', 'C=GB,CN=c']);
    assert.throws(() => parseAuthzList(['CN=a,,nonsense']), /not a DN/);
    await assert.rejects(loadServerCreds(pki.clientDir), /server-cert\.pem/);
    await assert.rejects(loadServerCreds(pki.serverDir, { verifyPeer: false, authz: ['CN=a'] }), /tls-authz needs/);
  });

  test('failover as a TLS client: the destination verifies our certificate, gets the image; a wrong tls-hostname is refused', async () => {
    assert.ok(precopyImage, 'the precopy test ran first');
    const img = precopyImage;
    const expected = Buffer.concat([...imageStream(img)]);
    const f = (n: string) => readFileSync(join(pki.serverDir, n));
    let peerDn = '';
    const dest = tls.createServer({ ca: f('ca-cert.pem'), cert: f('server-cert.pem'), key: f('server-key.pem'), requestCert: true, rejectUnauthorized: true }, (s) => {
      peerDn = s.getPeerX509Certificate()?.subject ?? '';
      const got: Buffer[] = [];
      s.on('data', (c: Buffer) => got.push(c));
      // like QEMU: close once the stream is loaded
      s.on('end', () => { dest.emit('image', Buffer.concat(got)); s.end(); });
    });
    dest.listen(0, '127.0.0.1');
    await once(dest, 'listening');
    const port = (dest.address() as net.AddressInfo).port;
    try {
      const target = parseTarget(`tls+tcp:127.0.0.1:${port}`);
      assert.equal(target.kind === 'tcp' && target.secure, true);
      await assert.rejects(sendImage(img, target), /without client credentials/);
      if (target.kind !== 'tcp') throw new Error('unreachable');
      target.tls = await loadClientCreds(pki.clientDir);
      const received = once(dest, 'image');
      const n = await sendImage(img, target);
      const [bytes] = (await received) as [Buffer];
      assert.equal(n, expected.length);
      assert.ok(bytes.equals(expected), 'the destination got the image stream byte for byte');
      assert.match(peerDn, /CN=primary\.example/);
      target.tls = await loadClientCreds(pki.clientDir, 'not-the-destination');
      await assert.rejects(sendImage(img, target), /ERR_TLS_CERT_ALTNAME_INVALID|does not match|altnames/i);
    } finally {
      dest.close();
    }
  });
});

after(async () => { for (const c of closeLater) await c(); });
