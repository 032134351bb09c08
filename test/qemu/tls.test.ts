// Real QEMU 7.2 over TLS (issue 14): the source / COLO primary runs
// `-object tls-creds-x509,endpoint=client` + `migrate-set-parameters tls-creds=... tls-hostname=...`
// against `colo-receiver listen --tls-creds`, so every channel (main and each multifd) is a
// TLS session QEMU opened itself. Precopy multifd-4: pc.ram byte-exact; COLO multifd-4:
// >= 20 checkpoints, image dumped; each refusal (plaintext QEMU, a QEMU without a client
// certificate, with a certificate from another CA, with a DN not in --tls-authz; a silent
// TCP peer for the handshake timeout) is logged with its reason and the same receiver then
// takes a good migration byte-exact; failover over TLS into a fresh `-incoming defer` QEMU
// with tls-creds endpoint=server resumes the guest with the uploaded files intact.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, stat, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, describe, test, type TestContext } from 'node:test';
import { ensureGuest, haveQemu, startColoPrimary, startPrecopySource, UploadWorkload } from '../../src/harness/index.js';
import { describeTrial, runFailoverTrial } from '../helpers/failover-trial.js';
import { makePki, type Pki } from '../../src/harness/pki.js';
import { assertSameRam, PRECOPY_MEM, precopyIntoReceiver } from '../helpers/qemu-precopy.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const CHECKPOINTS = Number(process.env.COLO_TEST_CHECKPOINTS ?? 22);
const cleanups: (() => unknown)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });
let pki: Pki;
before(() => { pki = makePki(); });

/** QEMU's client side: a tls-creds-x509 object reading `dir`. */
const clientCreds = (id: string, dir: string) => ['-object', `tls-creds-x509,id=${id},dir=${dir},endpoint=client,verify-peer=on`];
/** migrate-set-parameters for a TLS migration with creds `id`; the server certificate names colo-receiver. */
const tlsParams = (id: string) => ({ 'tls-creds': id, 'tls-hostname': 'colo-receiver' });

describe('real QEMU 7.2 over TLS (tls-creds-x509)', { skip, timeout: 900_000 }, () => {
  test('precopy multifd-4 over TLS: pc.ram equals the source byte for byte', async (t) => {
    const stats = await precopyIntoReceiver('tls-mfd4', randomBytes(3 * 1024 * 1024 + 4096), randomBytes(5 * 1024 * 1024), cleanups, { channels: 4 }, {
      receiverArgs: ['--tls-creds', pki.serverDir, '--tls-authz', pki.clientDn.replace(/,/g, ',,')],
      sourceArgs: clientCreds('tls0', pki.clientDir),
      parameters: tlsParams('tls0'),
    });
    t.diagnostic(`channels: ${stats.channels.map((c) => `${c.channel} ${c.pages} pages`).join(', ')}`);
  });

  test('refusals: plaintext QEMU, no client certificate, another CA (plainly foreign / a CA named like ours), DN not allowed, silent peer; each logged, then a good migration into the same receiver', async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'colo-tls-refusals-'));
    const a = randomBytes(2 * 1024 * 1024), b = randomBytes(3 * 1024 * 1024);
    await writeFile(join(dir, 'a.bin'), a);
    await writeFile(join(dir, 'b.bin'), b);
    const recv = ReceiverProcess.start([
      '--dump-ram', join(dir, 'dump'), '--multifd-channels', '0', '--io-timeout', '3000',
      '--tls-creds', pki.serverDir, '--tls-authz', pki.clientDn.replace(/,/g, ',,'),
    ]);
    cleanups.push(() => recv.kill());
    const port = await recv.port();
    const src = await startPrecopySource({
      runDir: dir, memMiB: 256,
      loaderFiles: [{ path: join(dir, 'a.bin'), addr: 0x100000 }, { path: join(dir, 'b.bin'), addr: 0xc800000 }],
      extraArgs: [...clientCreds('good', pki.clientDir), ...clientCreds('nocert', pki.noCertDir), ...clientCreds('foreign', pki.foreignDir), ...clientCreds('impostor', pki.impostorDir), ...clientCreds('other', pki.otherDnDir)],
    });
    cleanups.push(() => src.kill());
    await src.stop();
    const refusals = () => recv.lines.filter((l) => typeof l.reason === 'string');
    /** One migration attempt that QEMU must lose; returns QEMU's error and the receiver's log line. */
    const attempt = async (creds: string, reason: string) => {
      const before = refusals().length;
      await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'tls-creds': creds, 'tls-hostname': creds ? 'colo-receiver' : '' } });
      const qemuErr = await src.waitMigrationDone(120_000).then(() => 'completed', (e: Error) => e.message);
      assert.notEqual(qemuErr, 'completed', `${reason}: QEMU must not complete`);
      for (let i = 0; i < 100 && refusals().length === before; i++) await sleep(100);
      const line = refusals().slice(before).find((l) => l.reason === reason);
      assert.ok(line, `${reason}: logged (got ${JSON.stringify(refusals().slice(before))})`);
      assert.equal(recv.child.exitCode, null, `${reason}: the receiver keeps waiting`);
      t.diagnostic(`${reason}: receiver ${JSON.stringify({ level: line.level, reason: line.reason, ...(line.dn ? { dn: line.dn } : {}), msg: line.msg })}; QEMU: ${qemuErr}`);
    };
    await attempt('', 'tls-plaintext');
    await attempt('nocert', 'tls-no-client-cert');
    // gnutls sends a certificate only if its issuer is among the CA names we ask for: one from
    // an unrelated CA stays home, one from a CA that copies our CA's name is sent and fails
    await attempt('foreign', 'tls-no-client-cert');
    await attempt('impostor', 'tls-untrusted-cert');
    await attempt('other', 'tls-authz-denied');
    // QEMU always starts its handshake at once: a silent TCP peer stands in for a stuck one
    const before2 = refusals().length;
    const silent = net.connect(port, '127.0.0.1');
    silent.on('error', () => undefined);
    await new Promise((r) => silent.once('close', r));
    const timeout = refusals().slice(before2).find((l) => l.reason === 'tls-handshake-timeout');
    assert.ok(timeout, 'tls-handshake-timeout logged');
    t.diagnostic(`tls-handshake-timeout: receiver ${JSON.stringify({ level: timeout.level, reason: timeout.reason, msg: timeout.msg })}`);
    // nothing above touched the migration: the good one is byte-exact
    await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: tlsParams('good') });
    await src.waitMigrationDone(120_000);
    assert.equal(await recv.wait(60_000), 0, `receiver exit (stderr: ${recv.stderr.slice(-1500)})`);
    const srcMem = await readFile(await src.pmemsave(0, PRECOPY_MEM, join(dir, 'source.mem')));
    await src.kill();
    assertSameRam(srcMem, await readFile(join(dir, 'dump', 'pc.ram.bin')));
  });

  test('COLO multifd-4 over TLS: >= 20 checkpoints under upload load, committed image dumped', async (t: TestContext) => {
    const guest = await ensureGuest();
    const dir = await mkdtemp(join(tmpdir(), 'colo-tls-colo-'));
    const recv = ReceiverProcess.start([
      '--multifd-channels', '4', '--dump-ram', join(dir, 'dump'), '--stats-json', join(dir, 'stats.json'),
      '--tls-creds', pki.serverDir, '--tls-authz', pki.clientDn.replace(/,/g, ',,'),
    ]);
    cleanups.push(() => recv.kill());
    const port = await recv.port();
    const primary = await startColoPrimary({ guest, runDir: dir, memMiB: 512, checkpointDelayMs: 600, nodelay: true, multifd: { channels: 4 }, extraArgs: clientCreds('tls0', pki.clientDir) });
    cleanups.push(() => primary.kill());
    await primary.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000, ...tlsParams('tls0') } });
    await primary.waitColo(180_000);
    const upload = new UploadWorkload({ port: primary.uploadPort, rateMBps: 40, fileBytes: 8 << 20, checkpointCount: () => primary.checkpointCount() }).start();
    cleanups.push(() => upload.stop());
    await primary.waitCheckpoints(CHECKPOINTS, 300_000, []);
    assert.equal(recv.child.exitCode, null, `receiver still running (stderr: ${recv.stderr.slice(-1500)})`);
    assert.equal((await primary.status()).status, 'colo', 'primary still in COLO state');
    await upload.stop({ waitAcks: false });
    await primary.kill();
    assert.equal(await recv.wait(60_000), 0, `receiver exit (stderr: ${recv.stderr.slice(-1500)})`);
    assert.deepEqual(recv.lines.filter((l) => Number(l.level) >= 50), [], 'no error lines from the receiver');
    assert.deepEqual(recv.lines.filter((l) => typeof l.reason === 'string'), [], 'no connection refused');
    assert.doesNotMatch(primary.proc.stderrTail(), /error|failed/i, 'no errors from the primary');
    const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as { checkpoints: { count: number; transferMs: { mean: number; p99: number }; pauseMs: { mean: number } }; channels: unknown[] };
    assert.ok(stats.checkpoints.count >= CHECKPOINTS - 1, `committed ${stats.checkpoints.count} checkpoints`);
    assert.equal(stats.channels.length, 5);
    assert.equal((await stat(join(dir, 'dump', 'pc.ram.bin'))).size, 512 * 1024 * 1024);
    assert.ok((await stat(join(dir, 'dump', 'device-state.bin'))).size > 1000);
    t.diagnostic(`TLS COLO: ${stats.checkpoints.count} checkpoints, transfer mean ${stats.checkpoints.transferMs.mean.toFixed(2)} p99 ${stats.checkpoints.transferMs.p99.toFixed(2)} ms, pause mean ${stats.checkpoints.pauseMs.mean.toFixed(2)} ms`);
  });

  test('failover over TLS: primary SIGKILLed, the committed checkpoint resumed in a fresh -incoming defer QEMU with tls-creds endpoint=server, files intact', { timeout: 300_000 }, async (t) => {
    const guest = await ensureGuest();
    const r = await runFailoverTrial({ moment: 'between', guest, channels: 4, fileBytes: 3 << 20, log: (m) => t.diagnostic(m), tls: { serverDir: pki.serverDir, clientDir: pki.clientDir, clientDn: pki.clientDn } });
    t.diagnostic(`failover: delivered ${r.deliveredMs?.toFixed(0)} ms, SIGKILL -> running ${r.failoverToRunningMs?.toFixed(0)} ms; files ${r.files.verified}/${r.files.eligible}`);
    assert.equal(r.receiverExit, 0, 'receiver exits 0');
    assert.equal(r.destStatus, 'running', 'destination query-status');
    assert.ok(r.files.eligible > 0, 'some files were confirmed before the committed checkpoint');
    assert.equal(r.files.verified, r.files.eligible, 'every file confirmed before the committed checkpoint reads back intact');
    assert.deepEqual(r.problems, [], describeTrial(r));
  });
});
