// SyntheticSource over real sockets on 127.0.0.1. A capture server records every connection;
// a small reference reader written from the spec (not from the sender) parses the captures,
// replays pages with the barrier rules of spec §3 and §7.3, and compares guest memory with the
// model after the migration and after every checkpoint.

import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';
import {
  MULTIFD_FLAG_SYNC,
  MULTIFD_PACKET_HEADER_LEN,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
  TARGET_PAGE_SIZE,
} from '../../src/wire/constants.js';
import {
  DeviceState,
  MemoryModel,
  SyntheticSource,
  type DeviceSpec,
  type SyntheticSourceOptions,
} from '../../src/sender/index.js';

// --- capture server ---------------------------------------------------------------------

interface Captured {
  main: Buffer;
  /** By multifd channel id. */
  channels: Buffer[];
  total: number;
  killed: boolean;
  source: SyntheticSource;
  /** Model memory after the migration, then after each checkpoint. */
  snapshots: Buffer[][];
  /** Session bytes before each checkpoint's first byte. */
  starts: number[];
  /** Main-channel bytes before each checkpoint's first byte. */
  mainStarts: number[];
  infos: Array<{ dirtyPages: number; zeroPages: number; bytes: number; blobLength: number }>;
}

/** Run a source against a recording server that answers every COLO message up front. */
async function capture(opts: Omit<SyntheticSourceOptions, 'port'>): Promise<Captured> {
  const conns: Buffer[][] = [];
  const closed: Array<Promise<void>> = [];
  let total = 0;
  const replies: number[] = [];
  if (opts.colo === true) {
    replies.push(0);
    for (let i = 0; i < (opts.checkpoints ?? 0); i++) replies.push(2, 5, 6);
  }
  const server = net.createServer((s) => {
    const chunks: Buffer[] = [];
    conns.push(chunks);
    let answered = false;
    closed.push(new Promise((resolve) => s.on('close', () => resolve())));
    s.on('error', () => undefined);
    s.on('data', (c: Buffer) => {
      chunks.push(c);
      total += c.length;
      if (!answered && Buffer.concat(chunks).length >= 4) {
        answered = true;
        if (Buffer.concat(chunks).readUInt32BE(0) === 0x5145564d && replies.length > 0) {
          const out = Buffer.alloc(4 * replies.length);
          replies.forEach((v, i) => out.writeUInt32BE(v, 4 * i));
          s.write(out);
        }
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  const snapshots: Buffer[][] = [];
  const starts: number[] = [];
  const mainStarts: number[] = [];
  const infos: Captured['infos'] = [];
  const source = new SyntheticSource({
    ...opts, port,
    onCheckpoint: async (info) => {
      snapshots.push(info.model.snapshot());
      infos.push({ dirtyPages: info.dirtyPages, zeroPages: info.zeroPages, bytes: info.bytes, blobLength: info.blobLength });
      await opts.onCheckpoint?.(info);
    },
  });
  source.on('precopy', () => snapshots.push(source.model.snapshot()));
  source.on('checkpointStart', (e: { bytesBefore: number; mainBytesBefore: number }) => {
    starts.push(e.bytesBefore);
    mainStarts.push(e.mainBytesBefore);
  });
  const result = await source.run();
  await Promise.all(closed);
  // Connections may still be arriving in `closed` order; wait once more for late pushes.
  await Promise.all(closed);
  server.close();
  let main = Buffer.alloc(0);
  const channels: Buffer[] = [];
  for (const chunks of conns) {
    const b = Buffer.concat(chunks);
    if (b.length >= 4 && b.readUInt32BE(0) === 0x5145564d) main = b;
    else if (b.length >= 25) channels[b[24]!] = b;
  }
  return { main, channels, total, killed: result.killed, source, snapshots, starts, mainStarts, infos };
}

// --- reference reader (spec §1.3, §2.2, §4, §5.4) ---------------------------------------------

class Cursor {
  pos = 0;
  constructor(readonly b: Buffer) {}
  u8(): number { return this.b[this.pos++]!; }
  u16(): number { const v = this.b.readUInt16BE(this.pos); this.pos += 2; return v; }
  u32(): number { const v = this.b.readUInt32BE(this.pos); this.pos += 4; return v; }
  u64(): number { const hi = this.u32(); return hi * 2 ** 32 + this.u32(); }
  take(n: number): Buffer { assert(this.pos + n <= this.b.length, 'read past end'); const v = this.b.subarray(this.pos, this.pos + n); this.pos += n; return v; }
  str(): string { return this.take(this.u8()).toString('latin1'); }
  get left(): number { return this.b.length - this.pos; }
}

interface Packet {
  flags: number; pagesAlloc: number; normal: number; nextPacketSize: number; packetNum: number; zero: number;
  ramblock: Buffer; offsets: number[]; payload: Buffer; header: Buffer;
}

function parseChannel(b: Buffer): { id: number; packets: Packet[] } {
  const r = new Cursor(b);
  assert.equal(r.u32(), 0x11223344);
  assert.equal(r.u32(), 1);
  r.take(16);
  const id = r.u8();
  r.take(39);
  const packets: Packet[] = [];
  while (r.left > 0) {
    const header = r.take(MULTIFD_PACKET_HEADER_LEN);
    const h = new Cursor(header);
    assert.equal(h.u32(), 0x11223344);
    assert.equal(h.u32(), 1);
    const flags = h.u32(), pagesAlloc = h.u32(), normal = h.u32(), nextPacketSize = h.u32(), packetNum = h.u64();
    const zero = h.u32();
    h.take(28);
    const ramblock = h.take(256);
    const offsets: number[] = [];
    for (let k = 0; k < 128; k++) offsets.push(h.u64());
    assert(normal + zero <= pagesAlloc && pagesAlloc <= 128);
    packets.push({ flags, pagesAlloc, normal, nextPacketSize, packetNum, zero, ramblock, offsets, header,
      payload: r.take(normal * TARGET_PAGE_SIZE) });
  }
  return { id, packets };
}

type Ev =
  | { t: 'page'; block: string; offset: number; data: Buffer | null }
  | { t: 'barrier' }
  | { t: 'cmd'; cmd: number }
  | { t: 'commit'; blob: Buffer | null };

interface MainParse {
  events: Ev[];
  blocks: Array<{ idstr: string; usedLength: number }>;
  vmdesc: string | undefined;
  /** FULL sections of the precopy tail, as [id, body]. */
  devices: Array<[number, Buffer]>;
}

function parseMain(b: Buffer, o: { multifd: boolean; perRound: boolean; bodyLen: Map<number, number>; checkpoints: number }): MainParse {
  const r = new Cursor(b);
  const events: Ev[] = [];
  const blocks: MainParse['blocks'] = [];
  const devices: MainParse['devices'] = [];
  let last: string | undefined;
  let ramId = -1;
  const footer = (id: number): void => { assert.equal(r.u8(), 0x7e); assert.equal(r.u32(), id); };
  const ramBody = (): void => {
    for (;;) {
      const hi = r.u32(), lo = r.u32();
      const flags = lo & 0xfff, addr = hi * 2 ** 32 + (lo - flags);
      if (flags & RAM_SAVE_FLAG_MEM_SIZE) {
        for (let left = addr; left > 0;) { const idstr = r.str(), usedLength = r.u64(); blocks.push({ idstr, usedLength }); left -= usedLength; }
        continue;
      }
      if (flags === RAM_SAVE_FLAG_EOS) { if (o.multifd && !o.perRound) events.push({ t: 'barrier' }); return; }
      if (flags === RAM_SAVE_FLAG_MULTIFD_FLUSH) { assert(o.perRound, 'MULTIFD_FLUSH in a per-section stream'); events.push({ t: 'barrier' }); continue; }
      if (!(flags & RAM_SAVE_FLAG_CONTINUE)) last = r.str();
      assert(last !== undefined, 'CONTINUE without a block');
      const kind = flags & ~RAM_SAVE_FLAG_CONTINUE;
      if (kind === RAM_SAVE_FLAG_ZERO) { assert.equal(r.u8(), 0); events.push({ t: 'page', block: last, offset: addr, data: null }); }
      else if (kind === RAM_SAVE_FLAG_PAGE) events.push({ t: 'page', block: last, offset: addr, data: r.take(TARGET_PAGE_SIZE) });
      else assert.fail(`unexpected ram flags 0x${flags.toString(16)}`);
    }
  };
  assert.equal(r.u32(), 0x5145564d);
  assert.equal(r.u32(), 3);
  assert.equal(r.u8(), 0x07);
  r.take(r.u32());
  let vmdesc: string | undefined;
  for (let done = false; !done;) {
    const type = r.u8();
    if (type === 0x08) { const cmd = r.u16(); r.take(r.u16()); events.push({ t: 'cmd', cmd }); }
    else if (type === 0x01) {
      ramId = r.u32();
      assert.equal(r.str(), 'ram'); assert.equal(r.u32(), 0); assert.equal(r.u32(), 4);
      ramBody(); footer(ramId);
    } else if (type === 0x02 || type === 0x03) { assert.equal(r.u32(), ramId); ramBody(); footer(ramId); }
    else if (type === 0x04) {
      const id = r.u32(); r.str(); r.u32(); r.u32();
      devices.push([id, r.take(o.bodyLen.get(id)!)]);
      footer(id);
    } else if (type === 0x00) {
      if (r.left > 0 && r.b[r.pos] === 0x06) { r.u8(); vmdesc = r.take(r.u32()).toString('utf8'); }
      events.push({ t: 'commit', blob: null });
      done = true;
    } else assert.fail(`unexpected record type ${type}`);
  }
  for (let k = 0; k < o.checkpoints; k++) {
    assert.equal(r.u32(), 1, 'CHECKPOINT_REQUEST');
    assert.equal(r.u32(), 3, 'VMSTATE_SEND');
    for (let done = false; !done;) {
      const type = r.u8();
      if (type === 0x08) { const cmd = r.u16(); r.take(r.u16()); events.push({ t: 'cmd', cmd }); }
      else if (type === 0x03) { assert.equal(r.u32(), ramId); ramBody(); footer(ramId); }
      else if (type === 0x00) done = true;
      else assert.fail(`unexpected record type ${type} in a checkpoint`);
    }
    assert.equal(r.u32(), 4, 'VMSTATE_SIZE');
    events.push({ t: 'commit', blob: r.take(r.u64()) });
  }
  assert.equal(r.left, 0, 'trailing bytes on the main channel');
  return { events, blocks, vmdesc, devices };
}

/** Replay main records and multifd packets with the barrier rule; check memory at each commit. */
function replay(cap: Captured, o: { multifd: boolean; perRound: boolean; checkpoints: number }): { main: MainParse; packets: Packet[][] } {
  const bodyLen = new Map(cap.source.devices.sections.map((s) => [s.sectionId, s.body.length]));
  const main = parseMain(cap.main, { ...o, bodyLen });
  const packets = cap.channels.map((c, id) => { const p = parseChannel(c); assert.equal(p.id, id); return p.packets; });
  const mem = new Map(main.blocks.map((b) => [b.idstr, Buffer.alloc(b.usedLength)]));
  const next = packets.map(() => 0);
  let commits = 0;
  for (const e of main.events) {
    if (e.t === 'page') {
      const m = mem.get(e.block)!;
      if (e.data === null) m.fill(0, e.offset, e.offset + TARGET_PAGE_SIZE); else e.data.copy(m, e.offset);
    } else if (e.t === 'barrier') {
      for (let c = 0; c < packets.length; c++) {
        for (let done = false; !done;) {
          const p = packets[c]![next[c]!++];
          assert(p !== undefined, `multifd/${c}: no SYNC packet for a barrier`);
          const m = mem.get(p.ramblock.toString('latin1').replace(/\0.*$/s, ''));
          for (let k = 0; k < p.normal + p.zero; k++) {
            if (k < p.normal) p.payload.copy(m!, p.offsets[k]!, k * TARGET_PAGE_SIZE, (k + 1) * TARGET_PAGE_SIZE);
            else m!.fill(0, p.offsets[k]!, p.offsets[k]! + TARGET_PAGE_SIZE);
          }
          done = (p.flags & MULTIFD_FLAG_SYNC) !== 0;
        }
      }
    } else if (e.t === 'commit') {
      const want = cap.snapshots[commits]!;
      main.blocks.forEach((b, i) => assert(mem.get(b.idstr)!.equals(want[i]!), `commit ${commits}: block ${b.idstr} differs`));
      commits++;
    }
  }
  assert.equal(commits, 1 + o.checkpoints);
  // Only 7.2's empty follow-up packet (spec §2.9) may come after a channel's last SYNC.
  packets.forEach((p, c) => assert(p.slice(next[c]).every((x) => x.normal + x.zero === 0 && x.flags === 0),
    `multifd/${c}: pages after the last barrier`));
  return { main, packets };
}

const small = { memory: { ramMiB: 2 } };

for (const cfg of [
  { name: '7.2 without multifd', layout: '7.2', channels: 0 },
  { name: '7.2 with 3 channels and every quirk', layout: '7.2', channels: 3, quirkRate: 0.5 },
  { name: '10.x with 4 channels, per-round, zero pages in packets', layout: '10.x', channels: 4 },
  { name: '10.x with 2 channels, per-section, legacy zero pages', layout: '10.x', channels: 2, syncScheme: 'per-section', zeroPagesInMultifd: false },
  { name: '10.x without multifd', layout: '10.x', channels: 0 },
] as const) {
  test(`migrates and checkpoints guest memory exactly: ${cfg.name}`, { timeout: 60_000 }, async () => {
    const cap = await capture({
      ...small, ...cfg, seed: 11, colo: true, checkpoints: 4, iterations: 3,
      precopyWorkload: { pages: 80 }, workload: { pages: 300 },
      connectOrder: cfg.channels === 0 ? undefined : [...Array(cfg.channels).keys()].reverse(),
    });
    assert.equal(cap.killed, false);
    const perRound = cfg.layout === '10.x' && !('syncScheme' in cfg);
    const { main, packets } = replay(cap, { multifd: cfg.channels > 0, perRound, checkpoints: 4 });
    assert.equal(cap.infos.length, 4);
    for (const i of cap.infos) assert.equal(i.dirtyPages, 300);
    assert(cap.infos.some((i) => i.zeroPages > 0), 'some checkpoint sends zero pages');
    assert.equal(cap.total, cap.source.bytesSent);
    // One SYNC per channel per barrier, and every channel opens with a SYNC packet without pages.
    const barriers = main.events.filter((e) => e.t === 'barrier').length;
    for (const p of packets) {
      assert.equal(p.filter((x) => x.flags & MULTIFD_FLAG_SYNC).length, barriers);
      assert.equal(p[0]!.flags, MULTIFD_FLAG_SYNC);
      assert.equal(p[0]!.normal, 0);
    }
    if (cfg.channels > 0 && (cfg.layout === '7.2' || !('zeroPagesInMultifd' in cfg))) {
      // 7.2 and 10.x-legacy send no PAGE records with multifd; 10.x with multifd zero pages sends none at all.
      const pageRecords = main.events.filter((e) => e.t === 'page');
      assert(pageRecords.every((e) => e.t === 'page' && e.data === null));
      if (cfg.layout === '10.x') assert.equal(pageRecords.length, 0);
    }
    const switchovers = main.events.filter((e) => e.t === 'cmd' && e.cmd === 11).length;
    assert.equal(switchovers, cfg.layout === '10.x' ? 5 : 0);
    assert.equal(main.events.filter((e) => e.t === 'cmd' && e.cmd === 8).length, 1, 'ENABLE_COLO once');
    // The VMDESCRIPTION describes the FULL sections that were sent.
    const desc = JSON.parse(main.vmdesc!) as { page_size: number; devices: Array<{ name: string; instance_id: number }> };
    assert.equal(desc.page_size, 4096);
    assert.equal(desc.devices.length, main.devices.length);
  });
}

test('7.2 layout shows every quirk of spec §2.9; 10.x shows none', { timeout: 60_000 }, async () => {
  const base = { ...small, seed: 5, channels: 2, iterations: 3, precopyWorkload: { pages: 200 } } as const;
  const old = await capture({ ...base, layout: '7.2', quirkRate: 1 });
  const p72 = replay(old, { multifd: true, perRound: false, checkpoints: 0 }).packets;
  const all72 = p72.flat().sort((a, b) => a.packetNum - b.packetNum);
  const syncs = all72.filter((p) => p.flags & MULTIFD_FLAG_SYNC);
  assert(syncs.every((p) => p.pagesAlloc === 128), 'pages_alloc 128 in SYNC packets');
  const syncWithPages = p72.some((ch) => ch.some((p, i) =>
    (p.flags & MULTIFD_FLAG_SYNC) !== 0 && p.normal > 0
    && ch[i + 1]?.flags === 0 && ch[i + 1]?.normal === 0 && ch[i + 1]?.packetNum === p.packetNum));
  assert(syncWithPages, 'a SYNC packet with pages, then an empty packet with the same packet_num');
  const empties = all72.filter((p) => p.normal === 0);
  assert(empties.some((p) => p.nextPacketSize > 0 && p.ramblock[0] !== 0), 'stale next_packet_size and ramblock');
  assert(all72.some((p) => p.normal > 0 && p.normal < 128 && p.offsets.slice(p.normal).some((v) => v !== 0)), 'stale offsets');
  assert(hasResend(all72), 'last page of a full packet resent first in the next');

  const tidy = await capture({ ...base, layout: '7.2', quirks: false });
  const pt = replay(tidy, { multifd: true, perRound: false, checkpoints: 0 }).packets.flat();
  assert(!hasResend(pt.sort((a, b) => a.packetNum - b.packetNum)));
  assert(pt.every((p) => p.normal > 0 || (p.flags & MULTIFD_FLAG_SYNC) !== 0));
  assert(pt.filter((p) => p.normal === 0).every((p) => p.nextPacketSize === 0 && p.pagesAlloc === 0 && p.ramblock.every((x) => x === 0)));

  const up = await capture({ ...base, layout: '10.x' });
  const p10 = replay(up, { multifd: true, perRound: true, checkpoints: 0 }).packets.flat().sort((a, b) => a.packetNum - b.packetNum);
  for (const p of p10) {
    if (p.flags & MULTIFD_FLAG_SYNC) {
      assert.equal(p.flags, MULTIFD_FLAG_SYNC);
      assert.deepEqual(p.header.subarray(12, 24), Buffer.alloc(12), 'SYNC: pages_alloc, normal_pages, next_packet_size zero');
      assert.deepEqual(p.header.subarray(32), Buffer.alloc(MULTIFD_PACKET_HEADER_LEN - 32), 'SYNC: the rest zero');
    } else {
      assert(p.normal + p.zero > 0, 'no empty data packets');
      assert.equal(p.pagesAlloc, 128);
      assert.equal(p.nextPacketSize, p.normal * TARGET_PAGE_SIZE);
      assert(p.offsets.slice(p.normal + p.zero).every((v) => v === 0), 'unused slots zero');
    }
  }
  assert(p10.some((p) => p.zero > 0), 'zero pages travel in packets');
  assert(!hasResend(p10));
  // Packet numbers are one global counter without repeats.
  assert.equal(new Set(p10.map((p) => p.packetNum)).size, p10.length);
});

function hasResend(sorted: Packet[]): boolean {
  const data = sorted.filter((p) => p.normal > 0);
  return data.some((p, i) => {
    const q = data[i + 1];
    return p.normal === 128 && q !== undefined && q.ramblock.equals(p.ramblock) && q.offsets[0] === p.offsets[127];
  });
}

// --- exact checkpoint bytes for a tiny guest ---------------------------------------------------

const TINY_DEVICES: DeviceSpec[] = [
  { sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2, style: 'vmsd', size: 24 },
  { sectionId: 3, idstr: 'cpu', instanceId: 0, versionId: 12, style: 'vmsd', size: 64, subsections: 1 },
  { sectionId: 46, idstr: 'globalstate', instanceId: 0, versionId: 1, style: 'old', size: 20 },
];

function tinySource(layout: '7.2' | '10.x', channels: number): Omit<SyntheticSourceOptions, 'port'> {
  return {
    layout, channels, colo: true, checkpoints: 1, iterations: 2, workload: { pages: 2 },
    model: new MemoryModel({ seed: 3, blocks: [{ idstr: 'pc.ram', usedLength: 4 * TARGET_PAGE_SIZE }], zeroOnDirty: 0.5 }),
    devices: new DeviceState({ seed: 4, devices: TINY_DEVICES }),
  };
}

const be32 = (v: number): Buffer => { const b = Buffer.alloc(4); b.writeUInt32BE(v); return b; };
const be64 = (v: number): Buffer => { const b = Buffer.alloc(8); b.writeUInt32BE(Math.floor(v / 2 ** 32)); b.writeUInt32BE(v >>> 0, 4); return b; };

test('a 7.2 checkpoint of a tiny guest is byte-exact on the main channel (spec §5.4)', { timeout: 30_000 }, async () => {
  let dirty: number[] = [];
  const opts = tinySource('7.2', 0);
  const cap = await capture({ ...opts, onCheckpoint: (i) => { dirty = [...i.pages.blocks[0]!]; } });
  const start = cap.mainStarts[0]!;
  assert.equal(start, cap.starts[0]);
  const image = cap.snapshots[1]![0]!;
  const parts: Buffer[] = [be32(1), be32(3), Buffer.from([3]), be32(2)];
  assert.equal(dirty.length, 2);
  for (const p of dirty) {
    const page = image.subarray(p * TARGET_PAGE_SIZE, (p + 1) * TARGET_PAGE_SIZE);
    const isZero = page.every((x) => x === 0);
    // The precopy already named pc.ram, so the checkpoint's first record is a CONTINUE (§4.6.4).
    parts.push(be64(p * TARGET_PAGE_SIZE + (isZero ? 0x22 : 0x28)), isZero ? Buffer.from([0]) : page);
  }
  const blob = opts.devices!.coloBlob();
  parts.push(be64(0x10), Buffer.from([0x7e]), be32(2), Buffer.from([0]), be32(4), be64(blob.length), blob);
  assert.deepEqual(cap.main.subarray(start), Buffer.concat(parts));
  // The blob: three FULL sections and EOF, ids and bodies as the devices have them.
  const r = new Cursor(blob);
  for (const s of opts.devices!.sections) {
    assert.equal(r.u8(), 0x04); assert.equal(r.u32(), s.sectionId); assert.equal(r.str(), s.idstr);
    assert.equal(r.u32(), s.instanceId); assert.equal(r.u32(), s.versionId);
    assert.deepEqual(r.take(s.body.length), s.body);
    assert.equal(r.u8(), 0x7e); assert.equal(r.u32(), s.sectionId);
  }
  assert.equal(r.u8(), 0x00);
  assert.equal(r.left, 0);
});

test('a 10.x multifd checkpoint: SWITCHOVER_START, two MULTIFD_FLUSH (the scan wraps twice), EOS', { timeout: 30_000 }, async () => {
  const opts = tinySource('10.x', 1);
  const cap = await capture(opts);
  const blob = opts.devices!.coloBlob();
  // The main channel carries no pages: the scan starts past the last page, wraps (flush 1),
  // sends both pages through multifd, and the final empty scan wraps again (flush 2).
  assert.deepEqual(cap.main.subarray(cap.mainStarts[0]!), Buffer.concat([
    be32(1), be32(3), Buffer.from([0x08, 0x00, 0x0b, 0x00, 0x00]), Buffer.from([3]), be32(2),
    be64(0x200), be64(0x200), be64(0x10), Buffer.from([0x7e]), be32(2), Buffer.from([0]),
    be32(4), be64(blob.length), blob,
  ]));
  replay(cap, { multifd: true, perRound: true, checkpoints: 1 });
});

// --- fault injection -------------------------------------------------------------------------

test('killAt cuts the session at the exact byte, across channels', { timeout: 60_000 }, async () => {
  const base = { ...small, seed: 9, layout: '7.2', channels: 2, colo: true, checkpoints: 3, iterations: 2, workload: { pages: 200 } } as const;
  const ref = await capture(base);
  assert.equal(ref.killed, false);
  const cpBytes = ref.infos[1]!.bytes;
  for (const byteOffset of [0, 3, 4, 777, 70_000, cpBytes - 1]) {
    const cut = await capture({ ...base, killAt: { checkpoint: 1, byteOffset } });
    assert.equal(cut.killed, true);
    assert.equal(cut.total, ref.starts[1]! + byteOffset, `cut at ${byteOffset}`);
    assert.equal(cut.infos.length, 1, 'only checkpoint 0 committed');
    // Every connection got a prefix of what it gets in the uncut run.
    assert.deepEqual(cut.main, ref.main.subarray(0, cut.main.length));
    cut.channels.forEach((c, id) => assert.deepEqual(c, ref.channels[id]!.subarray(0, c.length)));
  }
  const early = await capture({ ...base, killAt: { checkpoint: 'precopy', byteOffset: 100_001 } });
  assert.equal(early.killed, true);
  assert.equal(early.total, 100_001);
  assert.equal(early.infos.length, 0);
});

test('rejects inconsistent options with RangeError', () => {
  const bad: Array<Partial<SyntheticSourceOptions>> = [
    { channels: 17 }, { layout: '7.2', syncScheme: 'per-round' }, { layout: '7.2', zeroPagesInMultifd: true },
    { layout: '7.2', switchoverStart: true }, { checkpoints: 2 }, { quirkRate: 2 }, { uuid: new Uint8Array(3) },
    { killAt: { checkpoint: -1, byteOffset: 0 } }, { channels: 2, connectOrder: [0, 0] },
  ];
  for (const o of bad) assert.throws(() => new SyntheticSource({ port: 1, ...o }), RangeError, JSON.stringify(o));
  assert.throws(() => new SyntheticSource({ port: 0 }), RangeError);
});
