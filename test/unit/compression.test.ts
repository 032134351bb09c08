// multifd-compression zlib/zstd (spec §2.5.2, §2.5.3): the send-side encoders against QEMU's
// format, the per-channel decoders against the encoders, write modes, and corrupt payloads.
import assert from 'node:assert/strict';
import zlib from 'node:zlib';
import { describe, test } from 'node:test';
import { ChannelDecoder, ChannelDecoders, runDecodeTask, type CompressionMethod, type DecodeTask } from '../../src/compression/decoder.js';
import { zstd } from '../../src/compression/zstd.js';
import { MigrationError } from '../../src/errors.js';
import { SLOT_BYTES, SLOT_INDEX_BYTES, WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, type WriteMode } from '../../src/memory/page-writer.js';
import { RAMBlock } from '../../src/memory/ram-block.js';
import { chunksFor, Slab, SlotMemory } from '../../src/memory/slab.js';
import { DecoderThread } from '../../src/pool/page-pool.js';
import type { MultiFDEncoder } from '../../src/sender/multifd-builder.js';
import { ZlibEncoder, ZstdEncoder } from '../../src/sender/multifd-compress.js';
import { Prng } from '../../src/sender/prng.js';
import { MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD } from '../../src/wire/constants.js';

const P = 4096;
const METHODS: CompressionMethod[] = ['zlib', 'zstd'];
const encoder = (m: CompressionMethod): MultiFDEncoder => (m === 'zlib' ? new ZlibEncoder() : new ZstdEncoder());

/** Guest-like page contents: random, a repeated word, text-like, sparse (cf. the memory model). */
function makePage(rnd: Prng): Buffer {
  const b = Buffer.alloc(P), kind = rnd.int(4);
  if (kind === 0) for (let i = 0; i < P; i++) b[i] = rnd.int(256);
  else if (kind === 1) b.fill(rnd.int(255) + 1);
  else if (kind === 2) for (let i = 0; i < P; i++) b[i] = 0x20 + rnd.int(0x5f);
  else for (let i = 0; i < 16; i++) b[rnd.int(P)] = rnd.int(256) | 1;
  return b;
}

interface Packet { pages: Buffer[]; indexes: number[]; payload: Buffer }

/**
 * `counts[i]` pages per packet, one encoder (one channel stream), pages scattered over
 * `blockPages`; `runs`: in address order with a gap now and then, as QEMU queues dirty pages.
 */
function stream(method: CompressionMethod, counts: number[], blockPages: number, seed = 1, runs = false): Packet[] {
  const rnd = new Prng(seed), enc = encoder(method);
  const free = Array.from({ length: blockPages }, (_, i) => i);
  if (runs) for (let i = free.length - 1; i > 0; i--) { if (rnd.chance(0.1)) free.splice(i, 1); }
  else for (let i = free.length - 1; i > 0; i--) { const j = rnd.int(i + 1); [free[i], free[j]] = [free[j]!, free[i]!]; }
  return counts.map((n) => {
    const pages = Array.from({ length: n }, () => makePage(rnd));
    const indexes = free.splice(0, n);
    return { pages, indexes, payload: enc.encode(pages) };
  });
}

function block(pages: number): RAMBlock {
  const b = new RAMBlock(0, 'pc.ram', pages * P, new Slab({ chunkSlotBits: 8 }));
  b.enableColo();
  return b;
}

/** Slots for pages as the channel picks them (normal pages), and the zero pages recorded. */
function place(b: RAMBlock, mode: WriteMode, indexes: number[], normalPages: number): number[] {
  const slots = indexes.slice(0, normalPages).map((pg) => b.slotFor(pg, mode));
  for (const pg of indexes.slice(normalPages)) b.zeroPage(pg, mode);
  return slots;
}

/** Every chunk of the block's slab, for decoding outside a task. */
function slotsOf(b: RAMBlock, indexes: number[]): [Uint32Array, SlotMemory] {
  const slots = Uint32Array.from(place(b, WRITE_GUEST, indexes, indexes.length));
  return [slots, new SlotMemory(chunksFor(b.slab, slots, slots.length))];
}

/** A staging slot with the packet's page slots and payload, and its task (cf. MultiFDChannel). */
function task(method: CompressionMethod, b: RAMBlock, mode: WriteMode, seq: number, indexes: number[], normalPages: number, payload: Uint8Array,
              staging = new SharedArrayBuffer(SLOT_BYTES), slotOffset = 0, key = 'k'): DecodeTask {
  const slots = place(b, mode, indexes, normalPages);
  new Uint32Array(staging, slotOffset, slots.length).set(slots);
  new Uint8Array(staging, slotOffset + SLOT_INDEX_BYTES, payload.length).set(payload);
  return {
    op: 'decode', key, method, seq, channel: 'multifd/0', mem: chunksFor(b.slab, slots, slots.length), staging, slotOffset,
    normalPages, payloadLen: payload.length,
  };
}

/** Decodes a packet into the pages `indexes` (committed, in place) through the channel's decoder. */
function decodeInto(dec: ChannelDecoder, b: RAMBlock, seq: number, p: { payload: Uint8Array; indexes: number[] }, normalPages: number): void {
  const [slots, mem] = slotsOf(b, p.indexes.slice(0, normalPages));
  dec.decodePacket(seq, p.payload, slots, normalPages, mem, 'multifd/0');
}

function code(fn: () => unknown): string {
  try { fn(); } catch (e) { assert.ok(e instanceof MigrationError, `a MigrationError, got ${String(e)}`); return e.code; }
  return 'no error';
}

/** The whole slab, chunk by chunk. */
function slabBytes(b: RAMBlock): Buffer[] { return b.slab.views.map((v) => Buffer.from(v ?? new Uint8Array(0))); }

/** Every slot of the slab except `allowed` equals `before`. */
function assertUntouchedExcept(b: RAMBlock, before: Buffer[], allowed: number[], what: string): void {
  const ok = new Set(allowed);
  b.slab.views.forEach((v, c) => {
    const now = Buffer.from(v ?? new Uint8Array(0)), was = before[c] ?? Buffer.alloc(0);
    for (let k = 0; k < now.length / P; k++) {
      const slot = c * b.slab.chunkSlots + k;
      if (ok.has(slot)) continue;
      const old = was.length > 0 ? was.subarray(k * P, (k + 1) * P) : Buffer.alloc(P);
      if (!now.subarray(k * P, (k + 1) * P).equals(old)) assert.fail(`${what}: slot ${slot} outside the packet was written`);
    }
  });
}

describe('ZlibEncoder and ZstdEncoder write what QEMU 7.2 writes', () => {
  test('zlib: header 78 01 only in the first payload, every payload ends with the sync-flush marker', () => {
    const pk = stream('zlib', [3, 1, 128, 7], 256);
    assert.deepEqual([...pk[0]!.payload.subarray(0, 2)], [0x78, 0x01]);
    for (const p of pk) assert.deepEqual([...p.payload.subarray(-4)], [0x00, 0x00, 0xff, 0xff]);
    for (const p of pk.slice(1)) assert.notDeepEqual([...p.payload.subarray(0, 2)], [0x78, 0x01]);
    // the concatenation is one unfinished zlib stream: it inflates (sync flush) to every page
    const all = zlib.inflateSync(Buffer.concat(pk.map((p) => p.payload)), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
    assert.ok(all.equals(Buffer.concat(pk.flatMap((p) => p.pages))));
    assert.equal(new ZlibEncoder().methodFlag, MULTIFD_FLAG_ZLIB);
  });

  test('zstd: frame header 28 b5 2f fd 00 48 only in the first payload, the frame never ends', () => {
    const pk = stream('zstd', [3, 1, 128, 7], 256);
    assert.deepEqual([...pk[0]!.payload.subarray(0, 6)], [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x48]);
    for (const p of pk.slice(1)) assert.notDeepEqual([...p.payload.subarray(0, 4)], [0x28, 0xb5, 0x2f, 0xfd]);
    const d = new zstd.DCtx(), all = Buffer.concat(pk.map((p) => p.payload)), out = Buffer.alloc(140 * P);
    const [ret, written, read] = d.decompressStream(out, all);
    assert.equal(read, all.length);
    assert.ok(out.subarray(0, written).equals(Buffer.concat(pk.flatMap((p) => p.pages))));
    assert.notEqual(ret, 0, 'the frame is not finished');
    assert.equal(new ZstdEncoder().methodFlag, MULTIFD_FLAG_ZSTD);
  });
});

describe('ChannelDecoder', () => {
  for (const method of METHODS) {
    test(`${method}: decodes one channel's packets in order into their scattered pages`, () => {
      const counts = [1, 128, 5, 64, 2, 128, 17, 1, 33, 100];
      const b = block(1024), pk = stream(method, counts, 1024, 7);
      const dec = new ChannelDecoder(method);
      pk.forEach((p, seq) => decodeInto(dec, b, seq, p, p.pages.length));
      for (const p of pk) p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(p.pages[k]!), `page ${pg}`));
      assert.equal(dec.pages, counts.reduce((a, n) => a + n, 0));
    });

    test(`${method}: decodes packets of consecutive pages (one output span per run) byte for byte`, () => {
      const counts = [128, 3, 128, 60, 1, 128];
      const b = block(1024), pk = stream(method, counts, 1024, 8, true);
      assert.ok(pk.some((p) => p.indexes.every((pg, k) => k === 0 || pg === p.indexes[k - 1]! + 1)), 'some packet is one run');
      const dec = new ChannelDecoder(method);
      pk.forEach((p, seq) => decodeInto(dec, b, seq, p, p.pages.length));
      for (const p of pk) p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(p.pages[k]!), `page ${pg}`));
    });

    test(`${method}: a later payload does not decode with a fresh decoder (the stream continues across packets)`, () => {
      const b = block(64), pk = stream(method, [8, 8], 64, 3);
      const dec = new ChannelDecoder(method);
      assert.equal(code(() => decodeInto(dec, b, 0, pk[1]!, 8)), 'ERR_DECOMPRESS');
    });

    test(`${method}: a packet out of order is ERR_WORKER, and the decoder refuses everything after a failure`, () => {
      const b = block(64), pk = stream(method, [4, 4, 4], 64);
      const dec = new ChannelDecoder(method);
      decodeInto(dec, b, 0, pk[0]!, 4);
      assert.equal(code(() => decodeInto(dec, b, 2, pk[2]!, 4)), 'ERR_WORKER');
      assert.equal(code(() => decodeInto(dec, b, 1, pk[1]!, 4)), 'ERR_DECOMPRESS');
    });
  }
});

describe('corrupt payloads: ERR_DECOMPRESS, nothing written outside the packet\'s pages', () => {
  // Each case: the packet to feed after one good packet, as [payload, normal_pages].
  // Neither stream carries a checksum (no Adler-32, no zstd content checksum), so bytes changed
  // inside stored data decode to wrong pages of the right size, in QEMU as here: that case
  // only has to stay inside the packet's pages.
  const cases: { name: string; undetectable?: boolean; make: (good: Packet, next: Packet, rnd: Prng) => [Buffer, number] }[] = [
    { name: 'payload cut in half', make: (_g, n) => [n.payload.subarray(0, n.payload.length >> 1), n.pages.length] },
    { name: 'normal_pages one more than the payload holds', make: (_g, n) => [n.payload, n.pages.length + 1] },
    { name: 'normal_pages one less than the payload holds', make: (_g, n) => [n.payload, n.pages.length - 1] },
    { name: 'the next packet appended to the payload', make: (_g, n) => [Buffer.concat([n.payload, n.payload]), n.pages.length] },
    { name: 'random bytes', make: (_g, n, rnd) => [Buffer.from(Array.from({ length: n.payload.length }, () => rnd.int(256))), n.pages.length] },
    { name: 'bytes overwritten in the middle', undetectable: true, make: (_g, n) => { const b = Buffer.from(n.payload); b.fill(0xff, b.length >> 2, (b.length >> 2) + 64); return [b, n.pages.length]; } },
    { name: 'the first packet again (a fresh stream mid-stream)', make: (g) => [g.payload, g.pages.length] },
  ];
  for (const method of METHODS) {
    for (const c of cases) {
      for (const [mode, runs] of [[WRITE_GUEST, false], [WRITE_BOTH, false], [WRITE_CACHE, false], [WRITE_GUEST, true], [WRITE_CACHE, true]] as const) {
        test(`${method}, ${c.name}, mode ${mode}, pages ${runs ? 'in runs' : 'scattered'}`, () => {
          const b = block(2048), rnd = new Prng(9);
          const [good, next] = stream(method, [40, 60], 512, 5, runs) as [Packet, Packet];
          const dec = new ChannelDecoders();
          // every page holds a slot with a pattern, so a stray write shows
          for (let pg = 0; pg < 1024; pg++) b.slotFor(pg, WRITE_GUEST);
          for (const v of b.slab.views) for (let i = 0; i < v!.length; i += 97) v![i] = (i >> 7) & 0xff;
          assert.equal(dec.run(task(method, b, mode, 0, good.indexes, 40, good.payload)), 40);
          const committedBefore = [...b.committed];
          const [payload, normal] = c.make(good, next, rnd);
          const indexes = next.indexes.slice(0, Math.min(normal, next.indexes.length));
          // an extra listed page; in runs right after the last one, so the output span grows
          while (indexes.length < normal) indexes.push(runs ? indexes[indexes.length - 1]! + 1 : 1000 + indexes.length);
          const t = task(method, b, mode, 1, indexes, normal, payload);
          const allowed = [...new Uint32Array(t.staging, t.slotOffset, normal)];
          const before = slabBytes(b);
          const r = dec.run(t);
          assertUntouchedExcept(b, before, allowed, 'decode target');
          if (mode === WRITE_CACHE) assert.deepEqual([...b.committed], committedBefore, 'committed table untouched by a checkpoint packet');
          if (c.undetectable && typeof r === 'number') return;
          assert.equal(typeof r === 'number' ? 'no error' : r.code, 'ERR_DECOMPRESS');
          // the stream is dead: the good next packet is refused too
          const again = dec.run(task(method, b, mode, 2, next.indexes, next.pages.length, next.payload));
          assert.equal(typeof again === 'number' ? 'no error' : again.code, 'ERR_DECOMPRESS');
        });
      }
    }
  }
});

describe('runDecodeTask writes like an uncompressed packet', () => {
  for (const method of METHODS) {
    test(`${method}: WRITE_GUEST writes committed pages in place; a zero page drops its slot`, () => {
      const b = block(64), [p] = stream(method, [6], 64, 2) as [Packet];
      b.guest.page(60).fill(0xcc);
      const dec = new ChannelDecoder(method);
      assert.equal(runDecodeTask(task(method, b, WRITE_GUEST, 0, [...p.indexes, 60], 6, p.payload), dec), 6);
      p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(p.pages[k]!)));
      assert.equal(b.committedPage(60), null);
      assert.equal(b.dirty!.count(), 0);
    });

    test(`${method}: WRITE_CACHE writes pending slots only and marks normal and zero pages dirty`, () => {
      const b = block(64), [p] = stream(method, [6], 64, 2) as [Packet];
      b.guest.page(62).fill(0xcc);
      runDecodeTask(task(method, b, WRITE_CACHE, 0, [...p.indexes, 62], 6, p.payload), new ChannelDecoder(method));
      p.indexes.forEach((pg, k) => {
        assert.ok(Buffer.from(b.cache!.page(pg)).equals(p.pages[k]!));
        assert.equal(b.committedPage(pg), null, 'committed untouched until the commit');
        assert.ok(b.dirty!.test(pg));
      });
      assert.ok(Buffer.from(b.cache!.page(62)).equals(Buffer.alloc(P)));
      assert.ok(b.dirty!.test(62));
      assert.equal(b.dirty!.count(), 7);
      b.commit();
      p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.committedPage(pg)!).equals(p.pages[k]!)));
      assert.equal(b.committedPage(62), null);
    });

    test(`${method}: a packet of zero pages only does not touch the stream`, () => {
      const b = block(64), pk = stream(method, [3, 3], 64, 4);
      const dec = new ChannelDecoder(method);
      runDecodeTask(task(method, b, WRITE_GUEST, 0, pk[0]!.indexes, 3, pk[0]!.payload), dec);
      assert.equal(runDecodeTask(task(method, b, WRITE_GUEST, 1, [63], 0, new Uint8Array(0)), dec), 0);
      runDecodeTask(task(method, b, WRITE_GUEST, 2, pk[1]!.indexes, 3, pk[1]!.payload), dec);
      pk[1]!.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(pk[1]!.pages[k]!)));
    });
  }

  test('ChannelDecoders: a stream first seen after its first packet is ERR_WORKER (decoder state lost)', () => {
    const b = block(16), [, p] = stream('zstd', [2, 2], 16) as [Packet, Packet];
    const r = new ChannelDecoders().run(task('zstd', b, WRITE_GUEST, 1, p.indexes, 2, p.payload));
    assert.equal(typeof r === 'number' ? 'no error' : r.code, 'ERR_WORKER');
  });

  test('ChannelDecoders keeps one stream per key', () => {
    const b = block(128), a = stream('zlib', [4, 4], 64, 1), z = stream('zlib', [4, 4], 64, 2).map((p) => ({ ...p, indexes: p.indexes.map((i) => i + 64) }));
    const dec = new ChannelDecoders();
    for (const seq of [0, 1]) {
      assert.equal(dec.run(task('zlib', b, WRITE_GUEST, seq, a[seq]!.indexes, 4, a[seq]!.payload, undefined, 0, 'mig/0')), 4);
      assert.equal(dec.run(task('zlib', b, WRITE_GUEST, seq, z[seq]!.indexes, 4, z[seq]!.payload, undefined, 0, 'mig/1')), 4);
    }
    for (const p of [...a, ...z]) p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(p.pages[k]!)));
  });
});

describe('DecoderThread: one piscina thread per channel', () => {
  for (const method of METHODS) {
    test(`${method}: 40 packets queued at once decode in order`, async () => {
      const n = 40, b = block(4096), pk = stream(method, Array.from({ length: n }, (_, i) => 1 + ((i * 37) % 100)), 4096, 11);
      const staging = new SharedArrayBuffer(n * SLOT_BYTES);
      const thread = new DecoderThread();
      try {
        const done = pk.map((p, seq) => thread.decode(task(method, b, WRITE_GUEST, seq, p.indexes, p.pages.length, p.payload, staging, seq * SLOT_BYTES)));
        assert.deepEqual(await Promise.all(done), pk.map((p) => p.pages.length));
        for (const p of pk) p.indexes.forEach((pg, k) => assert.ok(Buffer.from(b.guest.page(pg)).equals(p.pages[k]!), `page ${pg}`));
      } finally {
        await thread.close();
      }
    });
  }

  test('a corrupt payload rejects with a MigrationError ERR_DECOMPRESS', async () => {
    const b = block(64), [p] = stream('zstd', [8], 64) as [Packet];
    const bad = Buffer.from(p.payload);
    bad.fill(0x55, 6);
    const thread = new DecoderThread();
    try {
      await assert.rejects(thread.decode(task('zstd', b, WRITE_GUEST, 0, p.indexes, 8, bad), 1344 + 64),
        (e: unknown) => e instanceof MigrationError && e.code === 'ERR_DECOMPRESS' && e.channel === 'multifd/0' && e.streamOffset === 1408);
    } finally {
      await thread.close();
    }
  });
});
