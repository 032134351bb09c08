import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError, type MigrationErrorCode } from '../../src/errors.js';
import { WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, type WriteMode } from '../../src/memory/page-writer.js';
import { RAMBlockList, type RAMBlock } from '../../src/memory/ram-block.js';
import { DEFAULT_LIMITS, type Limits } from '../../src/migration/limits.js';
import { RamSectionParser, type RamFeedResult, type RamSink } from '../../src/migration/ram-section.js';
import { StreamBuilder } from '../../src/sender/stream-builder.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import {
  RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_FULL, RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO,
} from '../../src/wire/constants.js';

const P = 4096;
const ZERO = Buffer.alloc(P);
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 8 * P }, { idstr: '0000:00:02.0/vga.vram', usedLength: 2 * P }];

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 13 + i * 5 + (i >> 9)) & 0xff;
  return b;
}

/** The 64-bit "addr | flags" word of a ram record, as save_page_header() puts it. */
function word(addr: number, flags: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(addr / 2 ** 32), 0);
  b.writeUInt32BE(((addr >>> 0) | flags) >>> 0, 4);
  return b;
}

function counted(s: string): Buffer { return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]); }
function be64(n: number): Buffer { const b = Buffer.alloc(8); b.writeUInt32BE(Math.floor(n / 2 ** 32), 0); b.writeUInt32BE(n >>> 0, 4); return b; }

class Host implements RamSink {
  readonly blocks = new RAMBlockList();
  readonly announced: { idstr: string; usedLength: number }[][] = [];
  mode: WriteMode = WRITE_GUEST;
  colo = false;
  onMemSize(list: { idstr: string; usedLength: number }[]): void {
    this.announced.push(list.map((b) => ({ ...b })));
    for (const b of list) { const r = this.blocks.add(b.idstr, b.usedLength); if (this.colo) r.enableColo(); }
  }
  findBlock(idstr: string): RAMBlock | undefined { return this.blocks.get(idstr); }
  writeMode(): WriteMode { return this.mode; }
}

interface Rig { host: Host; ram: RamSectionParser; q: ByteQueue; feed(bytes: Buffer): RamFeedResult[] }

function rig(opts: { limits?: Partial<Limits>; announce?: boolean; colo?: boolean; channel?: string } = {}): Rig {
  const host = new Host();
  host.colo = opts.colo ?? false;
  if (opts.announce ?? true) host.onMemSize(BLOCKS);
  host.announced.length = 0;
  const ram = new RamSectionParser(host, { ...DEFAULT_LIMITS, ...opts.limits }, opts.channel);
  const q = new ByteQueue();
  return {
    host, ram, q,
    feed(bytes) {
      q.push(bytes);
      const out: RamFeedResult[] = [];
      for (;;) {
        const r = ram.feed(q);
        if (r === 'blocked') return out;
        out.push(r);
      }
    },
  };
}

function expectError(fn: () => unknown, code: MigrationErrorCode, streamOffset?: number, channel = 'main'): MigrationError {
  let caught: unknown;
  try { fn(); } catch (e) { caught = e; }
  assert.ok(caught instanceof MigrationError, `expected a MigrationError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code);
  assert.equal(caught.channel, channel);
  assert.equal(typeof caught.streamOffset, 'number');
  if (streamOffset !== undefined) assert.equal(caught.streamOffset, streamOffset);
  return caught;
}

const guest = (b: RAMBlock, i: number): Buffer => Buffer.from(b.guest.page(i));
const cache = (b: RAMBlock, i: number): Buffer => Buffer.from(b.cache!.page(i));

describe('RamSectionParser', () => {
  test('announces the MEM_SIZE block list of a START section', () => {
    const { host, ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    assert.deepEqual(feed(new StreamBuilder().ramMemSize(BLOCKS).ramEos().build()), ['eos']);
    assert.deepEqual(host.announced, [BLOCKS]);
    assert.equal(host.blocks.blocks.length, 2);
    assert.ok(ram.idle);
  });

  test('parses a MEM_SIZE list fed one byte at a time', () => {
    const { host, ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    const bytes = new StreamBuilder().ramMemSize(BLOCKS).ramPage('pc.ram', 2 * P, pageBytes(2)).ramEos().build();
    const results: RamFeedResult[] = [];
    for (let i = 0; i < bytes.length; i++) results.push(...feed(bytes.subarray(i, i + 1)));
    assert.deepEqual(results, ['eos']);
    assert.deepEqual(host.announced, [BLOCKS]);
    assert.deepEqual(guest(host.blocks.get('pc.ram')!, 2), pageBytes(2));
  });

  test('writes a PAGE record to guest memory', () => {
    const { host, ram, feed } = rig();
    const r = feed(new StreamBuilder().ramPage('pc.ram', 3 * P, pageBytes(3)).ramEos().build());
    assert.deepEqual(r, ['eos']);
    const pc = host.blocks.get('pc.ram')!;
    assert.deepEqual(guest(pc, 3), pageBytes(3));
    assert.deepEqual(guest(pc, 2), ZERO);
    assert.deepEqual(guest(pc, 4), ZERO);
    assert.equal(ram.pages, 1);
    assert.equal(ram.bytes, P);
  });

  test('is not idle in the middle of a page', () => {
    const { ram, feed } = rig();
    const b = new StreamBuilder().ramPage('pc.ram', 0, pageBytes(1)).build();
    feed(b.subarray(0, b.length - 1));
    assert.ok(!ram.idle);
    feed(b.subarray(b.length - 1));
    assert.ok(ram.idle);
  });

  test('uses the previous block for CONTINUE records, across sections', () => {
    const { host, ram, feed } = rig();
    const sb = new StreamBuilder();
    const first = sb.ramPage('0000:00:02.0/vga.vram', P, pageBytes(1)).ramPage('0000:00:02.0/vga.vram', 0, pageBytes(2)).ramEos().build();
    assert.equal(first.readUInt32BE(8 + 1 + 21 + P + 4) & RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_CONTINUE, 'the builder sent CONTINUE');
    assert.deepEqual(feed(first), ['eos']);
    ram.beginSection(false);
    // the next section starts with a CONTINUE record: the block survives the EOS
    const second = sb.ramZero('0000:00:02.0/vga.vram', P, 0).ramEos().build();
    assert.equal(second.length, 8 + 1 + 8);
    assert.deepEqual(feed(second), ['eos']);
    const vram = host.blocks.get('0000:00:02.0/vga.vram')!;
    assert.deepEqual(guest(vram, 0), pageBytes(2));
    assert.deepEqual(guest(vram, 1), ZERO);
    assert.deepEqual(guest(host.blocks.get('pc.ram')!, 0), ZERO);
  });

  test('fills a ZERO page with its fill byte (7.2 behaviour)', () => {
    const { host, ram, feed } = rig();
    const pc = host.blocks.get('pc.ram')!;
    pc.guest.page(5).fill(0x77);
    feed(new StreamBuilder().ramZero('pc.ram', 5 * P).ramZero('pc.ram', 6 * P, 0xab).ramEos().build());
    assert.deepEqual(guest(pc, 5), ZERO);
    assert.deepEqual(guest(pc, 6), Buffer.alloc(P, 0xab));
    assert.equal(ram.zeroPages, 2);
    assert.equal(ram.pages, 0);
  });

  test('returns flush for RAM_SAVE_FLAG_MULTIFD_FLUSH and continues after it', () => {
    const { host, feed } = rig();
    const r = feed(new StreamBuilder().ramMultifdFlush().ramPage('pc.ram', 0, pageBytes(7)).ramMultifdFlush().ramEos().build());
    assert.deepEqual(r, ['flush', 'flush', 'eos']);
    assert.deepEqual(guest(host.blocks.get('pc.ram')!, 0), pageBytes(7));
  });

  test('writes cache and guest without dirty bits when COLO is enabled but not yet running', () => {
    const { host, feed } = rig({ colo: true });
    host.mode = WRITE_BOTH;
    const pc = host.blocks.get('pc.ram')!;
    feed(new StreamBuilder().ramPage('pc.ram', P, pageBytes(1)).ramZero('pc.ram', 2 * P, 0x10).ramEos().build());
    assert.deepEqual(cache(pc, 1), pageBytes(1));
    assert.deepEqual(guest(pc, 1), pageBytes(1));
    assert.deepEqual(cache(pc, 2), Buffer.alloc(P, 0x10));
    assert.deepEqual(guest(pc, 2), Buffer.alloc(P, 0x10));
    assert.equal(pc.dirty!.count(), 0);
  });

  test('writes the cache only and marks normal and zero pages dirty in COLO state', () => {
    const { host, feed } = rig({ colo: true });
    host.mode = WRITE_CACHE;
    const pc = host.blocks.get('pc.ram')!;
    pc.guest.page(2).fill(0x33);
    pc.cache!.page(2).fill(0x33);
    feed(new StreamBuilder().ramPage('pc.ram', 7 * P, pageBytes(9)).ramZero('pc.ram', 2 * P).ramEos().build());
    assert.deepEqual(cache(pc, 7), pageBytes(9));
    assert.deepEqual(guest(pc, 7), ZERO);
    assert.deepEqual(cache(pc, 2), ZERO);
    assert.deepEqual(guest(pc, 2), Buffer.alloc(P, 0x33));
    assert.ok(pc.dirty!.test(7));
    assert.ok(pc.dirty!.test(2));
    assert.equal(pc.dirty!.count(), 2);
  });

  test('takes the write mode per page', () => {
    const { host, feed } = rig({ colo: true });
    const pc = host.blocks.get('pc.ram')!;
    host.mode = WRITE_BOTH;
    feed(new StreamBuilder().ramPage('pc.ram', 0, pageBytes(1)).build());
    host.mode = WRITE_CACHE;
    feed(new StreamBuilder().ramPage('pc.ram', P, pageBytes(2)).build());
    assert.deepEqual(guest(pc, 0), pageBytes(1));
    assert.deepEqual(guest(pc, 1), ZERO);
    assert.ok(!pc.dirty!.test(0));
    assert.ok(pc.dirty!.test(1));
  });

  test('accepts the last page of a block', () => {
    const { host, feed } = rig();
    feed(new StreamBuilder().ramPage('0000:00:02.0/vga.vram', P, pageBytes(4)).build());
    assert.deepEqual(guest(host.blocks.get('0000:00:02.0/vga.vram')!, 1), pageBytes(4));
  });

  test('rejects a page offset at the end of its block with ERR_RANGE and writes nothing', () => {
    const { host, feed } = rig();
    const b = new StreamBuilder().ramPage('0000:00:02.0/vga.vram', 2 * P, pageBytes(4)).build();
    expectError(() => feed(b), 'ERR_RANGE');
    for (const blk of host.blocks.blocks) for (let i = 0; i < blk.pages; i++) assert.deepEqual(guest(blk, i), ZERO);
  });

  test('rejects a CONTINUE page offset beyond the block with ERR_RANGE', () => {
    const { feed } = rig();
    const sb = new StreamBuilder().ramPage('0000:00:02.0/vga.vram', 0, pageBytes(1));
    feed(sb.build());
    expectError(() => feed(sb.ramZero('0000:00:02.0/vga.vram', 100 * P).build()), 'ERR_RANGE', 8 + 1 + 21 + P);
  });

  test('rejects an unknown block name with ERR_UNKNOWN_RAMBLOCK', () => {
    const { feed } = rig();
    expectError(() => feed(new StreamBuilder().ramPage('pc.ram1', 0, pageBytes(1)).build()), 'ERR_UNKNOWN_RAMBLOCK', 9);
  });

  test('rejects an empty block name in a page record with ERR_UNKNOWN_RAMBLOCK', () => {
    const { feed } = rig();
    expectError(() => feed(Buffer.concat([word(0, RAM_SAVE_FLAG_ZERO), Buffer.from([0, 0])])), 'ERR_UNKNOWN_RAMBLOCK');
  });

  test('rejects CONTINUE with no previous block with ERR_UNKNOWN_RAMBLOCK', () => {
    const { feed } = rig();
    expectError(() => feed(Buffer.concat([word(0, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE), Buffer.from([0])])), 'ERR_UNKNOWN_RAMBLOCK', 0);
  });

  test('rejects MEM_SIZE outside the START section with ERR_UNKNOWN_SECTION', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(false);
    expectError(() => feed(new StreamBuilder().ramMemSize(BLOCKS).build()), 'ERR_UNKNOWN_SECTION', 0);
  });

  test('rejects a second MEM_SIZE in the same START section with ERR_UNKNOWN_SECTION', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    const b = new StreamBuilder().ramMemSize(BLOCKS).build();
    feed(b);
    expectError(() => feed(b), 'ERR_UNKNOWN_SECTION', b.length);
  });

  test('rejects a MEM_SIZE total above maxRamBytes with ERR_LIMIT before reading the list', () => {
    const { host, ram, feed } = rig({ announce: false, limits: { maxRamBytes: 8 * P } });
    ram.beginSection(true);
    expectError(() => feed(word(9 * P, RAM_SAVE_FLAG_MEM_SIZE)), 'ERR_LIMIT', 0);
    assert.deepEqual(host.announced, []);
  });

  test('rejects a MEM_SIZE total of 0 with ERR_RANGE', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(word(0, RAM_SAVE_FLAG_MEM_SIZE)), 'ERR_RANGE', 0);
  });

  test('rejects block lengths that overshoot the MEM_SIZE total with ERR_RANGE', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(Buffer.concat([word(4 * P, RAM_SAVE_FLAG_MEM_SIZE), counted('a'), be64(2 * P), counted('b'), be64(4 * P)])), 'ERR_RANGE', 8 + 2 + 8);
  });

  test('rejects a block length that is not a page multiple with ERR_RANGE', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(Buffer.concat([word(4 * P, RAM_SAVE_FLAG_MEM_SIZE), counted('a'), be64(P + 1)])), 'ERR_RANGE', 8);
  });

  test('rejects a block length of 0 with ERR_RANGE', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(Buffer.concat([word(4 * P, RAM_SAVE_FLAG_MEM_SIZE), counted('a'), be64(0)])), 'ERR_RANGE', 8);
  });

  test('rejects a block length above 2^53 with ERR_RANGE', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    const huge = Buffer.alloc(8, 0xff);
    expectError(() => feed(Buffer.concat([word(4 * P, RAM_SAVE_FLAG_MEM_SIZE), counted('a'), huge])), 'ERR_RANGE', 8);
  });

  test('rejects an empty block name in MEM_SIZE with ERR_UNKNOWN_RAMBLOCK', () => {
    const { ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(Buffer.concat([word(P, RAM_SAVE_FLAG_MEM_SIZE), Buffer.from([0]), be64(P)])), 'ERR_UNKNOWN_RAMBLOCK', 8);
  });

  test('rejects a block listed twice with ERR_UNKNOWN_RAMBLOCK', () => {
    const { host, ram, feed } = rig({ announce: false });
    ram.beginSection(true);
    expectError(() => feed(Buffer.concat([word(2 * P, RAM_SAVE_FLAG_MEM_SIZE), counted('a'), be64(P), counted('a'), be64(P)])), 'ERR_UNKNOWN_RAMBLOCK', 8 + 10);
    assert.deepEqual(host.announced, []);
  });

  test('rejects more blocks than maxBlocks with ERR_LIMIT', () => {
    const { ram, feed } = rig({ announce: false, limits: { maxBlocks: 2 } });
    ram.beginSection(true);
    const entries = ['a', 'b', 'c'].map((n) => Buffer.concat([counted(n), be64(P)]));
    expectError(() => feed(Buffer.concat([word(3 * P, RAM_SAVE_FLAG_MEM_SIZE), ...entries])), 'ERR_LIMIT', 8 + 20);
  });

  for (const [name, flag] of [['XBZRLE', RAM_SAVE_FLAG_XBZRLE], ['COMPRESS_PAGE', RAM_SAVE_FLAG_COMPRESS_PAGE], ['HOOK', RAM_SAVE_FLAG_HOOK], ['FULL', RAM_SAVE_FLAG_FULL]] as const) {
    test(`rejects a ${name} record with ERR_UNSUPPORTED`, () => {
      const { feed } = rig();
      feed(new StreamBuilder().ramPage('pc.ram', 0, pageBytes(1)).build());
      expectError(() => feed(Buffer.concat([word(P, flag | RAM_SAVE_FLAG_CONTINUE), Buffer.alloc(16)])), 'ERR_UNSUPPORTED', 8 + 7 + P);
    });
  }

  test('rejects unknown record flags with ERR_UNKNOWN_SECTION', () => {
    const { feed } = rig();
    expectError(() => feed(word(0, 0x400)), 'ERR_UNKNOWN_SECTION', 0);
  });

  test('rejects ZERO and PAGE together with ERR_UNKNOWN_SECTION', () => {
    const { feed } = rig();
    expectError(() => feed(Buffer.concat([word(0, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE), counted('pc.ram')])), 'ERR_UNKNOWN_SECTION', 0);
  });

  test('rejects a record word of 0 with ERR_UNKNOWN_SECTION', () => {
    const { feed } = rig();
    expectError(() => feed(word(0, 0)), 'ERR_UNKNOWN_SECTION', 0);
  });

  test('rejects a record address above 2^53 with ERR_RANGE', () => {
    const { feed } = rig();
    const w = Buffer.alloc(8, 0xff);
    w.writeUInt32BE(RAM_SAVE_FLAG_PAGE, 4);
    expectError(() => feed(w), 'ERR_RANGE', 0);
  });

  test('reports errors on its own channel name and stream offset', () => {
    const { feed } = rig({ channel: 'colo-main' });
    feed(new StreamBuilder().ramPage('pc.ram', 0, pageBytes(1)).build());
    expectError(() => feed(word(0, 0x800)), 'ERR_UNKNOWN_SECTION', 8 + 7 + P, 'colo-main');
  });
});
