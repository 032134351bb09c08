// Kill anywhere, with a disk: the synthetic COLO primary (QEMU-exact stream) checkpoints into
// the receiver while a synthetic NBD writer (what QEMU 7.2's client sends) writes the primary's
// disk between checkpoints, as the guest does while the VM runs. The primary (main channel and
// NBD client) is cut at a random byte inside a random checkpoint: the receiver must hold the
// previous checkpoint, and PATH must equal the primary's disk as of that checkpoint, byte for byte.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { DiskReplication } from '../../src/disk/index.js';
import { SyntheticSource, type SyntheticSourceOptions } from '../../src/sender/source.js';
import { NbdTestClient } from '../helpers/nbd-client.js';
import { startReceiver } from '../helpers/synthetic.js';

const RUNS = Math.max(6, Math.ceil(Number(process.env.FUZZ_RUNS ?? 102) / 3));
const CHECKPOINTS = 3;
const DISK = 512 << 10;

function options(port: number, channels: number): SyntheticSourceOptions {
  return { port, layout: '7.2', channels, colo: true, checkpoints: CHECKPOINTS, seed: 5, memory: { ramMiB: 16 }, workload: { pages: 400 } };
}

/** A burst of guest writes (aligned, unaligned, zeroes, trims), applied to the model too. */
async function burst(c: NbdTestClient, model: Buffer, rnd: () => number): Promise<void> {
  const n = 1 + Math.floor(rnd() * 12);
  for (let i = 0; i < n; i++) {
    const aligned = rnd() < 0.7;
    const off = aligned ? Math.floor(rnd() * (DISK / 4096)) * 4096 : Math.floor(rnd() * DISK);
    const len = Math.min(DISK - off, aligned ? 4096 * (1 + Math.floor(rnd() * 8)) : 1 + Math.floor(rnd() * 9000));
    const kind = rnd();
    if (kind < 0.8) { const b = randomBytes(len); assert.equal(await c.write(off, b), 0); b.copy(model, off); }
    else if (kind < 0.9) { assert.equal(await c.writeZeroes(off, len), 0); model.fill(0, off, off + len); }
    else { assert.equal(await c.trim(off, len), 0); model.fill(0, off, off + len); }
    if (rnd() < 0.2) assert.equal(await c.flush(), 0);
  }
}

describe('kill the primary anywhere inside a checkpoint, with a replicated disk', () => {
  for (const v of [
    { channels: 0, mode: 'async' as const, maxPendingBytes: 256 << 20 },
    { channels: 4, mode: 'sync' as const, maxPendingBytes: 8192 },   // tiny cap: most blocks spill
  ]) {
    test(`${v.channels} channel(s), ${v.mode} commit, pending cap ${v.maxPendingBytes}: PATH = the held checkpoint's disk`, async () => {
      const sizes: number[] = [];
      {
        const r = await startReceiver({ multifdChannels: v.channels });
        try {
          const src = new SyntheticSource({ ...options(r.port, v.channels), onCheckpoint: (i) => { sizes.push(i.bytes); } });
          await src.run(); src.close(); await r.mig.done;
        } finally { await r.close(); }
      }
      await fc.assert(fc.asyncProperty(
        fc.integer({ min: 0, max: CHECKPOINTS - 1 }).chain((k) => fc.tuple(fc.constant(k), fc.integer({ min: 0, max: sizes[k]! - 1 }), fc.integer())),
        async ([k, byteOffset, seed]) => {
          const dir = mkdtempSync(join(tmpdir(), 'disk-kill-'));
          const path = join(dir, 'disk.img');
          const model = randomBytes(DISK);
          fs.writeFileSync(path, model);
          let s = seed >>> 0;
          const rnd = () => { s = (Math.imul(s, 1664525) + 1013904223) >>> 0; return s / 2 ** 32; };
          const { disks, port: nbdPort } = await DiskReplication.start({ host: '127.0.0.1', port: 0, disks: [{ name: 'd0', path }], commitMode: v.mode, maxPendingBytes: v.maxPendingBytes });
          const r = await startReceiver({ multifdChannels: v.channels, participants: [disks] });
          const nbd = await NbdTestClient.connect(nbdPort);
          try {
            await nbd.handshake('d0');
            await burst(nbd, model, rnd);                     // before the migration: part of checkpoint 0
            const snaps: Buffer[] = [];
            const src: SyntheticSource = new SyntheticSource({
              ...options(r.port, v.channels), killAt: { checkpoint: k, byteOffset },
              onBeforeCheckpoint: async (i) => {
                if (i === 0) snaps.push(Buffer.from(model)); // checkpoint 0 = the initial migration
                await burst(nbd, model, rnd);                 // the VM runs: writes of checkpoint i+1
                snaps.push(Buffer.from(model));
              },
            });
            const res = await src.run();
            src.close();
            nbd.destroy();                                    // the primary's NBD client dies with it
            assert.equal(res.killed, true);
            const o = await r.mig.done;                       // resolves after the disks settled
            assert.equal(o.kind, 'primary-lost', JSON.stringify(o));
            assert.equal(r.mig.committedCheckpoint, k);
            assert.equal(disks.disks[0]!.committed, k);
            const got = fs.readFileSync(path);
            assert.ok(got.equals(snaps[k]!), `PATH equals checkpoint ${k}'s disk`);
          } finally {
            nbd.destroy();
            await r.close();
            await disks.end(-1);
            rmSync(dir, { recursive: true, force: true });
          }
        }), { numRuns: RUNS });
    });
  }
});
