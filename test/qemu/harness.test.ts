// Proves the real-QEMU harness on this machine:
//  (a) precopy from a harness source into QEMU's own -incoming destination
//      (plain and multifd-4): guest RAM equal at the loader addresses;
//  (b) COLO primary -> QEMU's own secondary (TCG + shim, plain) with the upload
//      workload: >= 5 checkpoints in the primary's trace.
// Run: node --test dist/test/qemu/harness.test.js
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test, type TestContext } from 'node:test';
import {
  ensureGuest, ensureShim, haveQemu, parsePrimaryTrace, parseSecondaryTrace, qemuVersion, readBackSha256,
  startColoPrimary, startPrecopyDestination, startPrecopySource, startQemuSecondary, UploadWorkload,
  type MultifdOptions,
} from '../../src/harness/index.js';

const QEMU_MISSING = haveQemu() ? false : 'qemu-system-x86_64 not found (install qemu-system-x86, or set $QEMU)';
const MiB = 1024 * 1024;

function hasCommand(cmd: string): boolean {
  return (process.env['PATH'] ?? '').split(path.delimiter).some((d) => d && fs.existsSync(path.join(d, cmd)));
}

function runDir(name: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `colo-harness-${name}-`));
}

/** Removes the run dir if the test passed; keeps it (and says where) otherwise. */
async function withRunDir(t: TestContext, name: string, fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = runDir(name);
  let ok = false;
  try {
    await fn(dir);
    ok = true;
  } finally {
    if (ok && !process.env['KEEP_RUNS']) fs.rmSync(dir, { recursive: true, force: true });
    else t.diagnostic(`run directory kept: ${dir}`);
  }
}

describe('trace parsing (no QEMU needed)', () => {
  test('primary and secondary traces give per-checkpoint timings', () => {
    const p = [
      "100@1700000000.000000:colo_receive_message Receive 'checkpoint-ready' message",
      "100@1700000000.600000:colo_send_message Send 'checkpoint-request' message",
      "100@1700000000.601000:colo_receive_message Receive 'checkpoint-reply' message",
      "100@1700000000.602000:colo_send_message Send 'vmstate-send' message",
      '100@1700000000.602100:migration_bitmap_sync_start ',
      '100@1700000000.602600:migration_bitmap_sync_end dirty_pages 60',
      "100@1700000000.604000:colo_send_message Send 'vmstate-size' message",
      "100@1700000000.612000:colo_receive_message Receive 'vmstate-received' message",
      "100@1700000000.620000:colo_receive_message Receive 'vmstate-loaded' message",
      "100@1700000001.220000:colo_send_message Send 'checkpoint-request' message",
    ].join('\n');
    const pt = parsePrimaryTrace(p);
    assert.equal(pt.coloStartAt, 1700000000000);
    assert.equal(pt.checkpoints.length, 2);
    const c = pt.checkpoints[0]!;
    assert.ok(c.complete);
    assert.ok(Math.abs(c.sendToReceivedMs! - 10) < 1e-6);
    assert.ok(Math.abs(c.sendToLoadedMs! - 18) < 1e-6);
    assert.ok(Math.abs(c.requestToLoadedMs! - 20) < 1e-6);
    assert.ok(Math.abs(c.bitmapSyncMs! - 0.5) < 1e-6);
    assert.equal(pt.checkpoints[1]!.complete, false);

    const s = [
      "200@1700000000.000500:colo_send_message Send 'checkpoint-ready' message",
      "200@1700000000.600500:colo_receive_message Receive 'checkpoint-request' message",
      "200@1700000000.602500:colo_receive_message Receive 'vmstate-send' message",
      '200@1700000000.608000:ram_load_complete ret=0, seq_iter=5',
      "200@1700000000.609000:colo_receive_message Receive 'vmstate-size' message",
      "200@1700000000.611000:colo_send_message Send 'vmstate-received' message",
      '200@1700000000.611100:colo_flush_ram_cache_begin dirty_pages 1234',
      '200@1700000000.613100:colo_flush_ram_cache_end ',
      "200@1700000000.619000:colo_send_message Send 'vmstate-loaded' message",
    ].join('\n');
    const st = parseSecondaryTrace(s);
    assert.equal(st.checkpoints.length, 1);
    const d = st.checkpoints[0]!;
    assert.equal(d.flushPages, 1234);
    assert.ok(Math.abs(d.flushMs! - 2) < 1e-6);
    assert.ok(Math.abs(d.receiveMs! - 8.5) < 1e-6);
    assert.ok(d.complete);
  });
});

describe('real QEMU harness', { skip: QEMU_MISSING }, () => {
  test('QEMU is 7.2-compatible', () => {
    const v = qemuVersion();
    assert.match(v ?? '', /QEMU emulator version \d+\.\d+/);
  });

  const precopyCases: { name: string; multifd?: MultifdOptions }[] = [
    { name: 'plain' },
    { name: 'multifd-4', multifd: { channels: 4 } },
  ];
  for (const pc of precopyCases) {
    test(`precopy ${pc.name}: harness source -> QEMU -incoming, RAM equal at loader addresses`, { timeout: 120_000 }, async (t) => {
      await withRunDir(t, `precopy-${pc.name}`, async (dir) => {
        const regions = [
          { addr: 1 * MiB, size: 4 * MiB },
          { addr: 200 * MiB, size: 4 * MiB },
        ];
        const data = regions.map((r, i) => {
          const buf = randomBytes(r.size);
          const file = path.join(dir, `data${i}.bin`);
          fs.writeFileSync(file, buf);
          return { ...r, buf, file };
        });
        const dst = await startPrecopyDestination({ runDir: dir, memMiB: 256, ...(pc.multifd ? { multifd: pc.multifd } : {}) });
        const src = await startPrecopySource({
          runDir: dir, memMiB: 256, loaderFiles: data.map((d) => ({ path: d.file, addr: d.addr })),
          ...(pc.multifd ? { multifd: pc.multifd } : {}),
        });
        try {
          await src.stop();
          // the loader put the data into the source's RAM
          for (const [i, d] of data.entries()) {
            const f = await src.pmemsave(d.addr, d.size, `src${i}.bin`);
            assert.ok(fs.readFileSync(f).equals(d.buf), `source RAM at 0x${d.addr.toString(16)} holds the loader file`);
          }
          const t0 = Date.now();
          await src.migrate(dst.uri);
          const info = await src.waitMigrationDone(60_000);
          const dinfo = await dst.waitMigrationDone(30_000);
          t.diagnostic(`${pc.name}: migration ${info['total-time']} ms (wall ${Date.now() - t0} ms), ` +
            `transferred ${info.ram?.transferred} bytes, normal pages ${info.ram?.normal}`);
          assert.equal(info.status, 'completed');
          assert.equal(dinfo.status, 'completed');
          assert.ok((info.ram?.normal ?? 0) >= (8 * MiB) / 4096, 'the random pages were sent as normal pages');
          for (const [i, d] of data.entries()) {
            const f = await dst.pmemsave(d.addr, d.size, `dst${i}.bin`);
            assert.ok(fs.readFileSync(f).equals(d.buf), `destination RAM at 0x${d.addr.toString(16)} equals the source`);
          }
        } finally {
          await src.kill();
          await dst.kill();
        }
      });
    });
  }

  test('COLO plain: primary -> QEMU secondary under TCG with the shim, >= 5 checkpoints with uploads', { timeout: 150_000 }, async (t) => {
    let guest: Awaited<ReturnType<typeof ensureGuest>>;
    try {
      guest = await ensureGuest();
    } catch (e) {
      if (!hasCommand('apt-get') || !hasCommand('dpkg-deb')) {
        t.skip('the test guest is built from Debian packages: apt-get and dpkg-deb are needed');
        return;
      }
      throw e;
    }
    const shim = await ensureShim();
    await withRunDir(t, 'colo-plain', async (dir) => {
      const sec = await startQemuSecondary({ guest, runDir: dir, memMiB: 512 });
      let wl: UploadWorkload | undefined;
      const pri = await startColoPrimary({ guest, runDir: dir, memMiB: 512, checkpointDelayMs: 600, shim }).catch(async (e: unknown) => {
        await sec.kill();
        throw e;
      });
      try {
        t.diagnostic(`guest booted in ${pri.bootMs} ms`);
        const tm = Date.now();
        await pri.migrate(sec.uri);
        await pri.waitColo(60_000);
        t.diagnostic(`COLO state ${Date.now() - tm} ms after migrate`);
        wl = new UploadWorkload({ port: pri.uploadPort, rateMBps: 40, fileBytes: 8 * MiB, checkpointCount: () => pri.checkpointCount() }).start();
        const start = pri.checkpointCount();
        await pri.waitCheckpoints(start + 5, 60_000, [sec.proc]);
        // at least one upload confirmed while COLO runs
        const deadline = Date.now() + 30_000;
        while (wl.completed().length < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
        const files = await wl.stop();
        wl = undefined;
        const done = files.filter((f) => f.ok);
        assert.ok(done.length >= 1, `uploads confirmed: ${done.length}; errors: ${files.map((f) => f.error).filter(Boolean).join('; ')}`);
        const last = done[done.length - 1]!;
        assert.equal(await readBackSha256(pri.shellPort, last.remotePath!), last.sha256, 'guest has the uploaded bytes');
        assert.ok(last.checkpointAtFinish !== undefined);

        const status = await pri.status();
        assert.equal(status.status, 'colo');
        assert.ok(sec.proc.alive && pri.proc.alive);
        const pt = pri.parseTrace();
        const complete = pt.checkpoints.filter((c) => c.complete);
        assert.ok(complete.length >= 5, `complete checkpoints in the primary trace: ${complete.length}`);
        for (const c of complete) {
          assert.ok(c.sendToReceivedMs! >= 0 && c.sendToLoadedMs! >= c.sendToReceivedMs!);
        }
        const st = sec.parseTrace();
        assert.ok(st.checkpoints.filter((c) => c.complete).length >= 5);
        // the guest kept running (heartbeat) on the primary
        const hb = [...pri.proc.readSerial().matchAll(/^HB (\d+)/gm)].map((m) => Number(m[1]));
        assert.ok(hb.length > 5 && hb.every((n, i) => i === 0 || n === hb[i - 1]! + 1), 'heartbeat counts up by 1');
        const ms = complete.map((c) => c.sendToLoadedMs!).sort((a, b) => a - b);
        t.diagnostic(`checkpoints ${complete.length}, VMSTATE_SEND->LOADED median ${ms[ms.length >> 1]!.toFixed(1)} ms, ` +
          `uploads ${done.length} files at ${files.length ? (done.length * 8 * MiB / 1e6 / ((last.finishedAt! - files[0]!.startedAt) / 1000)).toFixed(1) : 0} MB/s`);
      } finally {
        if (wl) await wl.stop({ waitAcks: false });
        await pri.kill();
        await sec.kill();
      }
    });
  });
});
