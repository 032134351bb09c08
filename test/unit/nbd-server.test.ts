// The NBD server against a client that sends what QEMU 7.2's does (test/helpers/nbd-client.ts):
// handshake variants, every command, and the refusals (typed ERR_NBD errors, EINVAL replies,
// a dead client) with the committed image untouched.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { DiskReplication, PendingDisk } from '../../src/disk/index.js';
import {
  NBD_CMD_BLOCK_STATUS, NBD_CMD_WRITE, NBD_EINVAL, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES,
  NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_MAX_REQUEST, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_SET_META_CONTEXT, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK, NBD_REP_ERR_POLICY,
  NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REP_SERVER,
} from '../../src/disk/nbd-protocol.js';
import { MigrationError } from '../../src/errors.js';
import { NbdTestClient } from '../helpers/nbd-client.js';

const SIZE = 1 << 20;
const dirs: string[] = [];
after(() => { for (const d of dirs) rmSync(d, { recursive: true, force: true }); });

function image(bytes = SIZE, fill?: Buffer): string {
  const d = mkdtempSync(join(tmpdir(), 'nbd-test-'));
  dirs.push(d);
  const p = join(d, 'disk.img');
  fs.writeFileSync(p, fill ?? randomBytes(bytes));
  return p;
}

async function setup(o: { maxPendingBytes?: number; commitMode?: 'async' | 'sync'; names?: string[] } = {}) {
  const names = o.names ?? ['colo-disk0'];
  const paths = names.map(() => image());
  const originals = paths.map((p) => fs.readFileSync(p));
  const { disks, port } = await DiskReplication.start({
    host: '127.0.0.1', port: 0, disks: names.map((name, i) => ({ name, path: paths[i]! })),
    ...(o.maxPendingBytes !== undefined ? { maxPendingBytes: o.maxPendingBytes } : {}),
    ...(o.commitMode ? { commitMode: o.commitMode } : {}),
  });
  return { disks, port, path: paths[0]!, original: originals[0]!, paths, originals };
}

async function waitFor(pred: () => boolean): Promise<void> {
  while (!pred()) await sleep(2);
}

describe('NBD handshake (fixed newstyle) as QEMU 7.2 negotiates it', () => {
  test('STRUCTURED_REPLY refused, GO with INFO_EXPORT + INFO_BLOCK_SIZE, then transmission', async () => {
    const { disks, port } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.greet();
      assert.equal(c.serverFlags, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
      c.option(NBD_OPT_STRUCTURED_REPLY);
      const sr = await c.optReply();
      assert.equal(sr.type, NBD_REP_ERR_UNSUP, 'simple replies only: QEMU then never sends BLOCK_STATUS');
      c.option(NBD_OPT_GO, NbdTestClient.goData('colo-disk0', [NBD_INFO_BLOCK_SIZE]));
      const rs = await c.goReplies();
      assert.deepEqual(rs.map((r) => r.type), [NBD_REP_INFO, NBD_REP_INFO, NBD_REP_ACK]);
      assert.equal(rs[0]!.data.readUInt16BE(0), 0);
      assert.equal(Number(rs[0]!.data.readBigUInt64BE(2)), SIZE);
      const flags = rs[0]!.data.readUInt16BE(10);
      for (const f of [NBD_FLAG_HAS_FLAGS, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES]) assert.ok(flags & f);
      assert.equal(rs[1]!.data.readUInt16BE(0), NBD_INFO_BLOCK_SIZE);
      assert.deepEqual([rs[1]!.data.readUInt32BE(2), rs[1]!.data.readUInt32BE(6), rs[1]!.data.readUInt32BE(10)], [512, 4096, NBD_MAX_REQUEST]);
      assert.equal(await c.flush(), 0);
      assert.ok(disks.disks[0]!.attached);
      c.disc();
      await c.closed();
      await waitFor(() => !disks.disks[0]!.attached);
      assert.deepEqual(disks.server.commandCounts['colo-disk0'], { FLUSH: 1, DISC: 1 });
      assert.deepEqual(disks.server.options, { STRUCTURED_REPLY: 1, GO: 1 });
    } finally { await disks.end(-1); }
  });

  test('NBD_OPT_EXPORT_NAME: size + flags, 124 zero bytes unless NO_ZEROES', async () => {
    const { disks, port } = await setup({ names: ['a', 'b'] });
    try {
      const c = await NbdTestClient.connect(port);
      await c.greet(NBD_FLAG_C_FIXED_NEWSTYLE);
      c.option(NBD_OPT_EXPORT_NAME, Buffer.from('a'));
      const r = await c.take(134);
      assert.equal(Number(r.readBigUInt64BE(0)), SIZE);
      assert.ok(r.subarray(10).equals(Buffer.alloc(124)));
      assert.equal(await c.flush(), 0);
      const c2 = await NbdTestClient.connect(port);
      await c2.greet();
      c2.option(NBD_OPT_EXPORT_NAME, Buffer.from('b'));
      assert.equal(Number((await c2.take(10)).readBigUInt64BE(0)), SIZE);
      assert.equal(await c2.flush(), 0);
      assert.equal(c2.q.length, 0, 'nothing after the 10 bytes with NO_ZEROES');
      c.destroy(); c2.destroy();
    } finally { await disks.end(-1); }
  });

  test('LIST, INFO, unknown and meta-context options, ABORT', async () => {
    const { disks, port } = await setup({ names: ['x', 'y'] });
    try {
      const c = await NbdTestClient.connect(port);
      await c.greet();
      c.option(NBD_OPT_LIST);
      const names: string[] = [];
      for (;;) {
        const r = await c.optReply();
        if (r.type === NBD_REP_ACK) break;
        assert.equal(r.type, NBD_REP_SERVER);
        names.push(r.data.toString('utf8', 4, 4 + r.data.readUInt32BE(0)));
      }
      assert.deepEqual(names, ['x', 'y']);
      c.option(NBD_OPT_INFO, NbdTestClient.goData('y', []));
      assert.deepEqual((await c.goReplies()).map((r) => r.type), [NBD_REP_INFO, NBD_REP_ACK], 'INFO does not bind the export');
      assert.equal(disks.disks[1]!.attached, false);
      c.option(NBD_OPT_SET_META_CONTEXT, Buffer.alloc(8));
      assert.equal((await c.optReply()).type, NBD_REP_ERR_UNSUP);
      c.option(42, Buffer.from('whatever'));
      const u = await c.optReply();
      assert.equal(u.type, NBD_REP_ERR_UNSUP);
      assert.equal(u.opt, 42);
      c.option(NBD_OPT_ABORT);
      assert.equal((await c.optReply()).type, NBD_REP_ACK);
      await c.closed();
    } finally { await disks.end(-1); }
  });

  test('unknown export: GO gets ERR_UNKNOWN (client may retry), EXPORT_NAME closes with ERR_NBD', async () => {
    const { disks, port } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.greet();
      c.option(NBD_OPT_GO, NbdTestClient.goData('nope'));
      const r = await c.goReplies();
      assert.equal(r[0]!.type, NBD_REP_ERR_UNKNOWN);
      c.option(NBD_OPT_EXPORT_NAME, Buffer.from('nope'));
      await c.closed();
      const e = disks.server.errors.at(-1)!;
      assert.ok(e instanceof MigrationError);
      assert.equal(e.code, 'ERR_NBD');
      assert.equal(e.channel, 'nbd/?');
      assert.equal(e.streamOffset, 4 + 16 + 4 + 4 + 2 + 2, 'offset of the EXPORT_NAME option in the client stream');
    } finally { await disks.end(-1); }
  });

  test('one client per export: a second GO gets ERR_POLICY', async () => {
    const { disks, port } = await setup();
    try {
      const a = await NbdTestClient.connect(port);
      await a.handshake('colo-disk0');
      const b = await NbdTestClient.connect(port);
      await b.greet();
      b.option(NBD_OPT_GO, NbdTestClient.goData('colo-disk0'));
      assert.equal((await b.goReplies())[0]!.type, NBD_REP_ERR_POLICY);
      a.destroy(); b.destroy();
    } finally { await disks.end(-1); }
  });

  test('bad option magic, unknown client flags: connection dropped, typed error with offset', async () => {
    const { disks, port } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.greet(0x80);
      await c.closed();
      assert.equal(disks.server.errors.at(-1)!.code, 'ERR_NBD');
      assert.equal(disks.server.errors.at(-1)!.streamOffset, 0);
      const d = await NbdTestClient.connect(port);
      await d.greet();
      d.send(Buffer.alloc(16, 0x41));
      await d.closed();
      assert.equal(disks.server.errors.at(-1)!.streamOffset, 4);
      const e = await NbdTestClient.connect(port);
      await e.greet();
      const h = Buffer.alloc(16);
      h.writeBigUInt64BE(0x49484156454f5054n, 0);
      h.writeUInt32BE(NBD_OPT_GO, 8);
      h.writeUInt32BE(1 << 20, 12);
      e.send(h);
      await e.closed();
      assert.match(disks.server.errors.at(-1)!.message, /cap/);
    } finally { await disks.end(-1); }
  });
});

describe('NBD transmission: commands and pending writes', () => {
  test('WRITE/READ/WRITE_ZEROES/TRIM/FLUSH: reads see PATH overlaid with pending writes; PATH unchanged until commit', async () => {
    const { disks, port, path, original } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      const info = await c.handshake('colo-disk0');
      assert.equal(info.via, 'GO');
      assert.equal(info.size, SIZE);
      const model = Buffer.from(original);
      const a = randomBytes(8192);
      assert.equal(await c.write(4096, a), 0);
      a.copy(model, 4096);
      const b = randomBytes(1000);                           // sub-block, unaligned: merged with what is there
      assert.equal(await c.write(6000, b), 0);
      b.copy(model, 6000);
      assert.equal(await c.writeZeroes(65536, 3 * 4096 + 512), 0);
      model.fill(0, 65536, 65536 + 3 * 4096 + 512);
      assert.equal(await c.trim(200_000, 10_000), 0);
      model.fill(0, 200_000, 210_000);
      assert.equal(await c.flush(), 0);
      const r = await c.read(0, SIZE);
      assert.equal(r.error, 0);
      assert.ok(r.data!.equals(model), 'reads see pending writes');
      assert.ok(fs.readFileSync(path).equals(original), 'PATH untouched before the commit');
      await disks.commit(0);
      await disks.disks[0]!.settle();
      assert.ok(fs.readFileSync(path).equals(model), 'PATH = checkpoint 0 after its commit');
      // a write after the commit belongs to the next checkpoint: dropped at the end
      assert.equal(await c.write(0, randomBytes(4096)), 0);
      c.destroy();
      await disks.end(0);
      assert.ok(fs.readFileSync(path).equals(model), 'uncommitted writes never reach PATH');
      assert.deepEqual(disks.server.commandCounts['colo-disk0'], { WRITE: 3, WRITE_ZEROES: 1, TRIM: 1, FLUSH: 1, READ: 1 });
    } finally { await disks.end(-1); }
  });

  test('out of range, BLOCK_STATUS, unknown command: EINVAL replies; a refused write makes the checkpoint uncommittable (ERR_DISK)', async () => {
    const { disks, port, path, original } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.handshake('colo-disk0');
      assert.equal((await c.read(SIZE - 100, 200)).error, NBD_EINVAL);
      assert.equal((await c.reply(c.request(NBD_CMD_BLOCK_STATUS, 0, 4096))).error, NBD_EINVAL);
      assert.equal((await c.reply(c.request(99, 0, 0))).error, NBD_EINVAL);
      assert.equal((await c.read(0, NBD_MAX_REQUEST + 1)).error, NBD_EINVAL);
      await disks.commit(0);                                // reads refused: nothing lost
      assert.equal(await c.write(SIZE - 512, randomBytes(1024)), NBD_EINVAL);
      assert.equal(await c.flush(), 0, 'the connection stays usable');
      await assert.rejects(disks.commit(1), (e: MigrationError) => e.code === 'ERR_DISK' && e.channel === 'nbd/colo-disk0');
      c.destroy();
      await disks.end(0);
      assert.ok(fs.readFileSync(path).equals(original));
    } finally { await disks.end(-1); }
  });

  test('a WRITE above 32 MiB or a bad request magic drops the client: ERR_NBD, then commit refused with ERR_PEER', async () => {
    const { disks, port, path, original } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.handshake('colo-disk0');
      c.request(NBD_CMD_WRITE, 0, NBD_MAX_REQUEST + 4096);
      await c.closed();
      const e = disks.server.errors.at(-1)!;
      assert.equal(e.code, 'ERR_NBD');
      assert.equal(e.channel, 'nbd/colo-disk0');
      assert.ok((e.streamOffset ?? 0) > 0);
      await assert.rejects(disks.commit(0), (x: MigrationError) => x.code === 'ERR_PEER');
      const d = await NbdTestClient.connect(port);
      await d.handshake('colo-disk0');
      d.send(Buffer.alloc(28, 0x55));
      await d.closed();
      assert.equal(disks.server.errors.at(-1)!.code, 'ERR_NBD');
      await disks.end(-1);
      assert.ok(fs.readFileSync(path).equals(original));
    } finally { await disks.end(-1); }
  });

  test('a client dead in the middle of a WRITE: nothing of it is kept, the epoch cannot commit, committed PATH stays', async () => {
    const { disks, port, path, original } = await setup();
    try {
      const c = await NbdTestClient.connect(port);
      await c.handshake('colo-disk0');
      const w = randomBytes(4096);
      assert.equal(await c.write(0, w), 0);
      await disks.commit(0);
      const model = Buffer.from(original); w.copy(model, 0);
      const h = Buffer.alloc(28);
      h.writeUInt32BE(0x25609513, 0); h.writeUInt16BE(NBD_CMD_WRITE, 6); h.writeUInt32BE(65536, 24);
      c.send(Buffer.concat([h, randomBytes(1000)]));
      await sleep(20);
      c.destroy();
      await waitFor(() => !disks.disks[0]!.attached);
      await assert.rejects(disks.commit(1), (x: MigrationError) => x.code === 'ERR_PEER' && /went away/.test(x.message));
      await disks.end(0);
      assert.ok(fs.readFileSync(path).equals(model), 'PATH = checkpoint 0');
    } finally { await disks.end(-1); }
  });

  test('a reconnecting client: the epoch it reconnects in is refused (writes in between were missed)', async () => {
    const { disks, port } = await setup();
    try {
      const a = await NbdTestClient.connect(port);
      await a.handshake('colo-disk0');
      await disks.commit(0);
      a.disc();
      await waitFor(() => !disks.disks[0]!.attached);
      const b = await NbdTestClient.connect(port);
      await b.handshake('colo-disk0');
      await assert.rejects(disks.commit(1), (x: MigrationError) => x.code === 'ERR_PEER' && /went away/.test(x.message));
      b.destroy();
    } finally { await disks.end(-1); }
  });

  test('no client ever: checkpoint 0 is refused with a hint at drive_add', async () => {
    const { disks } = await setup();
    try {
      await assert.rejects(disks.commit(0), (x: MigrationError) => x.code === 'ERR_PEER' && /drive_add/.test(x.message));
    } finally { await disks.end(-1); }
  });
});

describe('PendingDisk', () => {
  for (const [label, opts] of [['memory', {}], ['spill file (cap 0)', { maxPendingBytes: 0 }], ['sync commit', { commitMode: 'sync' as const }]] as const) {
    test(`${label}: random writes over several checkpoints; PATH = each committed checkpoint, reads = overlay`, async () => {
      const path = image(300 * 1024 + 512);                  // not a multiple of 4 KiB: the last block is partial
      const size = fs.statSync(path).size;
      const d = await PendingDisk.open({ name: 'd', path, ...opts });
      try {
        d.attach();
        const model = fs.readFileSync(path);
        let committedModel = Buffer.from(model);
        let seed = 7;
        const rnd = (n: number) => { seed = (seed * 1103515245 + 12345) >>> 0; return seed % n; };
        for (let k = 0; k < 6; k++) {
          for (let i = 0; i < 40; i++) {
            const off = rnd(size);
            const len = Math.min(size - off, 1 + rnd(20000));
            if (rnd(5) === 0) { d.zero(off, len); model.fill(0, off, off + len); }
            else { const b = randomBytes(len); d.write(off, b); b.copy(model, off); }
          }
          assert.ok(d.read(0, size).equals(model), `checkpoint ${k}: reads are the overlay`);
          if (k === 3) { d.discard(); model.set(committedModel); continue; }  // an incomplete checkpoint
          await d.commit(k);
          committedModel = Buffer.from(model);
          await d.settle();
          assert.ok(fs.readFileSync(path).equals(committedModel), `PATH = checkpoint ${k}`);
        }
      } finally { await d.close(); }
    });
  }
});
