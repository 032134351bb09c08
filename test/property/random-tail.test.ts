// Bad bytes after a valid prefix end in exactly one MigrationError or in "need more data":
// never a TypeError, RangeError or assertion, never a second error, never a hang, and never a
// write outside a RAMBlock. Blocks are allocated with guard pages behind them (and guard bits
// behind their dirty bitmaps), which a write past used_length would change.
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { MigrationError } from '../../src/errors.js';
import { DirtyBitmap } from '../../src/memory/dirty-bitmap.js';
import { WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, runWriteTask, type WriteMode } from '../../src/memory/page-writer.js';
import { RAMBlock, ZERO } from '../../src/memory/ram-block.js';
import { Slab } from '../../src/memory/slab.js';
import { DEFAULT_LIMITS, type Limits } from '../../src/migration/limits.js';
import { MultiFDChannel, type ChannelSink } from '../../src/migration/multifd-channel.js';
import { RamSectionParser, type RamSink } from '../../src/migration/ram-section.js';
import { VmStateParser, type VmStateSink } from '../../src/migration/vmstate-stream.js';
import { encodeMultiFDInit, encodeMultiFDPacketHeader, MultiFDPacketImage } from '../../src/sender/multifd-builder.js';
import { StreamBuilder } from '../../src/sender/stream-builder.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import { MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MULTIFD_FLAG_SYNC, MULTIFD_PACKET_HEADER_LEN } from '../../src/wire/constants.js';

const P = 4096;
const RUNS = Number(process.env.FUZZ_RUNS ?? 200);
const GUARD_PAGES = 2;
const GUARD_BYTE = 0xa5;
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 16 * P }, { idstr: '0000:00:02.0/vga.vram', usedLength: 4 * P }];
/** Small caps so that random numbers cannot make the test allocate gigabytes. */
const LIMITS: Limits = { ...DEFAULT_LIMITS, maxRamBytes: 64 * P, maxBlocks: 8, maxSectionBytes: 256 * 1024, maxVmdescBytes: 64 * 1024 };
const VMDESC = '{"page_size":4096,"devices":[]}';

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 41 + i * 7 + (i >> 5)) & 0xff;
  return b;
}
function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0, 0); return b; }

/**
 * A RAMBlock whose slab is filled with a guard byte: a write may land only in a slot the page
 * table handed out for a page of the block (a write past used_length, or into a slot nobody
 * asked for, changes a guard). Its dirty bitmap has guard bits behind the block's pages.
 */
class GuardedBlock extends RAMBlock {
  readonly handed = new Set<number>();

  constructor(idstr: string, usedLength: number) {
    super(0, idstr, usedLength, new Slab({ chunkSlotBits: 4 }));
    this.enableColo();
    this.dirty = DirtyBitmap.alloc(this.pages + 64);
  }

  override slotFor(page: number, mode: WriteMode): number {
    assert.ok(page >= 0 && page < this.pages && Number.isInteger(page), `slot asked for page ${page} outside ${this.idstr}`);
    const fresh = this.slab.liveChunks;
    const s = super.slotFor(page, mode);
    // A chunk the slab just created: guard every slot in it.
    if (this.slab.liveChunks !== fresh) for (const v of this.slab.views) if (v && !guarded.has(v)) { v.fill(GUARD_BYTE); guarded.add(v); }
    if (!this.handed.has(s)) { this.handed.add(s); this.slab.page(s).fill(0); }
    return s;
  }

  /** Slots never handed out still hold the guard, and no dirty bit at or past `pages`. */
  assertGuards(): void {
    this.slab.views.forEach((v, c) => {
      if (!v) return;
      for (let k = 0; k < this.slab.chunkSlots; k++) {
        const slot = c * this.slab.chunkSlots + k;
        if (this.handed.has(slot)) continue;
        assert.ok(v.subarray(k * P, (k + 1) * P).every((x) => x === GUARD_BYTE), `a write landed in slot ${slot}, which no page of ${this.idstr} owns`);
      }
    });
    for (let p = this.pages; p < this.pages + 64; p++) assert.ok(!this.dirty!.test(p), `dirty bit ${p} set past the end of ${this.idstr}`);
  }

  /** The image as a reader sees it: committed pages, overlaid with the checkpoint's pending ones. */
  guestHash(): string {
    const out = Buffer.from(this.denseCopy());
    for (let p = 0; p < this.pages; p++) {
      const e = this.pending![p]!;
      if (e >= 0) out.set(this.slab.page(e), p * P);
      else if (e === ZERO) out.fill(0, p * P, (p + 1) * P);
    }
    return createHash('sha256').update(out).digest('hex');
  }

  asRAMBlock(): RAMBlock { return this; }
}
const guarded = new WeakSet<Uint8Array>();

class GuardedBlocks {
  readonly list: GuardedBlock[] = [];
  readonly #byName = new Map<string, GuardedBlock>();
  add(idstr: string, usedLength: number): GuardedBlock {
    const b = new GuardedBlock(idstr, usedLength);
    this.list.push(b);
    this.#byName.set(idstr, b);
    return b;
  }
  get(idstr: string): RAMBlock | undefined { return this.#byName.get(idstr)?.asRAMBlock(); }
  assertGuards(): void { for (const b of this.list) b.assertGuards(); }
}

const modeArb = fc.constantFrom<WriteMode>(WRITE_GUEST, WRITE_BOTH, WRITE_CACHE);

/**
 * Random bytes, or a valid continuation with a few bytes overwritten (reaches deeper states), or
 * well-formed records with wrong values after a record boundary (reaches the range checks).
 */
type Tail = { k: 'random'; bytes: Uint8Array } | { k: 'mutate'; edits: { at: number; byte: number }[]; keep: number } | { k: 'records'; bytes: Buffer };
const byteTailArb = fc.oneof(
  fc.record({ k: fc.constant('random' as const), bytes: fc.uint8Array({ maxLength: 3000 }) }),
  fc.record({
    k: fc.constant('mutate' as const),
    edits: fc.array(fc.record({ at: fc.nat(), byte: fc.nat(255) }), { minLength: 1, maxLength: 4 }),
    keep: fc.double({ min: 0, max: 1, noNaN: true }),
  }),
);

function tailArb(records: fc.Arbitrary<Buffer>): fc.Arbitrary<Tail> {
  return fc.oneof(byteTailArb, records.map((bytes) => ({ k: 'records' as const, bytes })));
}

/** The valid stream up to a cut (a record boundary for a 'records' tail), then the tail. */
function withTail(stream: Buffer, boundaries: number[], cutAt: number, tail: Tail): Buffer {
  const cut = tail.k === 'records' ? boundaries[Math.floor(cutAt * boundaries.length)] ?? boundaries[0]! : Math.floor(cutAt * stream.length);
  if (tail.k !== 'mutate') return Buffer.concat([stream.subarray(0, cut), tail.bytes]);
  const rest = Buffer.from(stream.subarray(cut, cut + Math.ceil((stream.length - cut) * tail.keep)));
  for (const e of tail.edits) if (rest.length > 0) rest[e.at % rest.length] = e.byte;
  return Buffer.concat([stream.subarray(0, cut), rest]);
}

function splitInto(b: Buffer, parts: number[]): Buffer[] {
  const cuts = [...new Set(parts.map((f) => Math.floor(f * b.length)).filter((c) => c > 0 && c < b.length))].sort((x, y) => x - y);
  const out: Buffer[] = [];
  let from = 0;
  for (const c of cuts) { out.push(b.subarray(from, c)); from = c; }
  out.push(b.subarray(from));
  return out;
}

// ---------------------------------------------------------------- main channel

type RamOp = { t: 'page'; block: number; page: number; seed: number } | { t: 'zero'; block: number; page: number } | { t: 'flush' };
interface MainSpec { sections: RamOp[][]; bodies: Uint8Array[]; commands: boolean }

const mainSpecArb: fc.Arbitrary<MainSpec> = fc.record({
  sections: fc.array(fc.array(fc.oneof(
    { weight: 4, arbitrary: fc.record({ t: fc.constant('page' as const), block: fc.integer({ min: 0, max: 1 }), page: fc.nat(), seed: fc.nat(255) }) },
    { weight: 2, arbitrary: fc.record({ t: fc.constant('zero' as const), block: fc.integer({ min: 0, max: 1 }), page: fc.nat() }) },
    { weight: 1, arbitrary: fc.constant({ t: 'flush' as const }) },
  ), { maxLength: 5 }), { minLength: 1, maxLength: 3 }),
  // bodies with 0x7E bytes and a fake `7E be32(own id)` followed by a byte that starts no record
  bodies: fc.array(fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.concat([Buffer.from(b), Buffer.from([0x7e, 0, 0, 0, 0x7e, 0x09])])), { maxLength: 3 }),
  commands: fc.boolean(),
});

/** One page record: where its data sits in the stream and what it does to guest memory. */
interface PageWrite { block: string; page: number; dataStart: number; dataEnd: number; data: Buffer | null }

function buildMain(spec: MainSpec): { stream: Buffer; writes: PageWrite[]; memSizeEnd: number; boundaries: number[] } {
  const sb = new StreamBuilder().fileHeader().configuration();
  if (spec.commands) sb.command(MIG_CMD_OPEN_RETURN_PATH).command(MIG_CMD_PING, be32(1));
  const writes: PageWrite[] = [];
  let memSizeEnd = 0;
  spec.sections.forEach((ops, k) => {
    if (k === 0) { sb.sectionStart({ sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }).ramMemSize(BLOCKS); memSizeEnd = sb.totalBytes; }
    else if (k === spec.sections.length - 1) sb.sectionEnd(2);
    else sb.sectionPart(2);
    for (const op of ops) {
      if (op.t === 'flush') { sb.ramMultifdFlush(); continue; }
      const blk = BLOCKS[op.block]!;
      const page = op.page % (blk.usedLength / P);
      if (op.t === 'page') {
        sb.ramPage(blk.idstr, page * P, pageBytes(op.seed));
        writes.push({ block: blk.idstr, page, dataStart: sb.totalBytes - P, dataEnd: sb.totalBytes, data: pageBytes(op.seed) });
      } else {
        sb.ramZero(blk.idstr, page * P);
        writes.push({ block: blk.idstr, page, dataStart: sb.totalBytes - 1, dataEnd: sb.totalBytes, data: null });
      }
    }
    sb.ramEos().footer(2);
  });
  spec.bodies.forEach((body, i) => sb.sectionFull({ sectionId: 10 + i, idstr: `dev${i}`, instanceId: 0, versionId: 1 }, body));
  sb.eof().vmdescription(VMDESC);
  // where the parser expects the next RAM record of a section
  const boundaries = [memSizeEnd, ...writes.map((w) => w.dataEnd)];
  return { stream: sb.build(), writes, memSizeEnd, boundaries };
}

/**
 * Records that are well formed but wrong in the ways that matter: page offsets around the end
 * of each block, unknown block names, CONTINUE, any flag combination, a stray EOS and footer.
 */
type MainTok =
  | { t: 'page' | 'zero'; block: number; page: number; cont: boolean; seed: number }
  | { t: 'word'; flags: number; page: number }
  | { t: 'eos'; id: number }
  | { t: 'bytes'; b: Uint8Array };
const mainTokArb: fc.Arbitrary<MainTok> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ t: fc.constantFrom('page' as const, 'zero' as const), block: fc.integer({ min: 0, max: 2 }), page: fc.integer({ min: 0, max: 20 }), cont: fc.boolean(), seed: fc.nat(255) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('word' as const), flags: fc.nat(0xfff), page: fc.integer({ min: 0, max: 20 }) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('eos' as const), id: fc.constantFrom(2, 2, 3) }) },
  { weight: 1, arbitrary: fc.record({ t: fc.constant('bytes' as const), b: fc.uint8Array({ maxLength: 16 }) }) },
);

function word(addr: number, flags: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(addr / 2 ** 32), 0);
  b.writeUInt32BE(((addr >>> 0) | flags) >>> 0, 4);
  return b;
}
function counted(s: string): Buffer { return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]); }
const NAMES = [BLOCKS[0]!.idstr, BLOCKS[1]!.idstr, 'pc.ram0'];

function encodeMainToks(toks: MainTok[]): Buffer {
  return Buffer.concat(toks.flatMap((t) => {
    switch (t.t) {
      case 'page':
      case 'zero': {
        const flag = (t.t === 'page' ? 0x08 : 0x02) | (t.cont ? 0x20 : 0);
        return [word(t.page * P, flag), t.cont ? Buffer.alloc(0) : counted(NAMES[t.block]!), t.t === 'page' ? pageBytes(t.seed) : Buffer.from([t.seed])];
      }
      case 'word': return [word(t.page * P, t.flags), pageBytes(t.page)];
      case 'eos': return [word(0, 0x10), Buffer.from([0x7e]), be32(t.id)];
      case 'bytes': return [Buffer.from(t.b)];
    }
  }));
}

/** Guest memory after a parser read `cut` bytes: whole records before it, and the part of a page it copied. */
function expectedAfter(writes: PageWrite[], memSizeEnd: number, cut: number): string[] {
  if (cut < memSizeEnd) return [];
  const model = new GuardedBlocks();
  for (const b of BLOCKS) model.add(b.idstr, b.usedLength);
  for (const w of writes) {
    if (w.dataStart >= cut) break;
    const page = model.get(w.block)!.guest.page(w.page);
    if (w.data === null) page.fill(0);                                           // ZERO: the fill byte has arrived
    else page.set(w.data.subarray(0, Math.min(cut, w.dataEnd) - w.dataStart));   // PAGE: copied as it arrives
  }
  return model.list.map((b) => b.guestHash());
}

interface MainOutcome { error: MigrationError | null; events: number; blocks: GuardedBlocks }

/** Feeds the chunks; stops at the first MigrationError. Any other exception escapes and fails the test. */
function runMain(chunks: Buffer[], mode: WriteMode): MainOutcome & { vm: VmStateParser; q: ByteQueue; counter: { n: number } } {
  const blocks = new GuardedBlocks();
  const counter = { n: 0 };
  const host: RamSink = {
    onMemSize: (list) => { for (const b of list) blocks.add(b.idstr, b.usedLength); },
    findBlock: (n) => blocks.get(n),
    writeMode: () => mode,
  };
  const count = (): void => { counter.n++; };
  const sink: VmStateSink = { onConfiguration: count, onCommand: count, onSection: count, onRamEos: count, onRamFlush: count, onDeviceSection: count };
  const q = new ByteQueue();
  const vm = new VmStateParser(q, sink, new RamSectionParser(host, LIMITS), LIMITS);
  let error: MigrationError | null = null;
  let vmdescAsked = false;
  for (const c of chunks) {
    q.push(c);
    try {
      for (let guard = 0; ; guard++) {
        assert.ok(guard < 10, 'feed() keeps returning without consuming');
        const r = vm.feed();
        if (r === 'blocked' || r === 'held' || r === 'vmdesc') break;
        if (vmdescAsked) break;
        vmdescAsked = true;
        vm.beginVmdesc();
      }
    } catch (e) {
      if (!(e instanceof MigrationError)) throw e;
      error = e;
      break;
    }
  }
  return { error, events: counter.n, blocks, vm, q, counter };
}

// ---------------------------------------------------------------- multifd channel

type Pkt = { pages: { page: number; seed: number }[]; zeros: number[]; block: number; sync: boolean };
const multifdSpecArb = fc.record({
  id: fc.nat(255),
  tidy: fc.boolean(),
  packets: fc.array(fc.record({
    pages: fc.array(fc.record({ page: fc.nat(), seed: fc.nat(255) }), { maxLength: 4 }),
    zeros: fc.array(fc.nat(), { maxLength: 2 }),
    block: fc.integer({ min: 0, max: 1 }),
    sync: fc.boolean(),
  }), { maxLength: 6 }),
});

function buildMultifd(spec: { id: number; tidy: boolean; packets: Pkt[] }): { stream: Buffer; boundaries: number[] } {
  const img = new MultiFDPacketImage(spec.tidy ? { clearEachFill: true } : { clearEachFill: false, staleFields: true, staleOffsets: true });
  const parts: Buffer[] = [encodeMultiFDInit({ id: spec.id })];
  parts.push(Buffer.from(img.fill({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 0, ramblock: undefined, offsets: [], count: 0 })));
  let at = parts[0]!.length + parts[1]!.length;
  const boundaries = [at];   // where the next packet header starts
  spec.packets.forEach((p, k) => {
    const blk = BLOCKS[p.block]!;
    const n = blk.usedLength / P;
    const offsets = [...p.pages.map((x) => (x.page % n) * P), ...p.zeros.map((z) => (z % n) * P)];
    const any = offsets.length > 0;
    parts.push(Buffer.from(img.fill({
      flags: p.sync ? MULTIFD_FLAG_SYNC : 0, pagesAlloc: 128, normalPages: p.pages.length, zeroPages: p.zeros.length,
      nextPacketSize: p.pages.length > 0 ? p.pages.length * P : undefined, packetNum: k + 1, ramblock: any ? blk.idstr : undefined, offsets, count: offsets.length,
    })));
    for (const x of p.pages) parts.push(pageBytes(x.seed));
    at += MULTIFD_PACKET_HEADER_LEN + p.pages.length * P;
    boundaries.push(at);
  });
  const stream = Buffer.concat(parts);
  assert.equal(stream.length, at);
  return { stream, boundaries };
}

/** Packets with header fields at and around their limits: offsets near each block's end, unaligned ones, unknown blocks. */
type OffsetTok = { k: 'edge'; d: number } | { k: 'inside'; r: number } | { k: 'unaligned'; r: number; skew: number };
interface MultifdTok { flags: number; pagesAlloc: number; normal: number; zero: number; block: number; offsets: OffsetTok[]; nextPacketSize: number }
const offsetTokArb: fc.Arbitrary<OffsetTok> = fc.oneof(
  { weight: 2, arbitrary: fc.record({ k: fc.constant('edge' as const), d: fc.integer({ min: -2, max: 1 }) }) },
  { weight: 3, arbitrary: fc.record({ k: fc.constant('inside' as const), r: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }) }) },
  { weight: 1, arbitrary: fc.record({ k: fc.constant('unaligned' as const), r: fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), skew: fc.integer({ min: 1, max: P - 1 }) }) },
);
const multifdTokArb: fc.Arbitrary<MultifdTok> = fc.record({
  flags: fc.constantFrom(0, 0, 0, 0, MULTIFD_FLAG_SYNC, 0x80, 0x02, 0x40),
  pagesAlloc: fc.constantFrom(128, 128, 128, 127, 4, 0, 129, 0xffff_ffff),
  normal: fc.nat(4),
  zero: fc.nat(2),
  block: fc.constantFrom(0, 0, 1, 1, 2),
  offsets: fc.array(offsetTokArb, { minLength: 6, maxLength: 6 }),
  nextPacketSize: fc.constantFrom(0, P, 2 * P, 0xffff_ffff),
});

function encodeMultifdToks(toks: MultifdTok[]): Buffer {
  return Buffer.concat(toks.flatMap((t) => {
    const pages = (BLOCKS[t.block] ?? BLOCKS[0]!).usedLength / P;
    const offsets = t.offsets.slice(0, t.normal + t.zero).map((o) =>
      o.k === 'edge' ? Math.max(0, pages + o.d) * P : o.k === 'inside' ? Math.floor(o.r * pages) * P : Math.floor(o.r * pages) * P + o.skew);
    return [
      encodeMultiFDPacketHeader({
        flags: t.flags, pagesAlloc: t.pagesAlloc, normalPages: t.normal, zeroPages: t.zero, nextPacketSize: t.nextPacketSize,
        packetNum: 1, ramblock: NAMES[t.block]!, offsets,
      }),
      Buffer.concat(Array.from({ length: t.normal }, (_, k) => pageBytes(k))),
    ];
  }));
}

const turn = (): Promise<void> => new Promise<void>((r) => setImmediate(r));

// ---------------------------------------------------------------- properties

describe('random tail', () => {
  test('a main-channel stream with a bad tail ends in one MigrationError or needs more data', () => {
    const tail = tailArb(fc.array(mainTokArb, { minLength: 1, maxLength: 8 }).map(encodeMainToks));
    fc.assert(fc.property(mainSpecArb, fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), tail, fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 6 }), modeArb,
      (spec, cutAt, tail, parts, mode) => {
        const { stream, boundaries } = buildMain(spec);
        const input = withTail(stream, boundaries, cutAt, tail);
        const out = runMain(splitInto(input, parts), mode);
        out.blocks.assertGuards();
        if (out.error) {
          assert.equal(out.error.channel, 'main');
          assert.equal(typeof out.error.streamOffset, 'number');
          assert.ok(out.error.streamOffset! >= 0 && out.error.streamOffset! <= input.length, `offset ${out.error.streamOffset} outside the input`);
          // a failed parser ignores later input: no second error, no event, no write
          const before = out.counter.n;
          out.q.push(Buffer.from(stream));
          assert.equal(out.vm.feed(), 'blocked');
          assert.equal(out.counter.n, before);
        }
        out.blocks.assertGuards();
      }), { numRuns: RUNS });
  });

  test('a truncated main-channel stream is never an error and holds exactly the pages before the cut', () => {
    fc.assert(fc.property(mainSpecArb, fc.double({ min: 0, max: 1, noNaN: true }), fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 6 }),
      (spec, cutAt, parts) => {
        const { stream, writes, memSizeEnd } = buildMain(spec);
        const cut = Math.floor(cutAt * (stream.length + 1));
        const out = runMain(splitInto(stream.subarray(0, cut), parts), WRITE_GUEST);
        assert.equal(out.error, null, String(out.error));
        out.blocks.assertGuards();
        assert.deepEqual(out.blocks.list.map((b) => b.guestHash()), expectedAfter(writes, memSizeEnd, cut));
      }), { numRuns: RUNS });
  });

  test('a multifd channel with a bad tail ends in one MigrationError or needs more data', async () => {
    const tail = tailArb(fc.array(multifdTokArb, { minLength: 1, maxLength: 4 }).map(encodeMultifdToks));
    await fc.assert(fc.asyncProperty(multifdSpecArb, fc.double({ min: 0, max: 1, noNaN: true, maxExcluded: true }), tail, fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 6 }), modeArb,
      async (spec, cutAt, tail, parts, mode) => {
        const { stream, boundaries } = buildMultifd(spec);
        const input = withTail(stream, boundaries, cutAt, tail);
        const blocks = new GuardedBlocks();
        for (const b of BLOCKS) blocks.add(b.idstr, b.usedLength);
        const errors: MigrationError[] = [];
        let ch!: MultiFDChannel;
        const sink: ChannelSink = {
          onHandshake: () => undefined,
          findBlock: (n) => blocks.get(n),
          writeMode: () => mode,
          submit: (_c, task) => Promise.resolve(runWriteTask(task)),
          onSynced: () => { queueMicrotask(() => ch.release()); },
          onBlocked: () => undefined,
          onError: (e) => { errors.push(e); },
        };
        ch = new MultiFDChannel(sink, 'none', LIMITS, 2);
        for (const c of splitInto(input, parts)) { ch.push(c); await turn(); }
        await turn();
        assert.ok(errors.length <= 1, `${errors.length} errors`);
        assert.equal(errors.length, ch.failed ? 1 : 0);
        ch.end();
        for (let i = 0; i < 200 && !ch.failed && !ch.exhausted; i++) await turn();
        assert.ok(ch.failed || ch.exhausted, 'the channel neither failed nor finished after EOF (hang)');
        assert.equal(errors.length, ch.failed ? 1 : 0);
        for (const e of errors) {
          assert.ok(e instanceof MigrationError);
          assert.notEqual(e.code, 'ERR_WORKER', `an internal error escaped: ${e.message}`);
          assert.match(e.channel ?? '', /^multifd\/(\?|\d+)$/);
          assert.equal(typeof e.streamOffset, 'number');
        }
        if (ch.failed) {
          // a failed channel ignores later input
          ch.push(stream);
          await turn();
          assert.equal(errors.length, 1);
        }
        blocks.assertGuards();
      }), { numRuns: RUNS });
  });
});
