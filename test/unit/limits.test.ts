// Caps on wire numbers (src/migration/limits.ts) and dead peers (issue "Hardening").
//
// The table has one row per cap of DEFAULT_LIMITS. Each row builds one stream whose relevant
// number is V, then runs it twice: with the cap set to V (accepted: the migration completes or
// the checkpoint commits) and to V - 1 (refused with ERR_LIMIT, naming the channel and the
// stream offset of the number). Streams are fed in memory (test/helpers/fuzz.ts: a Duplex per
// connection, net.Socket timeout semantics) except where a real listener is the point.
//
// Tests marked "fixed in <commit>" failed on the receiver before that commit.
import { imageBlockBytes } from '../../src/memory/ram-block.js';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { MigrationError, type MigrationErrorCode } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { IncomingMigration, type Outcome } from '../../src/migration/incoming.js';
import { DEFAULT_LIMITS, type Limits } from '../../src/migration/limits.js';
import type { Compression } from '../../src/migration/multifd-packet.js';
import { listenForMigration } from '../../src/net/listener.js';
import { PagePool } from '../../src/pool/page-pool.js';
import { DeviceState } from '../../src/sender/device-state.js';
import { encodeMultiFDInit, encodeMultiFDPacketHeader } from '../../src/sender/multifd-builder.js';
import { ZlibEncoder } from '../../src/sender/multifd-compress.js';
import { SyntheticSource } from '../../src/sender/source.js';
import { StreamBuilder } from '../../src/sender/stream-builder.js';
import { compareImage } from '../../src/verify/compare.js';
import {
  COLO_MESSAGE_CHECKPOINT_REQUEST, COLO_MESSAGE_VMSTATE_SEND, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING,
  MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB, MULTIFD_INIT_LEN, MULTIFD_PACKET_HEADER_LEN,
} from '../../src/wire/constants.js';
import { calibrate, diffPages, MemTransport, recordSynthetic, replay, syntheticSpecs, type CaseConn, type Seed } from '../helpers/fuzz.js';

const P = 4096;
const KiB = 1024;
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } as const;
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 64 * KiB }, { idstr: '0000:00:02.0/vga.vram', usedLength: 16 * KiB }];
const page = (fill: number) => Buffer.alloc(P, fill);

let pool: PagePool;
before(() => { pool = new PagePool({ threads: 2 }); });
after(async () => { await pool.close(); });

// ---------------------------------------------------------------- stream builders (QEMU's save side)

interface Built { conns: CaseConn[]; at: Record<string, number> }
const conn = (role: string, data: Buffer): CaseConn => ({ role, data, gates: [[0, 0]], cut: data.length, end: 'eof' });

/**
 * A 7.2-style precopy main channel: header, configuration, [commands], ram START (MEM_SIZE,
 * EOS, footer), ram END (pages on the main channel unless multifd, EOS, footer), FULL device
 * sections, EOF, VMDESCRIPTION. `at` gets the offsets of the interesting numbers.
 */
function precopyMain(o: { blocks?: typeof BLOCKS; commands?: Buffer[]; colo?: boolean; mainPages?: boolean; devices?: boolean } = {}): { b: StreamBuilder; bytes: () => number; at: Record<string, number>; dev: DeviceState } {
  const b = new StreamBuilder();
  const at: Record<string, number> = {};
  let n = 0;
  const mark = () => { n = b.totalBytes; return n; };
  b.fileHeader().configuration('pc-i440fx-7.2');
  if (o.colo) b.enableColo();
  for (const c of o.commands ?? []) { at[`cmd${c.readUInt16BE(0)}`] = mark(); b.command(c.readUInt16BE(0), c.subarray(2)); }
  b.sectionStart(RAM);
  at['memSize'] = mark();
  const blocks = o.blocks ?? BLOCKS;
  at['entry0'] = at['memSize']! + 8;
  let e = at['entry0']!;
  blocks.forEach((bl, i) => { at[`entry${i}`] = e; e += 1 + bl.idstr.length + 8; });
  b.ramMemSize(blocks).ramEos().footer(2);
  b.sectionEnd(2);
  if (o.mainPages !== false) {
    b.ramPage('pc.ram', 0, page(0x11)).ramPage('pc.ram', 5 * P, page(0x22)).ramZero('pc.ram', 6 * P).ramPage('0000:00:02.0/vga.vram', P, page(0x33));
  }
  b.ramEos().footer(2);
  const dev = new DeviceState({ seed: 3 });
  if (o.devices !== false) { at['devices'] = mark(); dev.writeFullSections(b); }
  b.eof();
  at['vmdesc'] = mark();
  b.vmdescription(dev.vmdescription());
  return { b, bytes: () => b.totalBytes, at, dev };
}

function precopyPlain(o: Parameters<typeof precopyMain>[0] = {}): Built {
  const m = precopyMain(o);
  return { conns: [conn('main', m.b.build())], at: m.at };
}

/** Precopy plus one COLO checkpoint whose blob is `blobLen` bytes (one FULL section and EOF). */
function coloOneCheckpoint(blobLen: number): Built {
  const m = precopyMain({ colo: true });
  const b = m.b;
  m.at['checkpoint'] = b.totalBytes;
  b.coloMessage(COLO_MESSAGE_CHECKPOINT_REQUEST).coloMessage(COLO_MESSAGE_VMSTATE_SEND);
  b.sectionEnd(2).ramPage('pc.ram', 2 * P, page(0x44)).ramEos().footer(2).eof();
  m.at['vmstateSize'] = b.totalBytes + 4;
  const hdr = { sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 };
  const overhead = 1 + 4 + 1 + hdr.idstr.length + 8 + 5 + 1;
  const blob = new StreamBuilder().sectionFull(hdr, Buffer.alloc(blobLen - overhead, 0x5a)).eof().build();
  assert.equal(blob.length, blobLen);
  b.vmstateSize(blob.length).raw(blob);
  return { conns: [conn('main', b.build())], at: m.at };
}

/** Precopy with `channels` multifd channels (7.2 per-section syncs), pages on the channels, optionally zlib. */
function precopyMultifd(channels: number, compression: Compression = 'none'): Built {
  const m = precopyMain({ mainPages: false });
  const at = m.at;
  const conns = [conn('main', m.b.build())];
  // packet_num as QEMU numbers them: one counter, setup SYNCs, then the data packets, then the SYNCs
  const parts: Buffer[][] = [];
  const push = (id: number, b: Buffer) => { parts[id]!.push(b); return parts[id]!.reduce((s, x) => s + x.length, 0) - b.length; };
  let num = 0;
  for (let id = 0; id < channels; id++) parts.push([encodeMultiFDInit({ id })]);
  for (let id = 0; id < channels; id++) push(id, encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: num++, ramblock: '', offsets: [] }));
  for (let id = 0; id < channels; id++) {
    const pages = [page(0x60 + id), page(0x70 + id)];
    const offsets = [(8 + 2 * id) * P, (9 + 2 * id) * P];
    const payload = compression === 'zlib' ? new ZlibEncoder().encode(pages) : Buffer.concat(pages);
    const hdrAt = push(id, encodeMultiFDPacketHeader({ flags: compression === 'zlib' ? MULTIFD_FLAG_ZLIB : 0, pagesAlloc: 128, normalPages: 2, nextPacketSize: payload.length, packetNum: num++, ramblock: 'pc.ram', offsets }));
    if (id === 0) { at['packet0'] = hdrAt; at['payload0'] = payload.length; }
    push(id, payload);
  }
  for (let id = 0; id < channels; id++) push(id, encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: num++, ramblock: '', offsets: [] }));
  for (let id = 0; id < channels; id++) conns.push(conn(`multifd-${id}`, Buffer.concat(parts[id]!)));
  return { conns, at };
}

async function run(b: Built, o: { limits?: Partial<Limits>; channels?: number | undefined; compression?: Compression; colo?: boolean; ioTimeoutMs?: number; chunk?: number } = {}) {
  return replay(b.conns, {
    pool, channels: 'channels' in o ? o.channels : 0, ioTimeoutMs: o.ioTimeoutMs ?? 5000, heartbeatTimeoutMs: 0, deadlineMs: 20_000, eofGate: 0,
    limits: { ...DEFAULT_LIMITS, ...o.limits }, ...(o.compression ? { compression: o.compression } : {}),
    ...(o.chunk ? { chunk: () => o.chunk! } : {}),
  });
}

function errorOf(o: Outcome | null): MigrationError | undefined {
  return o && o.kind !== 'completed' ? o.error : undefined;
}

// ---------------------------------------------------------------- the table

interface Row {
  cap: keyof Limits;
  /** The stream and the value V its relevant number has. */
  build: () => { built: Built; v: number; channel: string; offset: number | ((b: Built) => number) | 'any' };
  opts?: Parameters<typeof run>[1];
  /** The checkpoint that must be committed when accepted (COLO rows). */
  committed?: number;
  codes?: MigrationErrorCode[];
  todo?: string;
}

const ROWS: Row[] = [
  {
    cap: 'maxRamBytes',
    build: () => { const built = precopyPlain(); return { built, v: 80 * KiB, channel: 'main', offset: built.at['memSize']! }; },
  },
  {
    cap: 'maxBlocks',
    build: () => { const built = precopyPlain(); return { built, v: 2, channel: 'main', offset: built.at['entry1']! }; },
  },
  {
    cap: 'maxBlobBytes',
    build: () => { const built = coloOneCheckpoint(3000); return { built, v: 3000, channel: 'main', offset: built.at['vmstateSize']! }; },
    committed: 1,
  },
  {
    cap: 'maxSectionBytes',
    build: () => {
      const built = precopyPlain();
      const d = new DeviceState({ seed: 3 });
      // the longest device section, header to footer
      const len = Math.max(...d.sections.map((s) => new StreamBuilder().sectionFull(s, s.body).build().length));
      return { built, v: len, channel: 'main', offset: 'any' };
    },
    opts: { chunk: 1024 },

  },
  {
    cap: 'maxVmdescBytes',
    build: () => { const built = precopyPlain(); return { built, v: Buffer.byteLength(new DeviceState({ seed: 3 }).vmdescription()), channel: 'main', offset: built.at['vmdesc']! }; },

  },
  {
    cap: 'maxPacketPayload',
    build: () => { const built = precopyMultifd(1, 'zlib'); return { built, v: built.at['payload0']!, channel: 'multifd/0', offset: built.at['packet0']! + 20 }; },
    opts: { channels: 1, compression: 'zlib' },
  },
  {
    cap: 'maxChannels',
    build: () => { const built = precopyMultifd(3); return { built, v: 3, channel: 'multifd/2', offset: 24 }; },
    opts: { channels: undefined },
    codes: ['ERR_LIMIT', 'ERR_HANDSHAKE'],

  },
  {
    cap: 'maxCommandBytes',
    build: () => {
      const ping = Buffer.from([0, MIG_CMD_PING, 0, 0, 0, 7]);
      const built = precopyPlain({ commands: [Buffer.from([0, MIG_CMD_OPEN_RETURN_PATH]), ping] });
      return { built, v: 4, channel: 'main', offset: built.at[`cmd${MIG_CMD_PING}`]! };
    },
  },
];

describe('limits: one row per cap, just above refused with ERR_LIMIT, just at accepted', () => {
  test('the table covers every cap of DEFAULT_LIMITS', () => {
    assert.deepEqual(ROWS.map((r) => r.cap).sort(), Object.keys(DEFAULT_LIMITS).sort());
  });
  test('DEFAULT_LIMITS are the documented defaults', () => {
    assert.deepEqual(DEFAULT_LIMITS, {
      maxRamBytes: 64 * 2 ** 30, maxBlocks: 1024, maxBlobBytes: 256 * 2 ** 20, maxSectionBytes: 64 * 2 ** 20,
      maxVmdescBytes: 64 * 2 ** 20, maxPacketPayload: 2 ** 20, maxChannels: 255, maxCommandBytes: 65536,
    });
  });
  for (const row of ROWS) {
    test(`${row.cap}: at the cap the stream is accepted, one above it is refused with ${(row.codes ?? ['ERR_LIMIT']).join('/')}`, { ...(row.todo ? { todo: row.todo } : {}) }, async () => {
      const { built, v, channel, offset } = row.build();
      const ok = await run(built, { ...row.opts, limits: { [row.cap]: v } });
      if (row.committed !== undefined) {
        assert.equal(ok.committed, row.committed, `at the cap: ${JSON.stringify(ok.outcome)}`);
      } else {
        assert.equal(ok.outcome?.kind, 'completed', `at the cap: ${JSON.stringify(ok.outcome)} ${errorOf(ok.outcome)?.message}`);
      }
      const bad = await run(built, { ...row.opts, limits: { [row.cap]: v - 1 } });
      const err = errorOf(bad.outcome);
      assert.ok(err instanceof MigrationError, `above the cap: ${JSON.stringify(bad.outcome)}`);
      assert.ok((row.codes ?? ['ERR_LIMIT']).includes(err.code), `above the cap: ${err.code}: ${err.message}`);
      assert.equal(err.channel, channel, err.message);
      if (offset === 'any') assert.equal(typeof err.streamOffset, 'number', err.message);
      else assert.equal(err.streamOffset, typeof offset === 'number' ? offset : offset(built), err.message);
      if (row.committed !== undefined) assert.equal(bad.committed, row.committed - 1, 'the previous checkpoint stays committed');
    });
  }
});

// ---------------------------------------------------------------- dead peers

/** Attaches transports by hand: the test controls every byte and when it is sent. */
function manual(o: { channels?: number; ioTimeoutMs: number; heartbeatTimeoutMs?: number }) {
  const mig = new IncomingMigration({ pool, log: silentLogger, multifdChannels: o.channels ?? 0, ioTimeoutMs: o.ioTimeoutMs, heartbeatTimeoutMs: o.heartbeatTimeoutMs ?? 0 });
  // handed over paused, as src/net/listener.ts does: the receiver resumes them
  const main = new MemTransport(() => undefined).pause();
  mig.attachMain(main, Buffer.alloc(0));
  const mfd = Array.from({ length: o.channels ?? 0 }, () => { const t = new MemTransport(() => undefined).pause(); mig.attachMultifd(t, Buffer.alloc(0)); return t; });
  return { mig, main, mfd };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const MARGIN = 400;

describe('dead peers', () => {
  test('a multifd channel silent in the middle of a packet ends with ERR_TIMEOUT within ioTimeoutMs', async () => {
    const IO = 300;
    const built = precopyMultifd(1);
    const { mig, main, mfd } = manual({ channels: 1, ioTimeoutMs: IO });
    main.push(built.conns[0]!.data);
    const ch = built.conns[1]!.data;
    mfd[0]!.push(ch.subarray(0, MULTIFD_INIT_LEN + MULTIFD_PACKET_HEADER_LEN + 100));   // SYNC packet, then 100 bytes of the next header
    const t0 = performance.now();
    const o = await mig.done;
    const dt = performance.now() - t0;
    const err = errorOf(o);
    assert.equal(err?.code, 'ERR_TIMEOUT', JSON.stringify(o));
    assert.ok(dt >= IO - 50 && dt <= IO + MARGIN, `ended after ${dt.toFixed(0)} ms, ioTimeoutMs ${IO}`);
    assert.equal(typeof err?.streamOffset, 'number');
    await mig.close();
  });

  test('the main channel silent in the middle of a record ends with ERR_TIMEOUT within ioTimeoutMs', async () => {
    const IO = 300;
    const built = precopyPlain();
    const { mig, main } = manual({ ioTimeoutMs: IO });
    main.push(built.conns[0]!.data.subarray(0, built.at['entry1']! + 3));
    const t0 = performance.now();
    const o = await mig.done;
    const dt = performance.now() - t0;
    assert.equal(errorOf(o)?.code, 'ERR_TIMEOUT', JSON.stringify(o));
    assert.equal(errorOf(o)?.channel, 'main');
    assert.ok(dt >= IO - 50 && dt <= IO + MARGIN, `ended after ${dt.toFixed(0)} ms`);
    await mig.close();
  });

  /** multifd/0 sends everything (it parks at its first SYNC, the rest queued), multifd/1 only its handshake. */
  async function silentAtBarrier(IO: number): Promise<{ err: MigrationError | undefined; dt: number; o: Outcome }> {
    const built = precopyMultifd(2);
    const { mig, main, mfd } = manual({ channels: 2, ioTimeoutMs: IO });
    mfd[0]!.push(built.conns[1]!.data);
    mfd[1]!.push(built.conns[2]!.data.subarray(0, MULTIFD_INIT_LEN));      // handshake only, then nothing
    await sleep(20);
    main.push(built.conns[0]!.data);
    const t0 = performance.now();
    const o = await mig.done;
    const dt = performance.now() - t0;
    await mig.close();
    return { err: errorOf(o), dt, o };
  }

  test('a silent multifd channel while the main channel waits at a barrier ends with ERR_TIMEOUT within ioTimeoutMs', async () => {
    const IO = 300;
    const { err, dt, o } = await silentAtBarrier(IO);
    assert.equal(err?.code, 'ERR_TIMEOUT', JSON.stringify(o));
    assert.ok(dt <= IO + MARGIN, `ended after ${dt.toFixed(0)} ms`);
  });

  test('... and the error names the silent channel, not the one parked at its SYNC', async () => {
    const { err } = await silentAtBarrier(300);
    assert.match(err?.message ?? '', /multifd\/1/);
    assert.doesNotMatch(err?.message ?? '', /multifd\/0/);
  });

  describe('COLO', () => {
    let seed: Seed;
    before(async () => {
      seed = await recordSynthetic(syntheticSpecs().find((s) => s.name === 'syn/7.2-mfd2-colo')!, pool);
      seed.ref = await calibrate(seed, pool);
    });

    test('a multifd channel that closes in the middle of checkpoint 2 ends COLO as primary-lost with checkpoint 1 intact', async () => {
      const k = seed.conns.findIndex((c) => c.role === 'multifd-1');
      const c = seed.conns[k]!;
      // multifd-1's bytes of checkpoint 2: between its gate after checkpoint 2's REPLY and the next gate
      const gates = c.gates;
      const g = gates.findIndex(([, r]) => r === 4 * (1 + 3 + 1));       // READY, 3 replies of checkpoint 1, REPLY of 2
      assert.ok(g > 0 && g + 1 < gates.length, JSON.stringify(gates));
      const from = gates[g]![0], to = gates[g + 1]![0];
      assert.ok(to - from > MULTIFD_PACKET_HEADER_LEN, 'checkpoint 2 carries packets on multifd-1');
      const conns: CaseConn[] = seed.conns.map((x, i) => ({ role: x.role, data: x.data, gates: x.gates, cut: i === k ? from + Math.floor((to - from) / 2) : x.data.length, end: 'eof' }));
      const r = await replay(conns, { pool, channels: seed.channels, ioTimeoutMs: 5000, heartbeatTimeoutMs: 10_000, deadlineMs: 20_000, eofGate: seed.eofGate });
      assert.equal(r.outcome?.kind, 'primary-lost', JSON.stringify(r.outcome));
      assert.equal(r.committed, 1);
      assert.ok(r.image);
      const want = seed.ref!.images.get(1)!;
      for (const b of r.image.blocks) {
        assert.equal(diffPages(imageBlockBytes(b), want.blocks.get(b.idstr)!, false), 0, `block ${b.idstr} equals checkpoint 1`);
      }
      assert.ok(r.image.deviceState.equals(want.device), 'device state of checkpoint 1');
    });
  });

  test('a second main connection while one is active is refused without disturbing the first (real sockets)', async () => {
    const mig = new IncomingMigration({ pool, log: silentLogger, multifdChannels: 2, ioTimeoutMs: 5000, heartbeatTimeoutMs: 10_000 });
    const server = await listenForMigration(mig, { port: 0, log: silentLogger });
    const port = (server.address() as net.AddressInfo).port;
    try {
      const final = new Map<string, Uint8Array>();
      let intruder: Promise<{ closed: boolean; got: number }> | undefined;
      const src: SyntheticSource = new SyntheticSource({
        port, channels: 2, colo: true, checkpoints: 4, seed: 9, memory: { ramMiB: 4 }, workload: { pages: 64 },
        onCheckpoint: async (info) => {
          if (info.index === 1) {
            // mid-session: a second migration attempt, with a valid file header and more
            intruder = (async () => {
              const s = net.connect(port, '127.0.0.1');
              await once(s, 'connect');
              let got = 0;
              s.on('data', (d: Buffer) => { got += d.length; });
              s.on('error', () => undefined);
              s.write(new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2').build());
              const closed = await Promise.race([once(s, 'close').then(() => true), sleep(3000).then(() => false)]);
              s.destroy();
              return { closed, got };
            })();
            await intruder;
          }
          if (info.index === 3) for (const b of info.model.blocks) final.set(b.idstr, Buffer.from(b.host));
        },
      });
      const res = await src.run();
      assert.equal(res.checkpoints, 4, 'the primary ran every checkpoint');
      const o = await mig.done;
      assert.ok(intruder);
      const i = await intruder;
      assert.equal(i.closed, true, 'the second connection was closed by the receiver');
      assert.equal(i.got, 0, 'and got no COLO message');
      assert.equal(o.kind, 'primary-lost', JSON.stringify(o));
      assert.equal(mig.committedCheckpoint, 4);
      const img = await mig.committedImage();
      assert.ok(img);
      assert.equal(compareImage(img, final), null);
    } finally {
      server.close();
      await mig.close();
    }
  });
});

// ---------------------------------------------------------------- timeouts that blamed or missed a peer (fixed)

describe('timeouts: only a silent peer, and every silent peer', () => {
  test('the main channel held at a barrier longer than ioTimeoutMs, while the channels keep sending, completes', {

  }, async () => {
    const IO = 300;
    const built = precopyMultifd(1);
    const { mig, main, mfd } = manual({ channels: 1, ioTimeoutMs: IO });
    main.push(built.conns[0]!.data);               // main runs to its second barrier and waits there
    const ch = built.conns[1]!.data;
    // the channel trickles its bytes: never silent for more than IO / 3, all of them after ~3 x IO
    const steps = 12;
    for (let i = 0; i < steps; i++) {
      mfd[0]!.push(ch.subarray(Math.floor((i * ch.length) / steps), Math.floor(((i + 1) * ch.length) / steps)));
      await sleep(IO / 4);
    }
    mfd[0]!.push(null);
    main.push(null);
    const o = await Promise.race([mig.done, sleep(5000).then(() => null)]);
    assert.equal(o?.kind, 'completed', `${JSON.stringify(o)} ${errorOf(o)?.message}`);
    await mig.close();
  });

  // (fixed in 5833dd4: a channel parked at SYNC or waiting for a slot waits on us, not on its peer)
  test('a channel parked at its SYNC with the next packet buffered does not time out while the main channel is slow', async () => {
    const IO = 300;
    const built = precopyMultifd(1);
    const { mig, main, mfd } = manual({ channels: 1, ioTimeoutMs: IO });
    mfd[0]!.push(built.conns[1]!.data);            // SYNC, data packet, SYNC: parks at the first SYNC with the rest queued
    const m = built.conns[0]!.data;
    // the main channel sends slowly but steadily (never silent for more than IO / 4): its
    // first barrier comes ~1.5 s later
    let at = 0;
    for (; at < 160; at += 8) {
      main.push(m.subarray(at, at + 8));
      await sleep(IO / 4);
    }
    main.push(m.subarray(at));
    main.push(null);
    mfd[0]!.push(null);
    const o = await Promise.race([mig.done, sleep(5000).then(() => null)]);
    assert.equal(o?.kind, 'completed', `${JSON.stringify(o)} ${errorOf(o)?.message}`);
    await mig.close();
  });

  test('after an idle period, a main channel that stalls in the middle of a checkpoint still times out (heartbeat off)', {

  }, async () => {
    const IO = 200;
    const built = coloOneCheckpoint(3000);
    const m = built.conns[0]!.data;
    const { mig, main } = manual({ ioTimeoutMs: IO, heartbeatTimeoutMs: 0 });
    const cp = m.length - 3000 - 12 - 40;          // somewhere inside checkpoint 1
    const initialEnd = built.at['checkpoint']!;
    assert.ok(initialEnd > 0 && initialEnd < cp);
    main.push(m.subarray(0, initialEnd));          // the initial migration: COLO starts, CHECKPOINT_READY
    await sleep(IO * 2);                           // idle between checkpoints (ignored: fine)
    main.push(m.subarray(initialEnd, cp));         // half a checkpoint, then silence
    const t0 = performance.now();
    const o = await Promise.race([mig.done, sleep(IO + 1500).then(() => null)]);
    assert.ok(o, `no outcome ${(performance.now() - t0).toFixed(0)} ms after the stall (ioTimeoutMs ${IO})`);
    assert.equal(errorOf(o)?.code, 'ERR_TIMEOUT');
    assert.equal(mig.committedCheckpoint, 0);
    await mig.close();
  });
});

describe('timeouts: the initial migration', () => {
  // fixed in b4a2bc2 (the initial migration has no heartbeat: before, it waited for ever)
  test('a main channel that stalls mid-record after being held at barriers past ioTimeoutMs still times out', async () => {
    const IO = 300;
    const built = precopyMultifd(1);
    const m = built.conns[0]!.data, ch = built.conns[1]!.data;
    const { mig, main, mfd } = manual({ channels: 1, ioTimeoutMs: IO, heartbeatTimeoutMs: 5000 });
    // main: everything up to the middle of the first device section, then silence (no EOF)
    main.push(m.subarray(0, built.at['devices']! + 20));
    const firstSync = MULTIFD_INIT_LEN + MULTIFD_PACKET_HEADER_LEN;
    await sleep(IO * 0.6);
    mfd[0]!.push(ch.subarray(0, firstSync));          // barrier 1 released before its timer
    await sleep(IO * 0.6);                              // main's socket timeout fires while held at barrier 2
    mfd[0]!.push(ch.subarray(firstSync));               // barrier 2 released before its timer
    const t0 = performance.now();
    const o = await Promise.race([mig.done, sleep(IO + 2000).then(() => null)]);
    assert.ok(o, `no outcome ${(performance.now() - t0).toFixed(0)} ms after main stalled (ioTimeoutMs ${IO})`);
    assert.equal(errorOf(o)?.code, 'ERR_TIMEOUT');
    await mig.close();
  });
});

// ---------------------------------------------------------------- multifd synchronisation

describe('multifd synchronisation', () => {
  test('a channel with one SYNC more than the main channel has barriers fails the migration instead of completing without its last packet', {

  }, async () => {
    const built = precopyMultifd(1);
    // insert a second SYNC packet right after the setup SYNC
    const ch = built.conns[1]!.data;
    const at = MULTIFD_INIT_LEN + MULTIFD_PACKET_HEADER_LEN;
    const extra = encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: 99, ramblock: '', offsets: [] });
    const mutated = Buffer.concat([ch.subarray(0, at), extra, ch.subarray(at)]);
    const r = await run({ conns: [built.conns[0]!, conn('multifd-0', mutated)], at: built.at }, { channels: 1 });
    assert.equal(errorOf(r.outcome)?.code, 'ERR_SYNC', `${JSON.stringify(r.outcome)}; pages of the unmatched packet ${(r.image ? imageBlockBytes(r.image.blocks[0]!).subarray(8 * P, 8 * P + 1) : Buffer.alloc(0)).toString('hex')}`);
  });
});

describe('multifd synchronisation in COLO', () => {
  // (was a todo: fuzz replay 2302494396 committed checkpoint 1 without its own page. Now a
  // packet with pages or a SYNC outside a RAM transfer is refused, and packet_num ties every
  // packet to its barrier round; here the damage is found before the initial migration ends.)
  test('a channel one SYNC ahead (its last SYNC of the initial migration parsed after the initial migration ended) fails before a checkpoint is committed on top', async () => {
    // main: a COLO initial migration with pages on one channel, then one checkpoint
    const m = precopyMain({ colo: true, mainPages: false });
    const b = m.b;
    const initialEnd = b.totalBytes;
    b.coloMessage(COLO_MESSAGE_CHECKPOINT_REQUEST).coloMessage(COLO_MESSAGE_VMSTATE_SEND);
    b.sectionEnd(2).ramEos().footer(2).eof();
    const blob = new StreamBuilder().sectionFull({ sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 }, Buffer.alloc(100, 0x5a)).eof().build();
    b.vmstateSize(blob.length).raw(blob);
    const main = b.build();
    // channel: SYNC (setup), an extra SYNC, the initial round's data packet and SYNC, then checkpoint 1's
    let num = 0;
    const sync = () => encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: num++, ramblock: '', offsets: [] });
    const data = (fill: number, page: number) => Buffer.concat([encodeMultiFDPacketHeader({ flags: 0, pagesAlloc: 128, normalPages: 1, nextPacketSize: P, packetNum: num++, ramblock: 'pc.ram', offsets: [page * P] }), Buffer.alloc(P, fill)]);
    const head = Buffer.concat([encodeMultiFDInit({ id: 0 }), sync(), sync()]);
    const initialRest = Buffer.concat([data(0x60, 8), sync()]);
    const checkpoint1 = Buffer.concat([data(0x70, 10), sync()]);
    const replies: number[] = [];
    // one staging slot: after the data packet the channel waits for its page write, so the
    // initial round's last SYNC is parsed only after the main channel finished the initial migration
    const mig = new IncomingMigration({ pool, log: silentLogger, multifdChannels: 1, ioTimeoutMs: 5000, heartbeatTimeoutMs: 0, slotsPerChannel: 1 });
    const mt = new MemTransport(() => undefined).pause();
    mig.attachMain(mt, Buffer.alloc(0));
    const ct = new MemTransport(() => undefined).pause();
    mig.attachMultifd(ct, Buffer.alloc(0));
    ct.push(Buffer.concat([head, initialRest]));
    mt.push(main.subarray(0, initialEnd));
    for (let i = 0; i < 100 && mig.committedCheckpoint < 0; i++) await sleep(10);
    await sleep(50);
    mt.push(main.subarray(initialEnd));       // checkpoint 1
    ct.push(checkpoint1);
    const o = await Promise.race([mig.done, sleep(1500).then(() => null)]);
    const committed = mig.committedCheckpoint;
    await mig.close();
    assert.ok(committed <= 0, `checkpoint 1 must not be committed (outcome ${JSON.stringify(o)})`);
    assert.equal(errorOf(o)?.code, 'ERR_SYNC');
  });
});

describe('shutdown', () => {
  // (was a todo: an intermittent uncaught 'error' from piscina after close(). PagePool.close()
  // now waits for its in-flight writes before destroy(), and listens for 'error' as a backstop.)
  test('close() right after a failure, with page writes still in flight on its own pool, does not throw later', async () => {
    const uncaught: Error[] = [];
    const onUncaught = (e: Error) => { uncaught.push(e); };
    process.on('uncaughtException', onUncaught);
    try {
      for (let round = 0; round < 10 && uncaught.length === 0; round++) {
        const CH = 4;
        const mig = new IncomingMigration({ log: silentLogger, multifdChannels: CH, threads: 2 });     // its own pool, as the CLI has
        // main: MEM_SIZE, the setup barrier, then a bad record right after it: the migration
        // fails while every channel has its page writes in flight
        const main = Buffer.concat([new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2').sectionStart(RAM)
          .ramMemSize([{ idstr: 'pc.ram', usedLength: 64 << 20 }]).ramEos().footer(2).build(), Buffer.from([0x42])]);
        const mt = new MemTransport(() => undefined).pause();
        mig.attachMain(mt, Buffer.alloc(0));
        for (let id = 0; id < CH; id++) {
          const parts = [encodeMultiFDInit({ id }), encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: 0, ramblock: '', offsets: [] })];
          for (let k = 0; k < 6; k++) {
            const first = (id * 6 + k) * 128;
            parts.push(encodeMultiFDPacketHeader({ flags: 0, pagesAlloc: 128, normalPages: 128, nextPacketSize: 128 * P, packetNum: k + 1, ramblock: 'pc.ram', offsets: Array.from({ length: 128 }, (_, i) => (first + i) * P) }), Buffer.alloc(128 * P, k + 1));
          }
          const ct = new MemTransport(() => undefined).pause();
          mig.attachMultifd(ct, Buffer.alloc(0));
          ct.push(Buffer.concat(parts));
        }
        mt.push(main);
        const o = await mig.done;
        assert.equal(errorOf(o)?.code, 'ERR_UNKNOWN_SECTION');
        await mig.close();
      }
      await sleep(300);
    } finally {
      process.off('uncaughtException', onUncaught);
    }
    assert.deepEqual(uncaught.map((e) => e.message), []);
  });
});

describe('multifd synchronisation in precopy', () => {
  // (fixed in 3813cb9 for this shape; the fuzzer still finds one that completes with stale
  // pages: node dist/bench/fuzz.js --replay 1400875065, known issue 'syncAhead')
  test('an extra SYNC does not let a precopy migration complete with a stale page', async () => {
    // 7.2 per-section: START (barrier 1), PART with page 8 = 0x61 (barrier 2), END with page 8 re-sent as 0x62 (barrier 3)
    const b = new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2').sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(2)
      .sectionPart(2).ramEos().footer(2).sectionEnd(2).ramEos().footer(2);
    new DeviceState({ seed: 3 }).writeFullSections(b);
    const main = b.eof().vmdescription(new DeviceState({ seed: 3 }).vmdescription()).build();
    let num = 0;
    const sync = () => encodeMultiFDPacketHeader({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: num++, ramblock: '', offsets: [] });
    const data = (fill: number) => Buffer.concat([encodeMultiFDPacketHeader({ flags: 0, pagesAlloc: 128, normalPages: 1, nextPacketSize: P, packetNum: num++, ramblock: 'pc.ram', offsets: [8 * P] }), Buffer.alloc(P, fill)]);
    const good = Buffer.concat([encodeMultiFDInit({ id: 0 }), sync(), data(0x61), sync(), data(0x62), sync()]);
    const withExtra = Buffer.concat([good.subarray(0, MULTIFD_INIT_LEN + MULTIFD_PACKET_HEADER_LEN), sync(), good.subarray(MULTIFD_INIT_LEN + MULTIFD_PACKET_HEADER_LEN)]);
    const runOne = async (ch: Buffer) => {
      const mig = new IncomingMigration({ pool, log: silentLogger, multifdChannels: 1, ioTimeoutMs: 5000, slotsPerChannel: 1 });
      const mt = new MemTransport(() => undefined).pause();
      mig.attachMain(mt, Buffer.alloc(0));
      const ct = new MemTransport(() => undefined).pause();
      mig.attachMultifd(ct, Buffer.alloc(0));
      ct.push(ch);
      mt.push(main);
      const o = await mig.done;
      await sleep(50);
      const img = await mig.committedImage();
      const page8 = img ? imageBlockBytes(img.blocks[0]!)[8 * P] : undefined;
      await mig.close();
      return { o, page8 };
    };
    const ok = await runOne(good);
    assert.equal(ok.o.kind, 'completed');
    assert.equal(ok.page8, 0x62, 'the unmutated stream ends with the re-sent page');
    const bad = await runOne(withExtra);
    assert.ok(bad.o.kind !== 'completed' || bad.page8 === 0x62, `completed with page 8 = 0x${bad.page8?.toString(16)} (the stale first version)`);
    assert.equal(errorOf(bad.o)?.code, 'ERR_SYNC');
  });
});
