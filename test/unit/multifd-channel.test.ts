import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError, wireError, type MigrationErrorCode } from '../../src/errors.js';
import { SLOT_BYTES, SLOT_INDEX_BYTES, SLOT_PAYLOAD_BYTES, WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, runWriteTask, type WriteMode, type WriteTask } from '../../src/memory/page-writer.js';
import { RAMBlockList, type RAMBlock } from '../../src/memory/ram-block.js';
import { DEFAULT_LIMITS } from '../../src/migration/limits.js';
import { MultiFDChannel, type ChannelSink } from '../../src/migration/multifd-channel.js';
import type { MultiFDInit } from '../../src/migration/multifd-packet.js';
import { encodeMultiFDInit, encodeMultiFDPacketHeader, MultiFDPacketImage, type MultiFDPacketHeaderFields } from '../../src/sender/multifd-builder.js';
import { MULTIFD_FLAG_DEVICE_STATE, MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB, MULTIFD_PACKET_HEADER_LEN } from '../../src/wire/constants.js';

const P = 4096;
const INIT = 64;
const PKT = MULTIFD_PACKET_HEADER_LEN;

/** A page whose every byte depends on `seed` and its position. */
function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 31 + i * 7 + (i >> 8)) & 0xff;
  return b;
}

interface Pending { run: () => void; fail: (e: unknown) => void }

class Sink implements ChannelSink {
  readonly blocks = new RAMBlockList();
  mode: WriteMode = WRITE_GUEST;
  readonly events: string[] = [];
  readonly errors: MigrationError[] = [];
  readonly tasks: { normal: number; zero: number }[] = [];
  /** Hold page writes until run() is called: a busy page-writer pool. */
  hold = false;
  readonly pending: Pending[] = [];
  refuse: MigrationError | null = null;

  onHandshake(_ch: MultiFDChannel, init: MultiFDInit): void {
    this.events.push(`handshake ${init.id}`);
    if (this.refuse) throw this.refuse;
  }
  findBlock(idstr: string): RAMBlock | undefined { return this.blocks.get(idstr); }
  writeMode(): WriteMode { return this.mode; }
  /** Compressed payload bytes per submitted task (0 for NOCOMP). */
  readonly compressed: number[] = [];
  submit(_ch: MultiFDChannel, task: WriteTask, compressedBytes: number): Promise<number> {
    this.tasks.push({ normal: task.normalPages, zero: 0 });
    this.compressed.push(compressedBytes);
    if (compressedBytes > 0) return Promise.resolve(0);   // no decoder here: the staging slot is checked instead
    if (!this.hold) return Promise.resolve(runWriteTask(task));
    return new Promise((resolve, reject) => {
      this.pending.push({ run: () => resolve(runWriteTask(task)), fail: reject });
    });
  }
  onSynced(): void { this.events.push('synced'); }
  onBlocked(_ch: MultiFDChannel, blocked: boolean): void { this.events.push(blocked ? 'blocked' : 'unblocked'); }
  onError(err: MigrationError): void { this.errors.push(err); }

  runOne(): void { this.pending.shift()!.run(); }
}

/** Lets the promise callbacks of settled page writes run (no timers involved). */
async function settle(): Promise<void> {
  for (let i = 0; i < 4; i++) await new Promise<void>((r) => setImmediate(r));
}

function init(id: number): Buffer { return encodeMultiFDInit({ id }); }

/** A NOCOMP packet: header as QEMU fills it, then the normal pages back to back. */
function packet(f: Partial<MultiFDPacketHeaderFields> & { pages?: Buffer[] }): Buffer {
  const pages = f.pages ?? [];
  const offsets = f.offsets ?? [];
  const h = encodeMultiFDPacketHeader({
    flags: 0, pagesAlloc: 128, normalPages: pages.length, nextPacketSize: pages.length * P, packetNum: 1,
    ramblock: 'pc.ram', ...f, offsets,
  });
  return Buffer.concat([h, ...pages]);
}

function setup(opts: { slots?: number; blocks?: [string, number][] } = {}): { sink: Sink; ch: MultiFDChannel; ram: RAMBlock } {
  const sink = new Sink();
  for (const [name, len] of opts.blocks ?? [['pc.ram', 16 * P], ['vga.vram', 4 * P]]) sink.blocks.add(name, len);
  const ch = new MultiFDChannel(sink, 'none', DEFAULT_LIMITS, opts.slots ?? 4);
  return { sink, ch, ram: sink.blocks.get('pc.ram')! };
}

function guestPage(b: RAMBlock, i: number): Buffer { return Buffer.from(b.guest.page(i)); }
function cachePage(b: RAMBlock, i: number): Buffer { return Buffer.from(b.cache!.page(i)); }
const ZERO = Buffer.alloc(P);

function onlyError(sink: Sink, code: MigrationErrorCode, channel: string, streamOffset?: number): MigrationError {
  assert.equal(sink.errors.length, 1, `expected exactly one error, got ${sink.errors.map((e) => e.code).join(', ')}`);
  const e = sink.errors[0]!;
  assert.equal(e.code, code);
  assert.equal(e.channel, channel);
  if (streamOffset !== undefined) assert.equal(e.streamOffset, streamOffset);
  return e;
}

describe('MultiFDChannel', () => {
  test('completes the handshake and takes its name from the channel id', () => {
    const { sink, ch } = setup();
    assert.equal(ch.name, 'multifd/?');
    ch.push(init(3).subarray(0, 30));
    assert.equal(ch.id, -1);
    assert.equal(sink.events.length, 0, 'no handshake from a partial MultiFDInit_t');
    ch.push(init(3).subarray(30));
    assert.equal(ch.id, 3);
    assert.equal(ch.name, 'multifd/3');
    assert.ok(sink.events.includes('handshake 3'));
    assert.ok(ch.quiescent);
  });

  test('writes the pages of a NOCOMP packet to guest memory in offset-array order', async () => {
    const { sink, ch, ram } = setup();
    const a = pageBytes(1), b = pageBytes(2), c = pageBytes(3);
    ch.push(Buffer.concat([init(0), packet({ offsets: [2 * P, 0, 15 * P], pages: [a, b, c] })]));
    await settle();
    assert.deepEqual(guestPage(ram, 2), a);
    assert.deepEqual(guestPage(ram, 0), b);
    assert.deepEqual(guestPage(ram, 15), c);
    assert.deepEqual(guestPage(ram, 1), ZERO);
    assert.equal(ch.packets, 1);
    assert.equal(ch.pages, 3);
    assert.equal(ch.bytes, 3 * P);
    assert.deepEqual(sink.errors, []);
    assert.ok(ch.quiescent);
  });

  test('parses a MULTIFD_FLAG_SYNC packet and parks until released', async () => {
    const { sink, ch, ram } = setup();
    const data = packet({ offsets: [P], pages: [pageBytes(9)], packetNum: 2 });
    ch.push(Buffer.concat([init(1), packet({ flags: MULTIFD_FLAG_SYNC, packetNum: 1 }), data]));
    await settle();
    assert.ok(ch.atSync);
    assert.ok(ch.synced);
    assert.equal(sink.events.filter((e) => e === 'synced').length, 1);
    assert.equal(ch.syncs, 1);
    assert.equal(ch.packets, 1, 'nothing after the SYNC packet is parsed before the barrier');
    assert.equal(ch.q.length, data.length);
    assert.equal(sink.events.at(-1), 'blocked');
    ch.release();
    await settle();
    assert.equal(ch.packets, 2);
    assert.ok(!ch.atSync);
    assert.deepEqual(guestPage(ram, 1), pageBytes(9));
    assert.deepEqual(sink.errors, []);
  });

  test('release() outside a SYNC is a no-op', async () => {
    const { sink, ch } = setup();
    ch.push(init(0));
    ch.release();
    ch.push(packet({ offsets: [0], pages: [pageBytes(1)] }));
    await settle();
    assert.equal(ch.packets, 1);
    assert.deepEqual(sink.errors, []);
  });

  test('writes the pages of a 7.2 SYNC packet before it counts as synced', async () => {
    const { sink, ch, ram } = setup();
    sink.hold = true;
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_SYNC, offsets: [4 * P], pages: [pageBytes(4)] })]));
    await settle();
    assert.ok(ch.atSync);
    assert.ok(!ch.synced, 'the page write is still running');
    assert.ok(!sink.events.includes('synced'));
    assert.deepEqual(guestPage(ram, 4), ZERO);
    sink.runOne();
    await settle();
    assert.ok(ch.synced);
    assert.equal(sink.events.filter((e) => e === 'synced').length, 1);
    assert.deepEqual(guestPage(ram, 4), pageBytes(4));
  });

  test('reads no payload after an empty packet with 7.2 stale next_packet_size, ramblock and offsets', async () => {
    const { sink, ch, ram } = setup();
    const img = new MultiFDPacketImage({ clearEachFill: false, staleFields: true, staleOffsets: true });
    const pages = [pageBytes(10), pageBytes(11), pageBytes(12), pageBytes(13)];
    const parts: Buffer[] = [init(2)];
    // the channel's first packet: SYNC without pages (RAM setup)
    parts.push(Buffer.from(img.fill({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 0, ramblock: undefined, offsets: [], count: 0 })));
    parts.push(Buffer.from(img.fill({ flags: 0, pagesAlloc: 128, normalPages: 4, zeroPages: 0, nextPacketSize: 4 * P, packetNum: 3, ramblock: 'vga.vram', offsets: [0, P, 2 * P, 3 * P], count: 4 })), ...pages);
    // SYNC with stale fields: next_packet_size 16384, ramblock vga.vram, offsets 0..3 — but no pages follow
    parts.push(Buffer.from(img.fill({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 8, ramblock: undefined, offsets: [], count: 0 })));
    // the empty non-SYNC packet with the same packet_num that 7.2 sends after it
    parts.push(Buffer.from(img.fill({ flags: 0, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 8, ramblock: undefined, offsets: [], count: 0 })));
    parts.push(Buffer.from(img.fill({ flags: 0, pagesAlloc: 128, normalPages: 1, zeroPages: 0, nextPacketSize: P, packetNum: 9, ramblock: 'pc.ram', offsets: [7 * P], count: 1 })), pageBytes(14));
    const stream = Buffer.concat(parts);
    assert.equal(stream.readUInt32BE(INIT + PKT + PKT + 4 * P + 20), 4 * P, 'the SYNC header carries a stale next_packet_size');
    ch.push(stream);
    await settle();
    assert.ok(ch.atSync);
    ch.release();
    await settle();
    assert.ok(ch.atSync, 'the second SYNC');
    ch.release();
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.equal(ch.packets, 5);
    assert.equal(ch.syncs, 2);
    assert.equal(ch.pages, 5);
    for (let k = 0; k < 4; k++) assert.deepEqual(guestPage(sink.blocks.get('vga.vram')!, k), pages[k]);
    assert.deepEqual(guestPage(ram, 7), pageBytes(14));
    assert.equal(ch.q.length, 0);
    assert.ok(ch.quiescent);
  });

  test('ignores the ramblock name of a packet without pages', async () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(0), packet({ ramblock: 'no.such.block', nextPacketSize: 8 * P })]));
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.equal(ch.packets, 1);
  });

  test('accepts a duplicate packet_num', async () => {
    const { sink, ch, ram } = setup();
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_SYNC, offsets: [0], pages: [pageBytes(1)], packetNum: 5 })]));
    await settle();
    ch.release();
    ch.push(Buffer.concat([packet({ packetNum: 5 }), packet({ offsets: [P], pages: [pageBytes(2)], packetNum: 5 })]));
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.equal(ch.packets, 3);
    assert.deepEqual(guestPage(ram, 0), pageBytes(1));
    assert.deepEqual(guestPage(ram, 1), pageBytes(2));
  });

  test('zeroes the pages of 9.0+ zero-page entries', async () => {
    const { sink, ch, ram } = setup();
    ram.guest.page(3).fill(0xff);
    ram.guest.page(5).fill(0xff);
    ram.guest.page(6).fill(0xff);
    ch.push(Buffer.concat([init(0), packet({ offsets: [6 * P, 3 * P, 5 * P], normalPages: 1, zeroPages: 2, nextPacketSize: P, pages: [pageBytes(6)] })]));
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.deepEqual(sink.tasks, [{ normal: 1, zero: 0 }], "zero pages are table entries, not worker tasks");
    assert.deepEqual(guestPage(ram, 6), pageBytes(6));
    assert.deepEqual(guestPage(ram, 3), ZERO);
    assert.deepEqual(guestPage(ram, 5), ZERO);
    assert.equal(ch.zeroPages, 2);
  });

  test('in COLO state writes the cache only and marks normal and zero pages dirty', async () => {
    const { sink, ch, ram } = setup();
    ram.enableColo();
    sink.mode = WRITE_CACHE;
    ram.cache!.page(9).fill(0x55);
    ch.push(Buffer.concat([init(0), packet({ offsets: [2 * P, 9 * P], normalPages: 1, zeroPages: 1, nextPacketSize: P, pages: [pageBytes(2)] })]));
    await settle();
    assert.deepEqual(cachePage(ram, 2), pageBytes(2));
    assert.deepEqual(cachePage(ram, 9), ZERO);
    assert.deepEqual(guestPage(ram, 2), ZERO, 'guest memory is the committed image');
    assert.ok(ram.dirty!.test(2));
    assert.ok(ram.dirty!.test(9));
    assert.equal(ram.dirty!.count(), 2);
  });

  test('with COLO enabled before COLO state writes cache and guest without dirty bits', async () => {
    const { sink, ch, ram } = setup();
    ram.enableColo();
    sink.mode = WRITE_BOTH;
    ch.push(Buffer.concat([init(0), packet({ offsets: [P], pages: [pageBytes(5)] })]));
    await settle();
    assert.deepEqual(cachePage(ram, 1), pageBytes(5));
    assert.deepEqual(guestPage(ram, 1), pageBytes(5));
    assert.equal(ram.dirty!.count(), 0);
  });

  test('waits for a free staging slot and tells the sink it is blocked', async () => {
    const { sink, ch, ram } = setup({ slots: 1 });
    sink.hold = true;
    ch.push(Buffer.concat([init(0), packet({ offsets: [0], pages: [pageBytes(1)] }), packet({ offsets: [P], pages: [pageBytes(2)] })]));
    await settle();
    assert.equal(sink.tasks.length, 1, 'the second packet waits for the only slot');
    assert.equal(sink.events.at(-1), 'blocked');
    assert.ok(!ch.quiescent);
    sink.runOne();
    await settle();
    assert.equal(sink.tasks.length, 2);
    assert.equal(sink.events.at(-1), 'unblocked');
    sink.runOne();
    await settle();
    assert.deepEqual(guestPage(ram, 0), pageBytes(1));
    assert.deepEqual(guestPage(ram, 1), pageBytes(2));
    assert.ok(ch.quiescent);
  });

  test('parses a stream fed one byte at a time', async () => {
    const { sink, ch, ram } = setup();
    const stream = Buffer.concat([init(7), packet({ flags: MULTIFD_FLAG_SYNC }), packet({ offsets: [3 * P, 4 * P], pages: [pageBytes(3), pageBytes(4)] })]);
    for (let i = 0; i < stream.length; i++) {
      ch.push(stream.subarray(i, i + 1));
      if (ch.atSync) ch.release();
    }
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.equal(ch.packets, 2);
    assert.deepEqual(guestPage(ram, 3), pageBytes(3));
    assert.deepEqual(guestPage(ram, 4), pageBytes(4));
  });

  test('ends cleanly when the peer closes at a packet boundary', async () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(0), packet({ offsets: [0], pages: [pageBytes(1)] })]));
    ch.end();
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.ok(ch.ended);
    assert.ok(ch.exhausted);
  });

  test('parses bytes queued behind a SYNC after the peer closed', async () => {
    const { sink, ch, ram } = setup();
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_SYNC }), packet({ offsets: [2 * P], pages: [pageBytes(8)] })]));
    ch.end();
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.ok(!ch.exhausted, 'bytes are still queued');
    ch.release();
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.ok(ch.exhausted);
    assert.deepEqual(guestPage(ram, 2), pageBytes(8));
  });

  test('rejects EOF inside a packet header with ERR_TRUNCATED', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(4), packet({ offsets: [0], pages: [pageBytes(1)] }).subarray(0, 100)]));
    ch.end();
    onlyError(sink, 'ERR_TRUNCATED', 'multifd/4', INIT);
    assert.ok(ch.failed);
  });

  test('rejects EOF inside a packet payload with ERR_TRUNCATED', async () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(4), packet({ offsets: [0, P], pages: [pageBytes(1), pageBytes(2)] }).subarray(0, PKT + P + 10)]));
    await settle();
    ch.end();
    onlyError(sink, 'ERR_TRUNCATED', 'multifd/4');
  });

  test('rejects EOF inside the handshake with ERR_TRUNCATED', () => {
    const { sink, ch } = setup();
    ch.push(init(0).subarray(0, 10));
    ch.end();
    onlyError(sink, 'ERR_TRUNCATED', 'multifd/?');
  });

  test('rejects a wrong handshake magic with ERR_BAD_MAGIC before the channel has an id', () => {
    const { sink, ch } = setup();
    const b = init(1);
    b.writeUInt32BE(0xdeadbeef, 0);
    ch.push(b);
    onlyError(sink, 'ERR_BAD_MAGIC', 'multifd/?', 0);
    assert.ok(!sink.events.some((e) => e.startsWith('handshake')));
  });

  test('rejects a wrong packet magic with ERR_BAD_MAGIC at the packet offset', () => {
    const { sink, ch } = setup();
    const bad = packet({});
    bad.writeUInt32BE(0x44332211, 0);
    ch.push(Buffer.concat([init(2), packet({}), bad]));
    onlyError(sink, 'ERR_BAD_MAGIC', 'multifd/2', INIT + PKT);
  });

  test('rejects a device-state packet with ERR_UNSUPPORTED from its first 12 bytes', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_DEVICE_STATE }).subarray(0, 12)]));
    onlyError(sink, 'ERR_UNSUPPORTED', 'multifd/0', INIT);
  });

  test('rejects an unknown ramblock with ERR_UNKNOWN_RAMBLOCK', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(1), packet({ ramblock: 'pc.ram2', offsets: [0], pages: [pageBytes(1)] })]));
    onlyError(sink, 'ERR_UNKNOWN_RAMBLOCK', 'multifd/1', INIT + 64);
    assert.deepEqual(sink.tasks, []);
  });

  test('rejects an offset past the end of the block with ERR_RANGE and writes nothing', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(1), packet({ ramblock: 'vga.vram', offsets: [0, 4 * P], pages: [pageBytes(1), pageBytes(2)] })]));
    onlyError(sink, 'ERR_RANGE', 'multifd/1', INIT + 320 + 8);
    assert.deepEqual(sink.tasks, []);
    assert.deepEqual(guestPage(sink.blocks.get('vga.vram')!, 0), ZERO);
  });

  test('accepts the last page of a block', async () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(1), packet({ ramblock: 'vga.vram', offsets: [3 * P], pages: [pageBytes(1)] })]));
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.deepEqual(guestPage(sink.blocks.get('vga.vram')!, 3), pageBytes(1));
  });

  test('rejects an unaligned offset with ERR_RANGE', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(1), packet({ offsets: [P + 512], pages: [pageBytes(1)] })]));
    onlyError(sink, 'ERR_RANGE', 'multifd/1');
  });

  test('rejects an out-of-range zero-page offset with ERR_RANGE', () => {
    const { sink, ch } = setup();
    ch.push(Buffer.concat([init(1), packet({ offsets: [16 * P], normalPages: 0, zeroPages: 1 })]));
    onlyError(sink, 'ERR_RANGE', 'multifd/1');
  });

  test('copies a compressed payload into its staging slot and hands its length to the sink', async () => {
    const sink = new Sink();
    sink.blocks.add('pc.ram', 16 * P);
    const ch = new MultiFDChannel(sink, 'zlib', DEFAULT_LIMITS, 2);
    const payload = Buffer.alloc(300, 0x78);
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_ZLIB, offsets: [0, P], normalPages: 2, nextPacketSize: payload.length }), payload]));
    await settle();
    assert.deepEqual(sink.errors, []);
    assert.deepEqual(sink.compressed, [300]);
    assert.deepEqual(Buffer.from(new Uint8Array(ch.staging, SLOT_INDEX_BYTES, 300)), payload);
    assert.ok(ch.quiescent);
  });

  test('rejects a compressed payload larger than a staging slot with ERR_LIMIT, whatever maxPacketPayload says', async () => {
    const sink = new Sink();
    sink.blocks.add('pc.ram', 16 * P);
    sink.hold = true;
    const ch = new MultiFDChannel(sink, 'zlib', { ...DEFAULT_LIMITS, maxPacketPayload: 4 * SLOT_PAYLOAD_BYTES }, 2);
    const big = SLOT_PAYLOAD_BYTES + 4096;
    ch.push(Buffer.concat([init(0), packet({ flags: MULTIFD_FLAG_ZLIB, offsets: [0], normalPages: 1, nextPacketSize: big })]));
    ch.push(Buffer.alloc(big, 0xee));
    await settle();
    // the payload must not spill into the next slot (its page indexes and data belong to another packet)
    assert.ok(new Uint8Array(ch.staging, SLOT_BYTES, 4096).every((x) => x === 0), 'the next staging slot was overwritten');
    onlyError(sink, 'ERR_LIMIT', 'multifd/0', INIT + 20);
  });

  test('fails once and ignores later input', async () => {
    const { sink, ch } = setup();
    const bad = packet({});
    bad.writeUInt32BE(3, 4);
    ch.push(Buffer.concat([init(0), bad]));
    onlyError(sink, 'ERR_BAD_VERSION', 'multifd/0', INIT);
    ch.push(packet({ offsets: [0], pages: [pageBytes(1)] }));
    ch.push(bad);
    ch.end();
    await settle();
    assert.equal(sink.errors.length, 1);
    assert.deepEqual(sink.tasks, []);
    assert.equal(ch.q.length, 0);
    assert.ok(ch.failed);
  });

  test('fails the channel when the sink refuses the handshake', () => {
    const { sink, ch } = setup();
    sink.refuse = wireError('ERR_HANDSHAKE', 'duplicate id', 'multifd/5', 24);
    ch.push(Buffer.concat([init(5), packet({ offsets: [0], pages: [pageBytes(1)] })]));
    assert.equal(sink.errors.length, 1);
    assert.equal(sink.errors[0], sink.refuse);
    assert.ok(ch.failed);
    assert.deepEqual(sink.tasks, []);
  });

  test('fails with ERR_WORKER when a page write is rejected', async () => {
    const { sink, ch } = setup();
    sink.hold = true;
    ch.push(Buffer.concat([init(0), packet({ offsets: [0], pages: [pageBytes(1)] })]));
    sink.pending.shift()!.fail(new Error('worker died'));
    await settle();
    onlyError(sink, 'ERR_WORKER', 'multifd/0', INIT);
    assert.ok(sink.errors[0]!.cause instanceof Error);
  });

  test('passes a MigrationError from the page writer through unchanged', async () => {
    const { sink, ch } = setup();
    sink.hold = true;
    ch.push(Buffer.concat([init(0), packet({ offsets: [0], pages: [pageBytes(1)] })]));
    const e = wireError('ERR_DECOMPRESS', 'bad stream', 'multifd/0', 99);
    sink.pending.shift()!.fail(e);
    await settle();
    assert.deepEqual(sink.errors, [e]);
  });
});
