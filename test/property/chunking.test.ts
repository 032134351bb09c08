// Any chunking of a stream parses exactly like one chunk: same events, same errors, same memory.
// Streams are drawn at random too, from builders that follow QEMU's save side.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { MigrationError } from '../../src/errors.js';
import { WRITE_GUEST, runWriteTask, type WriteMode } from '../../src/memory/page-writer.js';
import { RAMBlockList, type RAMBlock } from '../../src/memory/ram-block.js';
import { DEFAULT_LIMITS } from '../../src/migration/limits.js';
import { MultiFDChannel, type ChannelSink } from '../../src/migration/multifd-channel.js';
import { RamSectionParser, type RamSink } from '../../src/migration/ram-section.js';
import { VmStateParser, type SectionHeader, type VmStateSink } from '../../src/migration/vmstate-stream.js';
import { encodeMultiFDInit, MultiFDPacketImage } from '../../src/sender/multifd-builder.js';
import { StreamBuilder } from '../../src/sender/stream-builder.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import { MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MULTIFD_FLAG_SYNC } from '../../src/wire/constants.js';

const P = 4096;
const RUNS = Number(process.env.FUZZ_RUNS ?? 200);
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 24 * P }, { idstr: '0000:00:02.0/vga.vram', usedLength: 6 * P }];
const VMDESC = '{"page_size":4096,"devices":[{"name":"timer","instance_id":0}]}';

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 37 + i * 13 + (i >> 6)) & 0xff;
  return b;
}

function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0, 0); return b; }

/** Splits at the given positions (any order, duplicates and out-of-range values ignored). */
function splitAt(b: Buffer, cuts: number[]): Buffer[] {
  const at = [...new Set(cuts.filter((c) => c > 0 && c < b.length))].sort((x, y) => x - y);
  const out: Buffer[] = [];
  let from = 0;
  for (const c of at) { out.push(b.subarray(from, c)); from = c; }
  out.push(b.subarray(from));
  return out;
}

/**
 * Cut positions for a stream of `len` bytes: up to 40 random cuts anywhere, plus a window of
 * up to 3000 bytes cut into runs of 1..32-byte chunks (headers split at every byte somewhere).
 */
type Cutter = (len: number) => number[];
const cutterArb: fc.Arbitrary<Cutter> = fc.record({
  anywhere: fc.array(fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), { maxLength: 40 }),
  dense: fc.option(fc.record({
    at: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }),
    width: fc.integer({ min: 1, max: 3000 }),
    sizes: fc.array(fc.integer({ min: 1, max: 32 }), { minLength: 1, maxLength: 8 }),
  })),
}).map(({ anywhere, dense }) => (len: number) => {
  const out = anywhere.map((f) => Math.floor(f * len));
  if (dense) {
    const from = Math.floor(dense.at * len);
    for (let at = from, k = 0; at < Math.min(len, from + dense.width); k++) { at += dense.sizes[k % dense.sizes.length]!; out.push(at); }
  }
  return out;
});

function hashBlocks(blocks: RAMBlockList): string[] {
  return blocks.blocks.map((b) => `${b.idstr} ${createHash('sha256').update(Buffer.concat(b.guest.views)).digest('hex')}`);
}

// ---------------------------------------------------------------- main channel

type RamOp = { t: 'page'; block: number; page: number; seed: number } | { t: 'zero'; block: number; page: number; fill: number } | { t: 'flush' };
type Piece = { k: 'raw'; b: Uint8Array } | { k: 'tildes'; n: number } | { k: 'other'; id: number } | { k: 'own'; next: number };
interface MainSpec { sections: RamOp[][]; devices: Piece[][]; commands: boolean }

const ramOpArb: fc.Arbitrary<RamOp> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ t: fc.constant('page' as const), block: fc.integer({ min: 0, max: 1 }), page: fc.nat(), seed: fc.nat(255) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('zero' as const), block: fc.integer({ min: 0, max: 1 }), page: fc.nat(), fill: fc.constantFrom(0, 0, 0, 0x5a) }) },
  { weight: 1, arbitrary: fc.constant({ t: 'flush' as const }) },
);

// Device bodies with 0x7E bytes and fake footers: `7E be32(other id)`, and `7E be32(own id)`
// followed by a byte that cannot start a record (the only kind a validating scan can skip).
const pieceArb: fc.Arbitrary<Piece> = fc.oneof(
  fc.record({ k: fc.constant('raw' as const), b: fc.uint8Array({ maxLength: 40 }) }),
  fc.record({ k: fc.constant('tildes' as const), n: fc.integer({ min: 1, max: 6 }) }),
  fc.record({ k: fc.constant('other' as const), id: fc.nat(0xffff) }),
  fc.record({ k: fc.constant('own' as const), next: fc.constantFrom(0x05, 0x06, 0x07, 0x09, 0x7e, 0xff, 0x20) }),
);

const mainSpecArb: fc.Arbitrary<MainSpec> = fc.record({
  sections: fc.array(fc.array(ramOpArb, { maxLength: 6 }), { minLength: 1, maxLength: 4 }),
  devices: fc.array(fc.array(pieceArb, { maxLength: 8 }), { maxLength: 4 }),
  commands: fc.boolean(),
});

const DEVICE_NAMES = ['timer', 'cpu', '0000:00:01.1/ide', 'globalstate'];
function deviceHeader(i: number): { sectionId: number; idstr: string; instanceId: number; versionId: number } {
  return { sectionId: 10 + i, idstr: DEVICE_NAMES[i]!, instanceId: 0, versionId: 1 + i };
}

function deviceBody(pieces: Piece[], own: number): Buffer {
  return Buffer.concat(pieces.map((p) => {
    switch (p.k) {
      case 'raw': return Buffer.from(p.b);
      case 'tildes': return Buffer.alloc(p.n, 0x7e);
      case 'other': return Buffer.concat([Buffer.from([0x7e]), be32(p.id === own ? own + 1 : p.id)]);
      case 'own': return Buffer.concat([Buffer.from([0x7e]), be32(own), Buffer.from([p.next])]);
    }
  }));
}

/** The stream, the device sections as the builder wrote them, and the guest memory it describes. */
function buildMain(spec: MainSpec): { stream: Buffer; devices: Buffer[]; memory: string[] } {
  const sb = new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2');
  if (spec.commands) sb.command(MIG_CMD_OPEN_RETURN_PATH).command(MIG_CMD_PING, be32(1)).enableColo();
  const model = new RAMBlockList();
  for (const b of BLOCKS) model.add(b.idstr, b.usedLength);
  spec.sections.forEach((ops, k) => {
    if (k === 0) sb.sectionStart({ sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }).ramMemSize(BLOCKS);
    else if (k === spec.sections.length - 1) sb.sectionEnd(2);
    else sb.sectionPart(2);
    for (const op of ops) {
      if (op.t === 'flush') { sb.ramMultifdFlush(); continue; }
      const blk = BLOCKS[op.block]!;
      const page = op.page % (blk.usedLength / P);
      const target = model.get(blk.idstr)!.guest.page(page);
      if (op.t === 'page') { sb.ramPage(blk.idstr, page * P, pageBytes(op.seed)); target.set(pageBytes(op.seed)); }
      else { sb.ramZero(blk.idstr, page * P, op.fill); target.fill(op.fill); }
    }
    sb.ramEos().footer(2);
  });
  const devices = spec.devices.map((pieces, i) => {
    const h = deviceHeader(i);
    const section = new StreamBuilder().sectionFull(h, deviceBody(pieces, h.sectionId)).build();
    sb.raw(section);
    return section;
  });
  sb.eof().vmdescription(VMDESC);
  return { stream: sb.build(), devices, memory: hashBlocks(model) };
}

interface MainResult { events: string[]; devices: string[]; memory: string[] }

function parseMain(chunks: Buffer[]): MainResult {
  const blocks = new RAMBlockList();
  const host: RamSink = {
    onMemSize: (list) => { for (const b of list) blocks.add(b.idstr, b.usedLength); },
    findBlock: (n) => blocks.get(n),
    writeMode: () => WRITE_GUEST,
  };
  const events: string[] = [];
  const devices: string[] = [];
  const sink: VmStateSink = {
    onConfiguration: (m, raw) => { events.push(`config ${m} ${raw.toString('hex')}`); },
    onCommand: (cmd, payload) => { events.push(`cmd ${cmd} ${payload.toString('hex')}`); },
    onSection: (h: SectionHeader) => { events.push(`section ${h.type} ${h.sectionId} ${h.idstr} ${h.instanceId} ${h.versionId}`); },
    onRamEos: (h) => { events.push(`eos ${h.sectionId}`); },
    onRamFlush: () => { events.push('flush'); },
    onDeviceSection: (h, raw) => { events.push(`device ${h.sectionId}`); devices.push(raw.toString('hex')); },
  };
  const q = new ByteQueue();
  const vm = new VmStateParser(q, sink, new RamSectionParser(host, DEFAULT_LIMITS), DEFAULT_LIMITS);
  let vmdescAsked = false;
  for (const c of chunks) {
    q.push(c);
    try {
      for (;;) {
        const r = vm.feed();
        if (r === 'blocked' || r === 'held') break;
        if (r === 'vmdesc') { events.push(`vmdesc ${vm.vmdesc!.toString('hex')}`); continue; }
        if (vmdescAsked) break;
        events.push('eof');
        vmdescAsked = true;
        vm.beginVmdesc();
      }
    } catch (e) {
      if (!(e instanceof MigrationError)) throw e;
      // later chunks are never pushed, so how much is left queued depends on the chunking
      events.push(`error ${e.code} ${e.channel} ${e.streamOffset}`);
      return { events, devices, memory: hashBlocks(blocks) };
    }
  }
  events.push(`left ${q.length} idle ${vm.idle}`);
  return { events, devices, memory: hashBlocks(blocks) };
}

// ---------------------------------------------------------------- multifd channel

type Pkt =
  | { t: 'data'; block: number; pages: { page: number; seed: number }[]; zeros: number[]; sync: boolean; dupNum: boolean }
  | { t: 'sync' | 'empty'; dupNum: boolean };
interface MultifdSpec { id: number; tidy: boolean; packets: Pkt[] }

const pktArb: fc.Arbitrary<Pkt> = fc.oneof(
  { weight: 3, arbitrary: fc.record({
    t: fc.constant('data' as const), block: fc.integer({ min: 0, max: 1 }),
    pages: fc.array(fc.record({ page: fc.nat(), seed: fc.nat(255) }), { maxLength: 5 }),
    zeros: fc.array(fc.nat(), { maxLength: 3 }), sync: fc.boolean(), dupNum: fc.boolean(),
  }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constantFrom('sync' as const, 'empty' as const), dupNum: fc.boolean() }) },
);

const multifdSpecArb: fc.Arbitrary<MultifdSpec> = fc.record({
  id: fc.nat(255),
  tidy: fc.boolean(),
  packets: fc.array(pktArb, { maxLength: 10 }),
});

/** The channel's bytes as a 7.2 sender (reused packet buffer, stale fields) or a 9.1+ one writes them. */
function buildMultifd(spec: MultifdSpec): { stream: Buffer; memory: string[] } {
  const img = new MultiFDPacketImage(spec.tidy ? { clearEachFill: true } : { clearEachFill: false, staleFields: true, staleOffsets: true });
  const model = new RAMBlockList();
  for (const b of BLOCKS) model.add(b.idstr, b.usedLength);
  const parts: Buffer[] = [encodeMultiFDInit({ id: spec.id })];
  // the first packet on every channel: SYNC, no pages (RAM setup)
  parts.push(Buffer.from(img.fill({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 0, ramblock: undefined, offsets: [], count: 0 })));
  let num = 1;
  for (const p of spec.packets) {
    if (!p.dupNum) num++;
    if (p.t !== 'data' || p.pages.length + p.zeros.length === 0) {
      const flags = p.t === 'sync' || (p.t === 'data' && p.sync) ? MULTIFD_FLAG_SYNC : 0;
      parts.push(Buffer.from(img.fill({ flags, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: num, ramblock: undefined, offsets: [], count: 0 })));
      continue;
    }
    const blk = BLOCKS[p.block]!;
    const pages = blk.usedLength / P;
    const mem = model.get(blk.idstr)!;
    const normal = p.pages.map((x) => ({ page: x.page % pages, seed: x.seed }));
    const zeros = p.zeros.map((z) => z % pages);
    const offsets = [...normal.map((x) => x.page * P), ...zeros.map((z) => z * P)];
    parts.push(Buffer.from(img.fill({
      flags: p.sync ? MULTIFD_FLAG_SYNC : 0, pagesAlloc: 128, normalPages: normal.length, zeroPages: zeros.length,
      nextPacketSize: normal.length > 0 ? normal.length * P : undefined, packetNum: num, ramblock: blk.idstr, offsets, count: offsets.length,
    })));
    for (const x of normal) { parts.push(pageBytes(x.seed)); mem.guest.page(x.page).set(pageBytes(x.seed)); }
    for (const z of zeros) mem.guest.page(z).fill(0);
  }
  return { stream: Buffer.concat(parts), memory: hashBlocks(model) };
}

interface ChannelResult { events: string[]; memory: string[] }

const turn = (): Promise<void> => new Promise<void>((r) => setImmediate(r));

async function parseMultifd(chunks: Buffer[]): Promise<ChannelResult> {
  const blocks = new RAMBlockList();
  for (const b of BLOCKS) blocks.add(b.idstr, b.usedLength);
  const events: string[] = [];
  let ch!: MultiFDChannel;
  const sink: ChannelSink = {
    onHandshake: (_c, init) => { events.push(`handshake ${init.id} ${init.uuid.toString('hex')}`); },
    findBlock: (n) => blocks.get(n),
    writeMode: (): WriteMode => WRITE_GUEST,
    submit: (_c, task) => {
      const idx = new Uint32Array(task.staging, task.slotOffset, task.normalPages);
      events.push(`write ${task.normalPages} [${[...idx].join(',')}]`);
      return Promise.resolve(runWriteTask(task));
    },
    // the main channel's barrier, released at once
    onSynced: () => { events.push('synced'); queueMicrotask(() => ch.release()); },
    onBlocked: () => undefined,
    onError: (e) => { events.push(`error ${e.code} ${e.channel} ${e.streamOffset}`); },
  };
  ch = new MultiFDChannel(sink, 'none', DEFAULT_LIMITS, 2);
  for (const c of chunks) {
    ch.push(c);
    await turn();
  }
  ch.end();
  for (let i = 0; i < 100 && !ch.failed && !ch.exhausted; i++) await turn();
  events.push(`exhausted ${ch.exhausted} failed ${ch.failed} packets ${ch.packets} pages ${ch.pages} zero ${ch.zeroPages} syncs ${ch.syncs}`);
  return { events, memory: hashBlocks(blocks) };
}

// ---------------------------------------------------------------- properties

describe('chunking', () => {
  test('any chunking of a main-channel stream parses like one chunk', () => {
    fc.assert(fc.property(mainSpecArb, cutterArb, (spec, cutter) => {
      const { stream, devices, memory } = buildMain(spec);
      const whole = parseMain([stream]);
      // the one-chunk parse is right to begin with: every device section verbatim, the model's memory
      assert.ok(!whole.events.some((e) => e.startsWith('error')), whole.events.join('\n'));
      assert.deepEqual(whole.devices, devices.map((d) => d.toString('hex')));
      assert.deepEqual(whole.memory, memory);
      assert.equal(whole.events.at(-1), 'left 0 idle true');
      const chunked = parseMain(splitAt(stream, cutter(stream.length)));
      assert.deepEqual(chunked, whole);
    }), { numRuns: RUNS });
  });

  test('any chunking of a stream with a bad record fails at the same byte', () => {
    fc.assert(fc.property(mainSpecArb, fc.nat(), fc.nat(255), cutterArb, (spec, pos, byte, cutter) => {
      const { stream } = buildMain(spec);
      const bad = Buffer.from(stream);
      const i = pos % bad.length;
      bad[i] = bad[i]! ^ (byte | 1);
      const whole = parseMain([bad]);
      assert.deepEqual(parseMain(splitAt(bad, cutter(bad.length))), whole);
    }), { numRuns: RUNS });
  });

  test('any chunking of a multifd channel stream parses like one chunk', async () => {
    await fc.assert(fc.asyncProperty(multifdSpecArb, cutterArb, async (spec, cutter) => {
      const { stream, memory } = buildMultifd(spec);
      const whole = await parseMultifd([stream]);
      assert.ok(!whole.events.some((e) => e.startsWith('error')), whole.events.join('\n'));
      assert.deepEqual(whole.memory, memory);
      assert.match(whole.events.at(-1)!, /^exhausted true failed false/);
      const chunked = await parseMultifd(splitAt(stream, cutter(stream.length)));
      assert.deepEqual(chunked, whole);
    }), { numRuns: RUNS });
  });
});
