import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError, type MigrationErrorCode } from '../../src/errors.js';
import { checkPacketCommon, decodeMultiFDInit, decodeMultiFDPacket } from '../../src/migration/multifd-packet.js';
import { encodeMultiFDInit, encodeMultiFDPacketHeader, MultiFDPacketImage, type MultiFDPacketHeaderFields } from '../../src/sender/multifd-builder.js';
import {
  MULTIFD_FLAG_DEVICE_STATE, MULTIFD_FLAG_QATZIP, MULTIFD_FLAG_QPL, MULTIFD_FLAG_SYNC, MULTIFD_FLAG_UADK, MULTIFD_FLAG_ZLIB,
  MULTIFD_FLAG_ZSTD, MULTIFD_PACKET_HEADER_LEN, MULTIFD_RAMBLOCK_LEN,
} from '../../src/wire/constants.js';

const P = 4096;
const CH = 'multifd/3';
const AT = 1000;   // stream offset of the packet in its channel
const MAX_PAYLOAD = 1 << 20;

function header(f: Partial<MultiFDPacketHeaderFields> = {}): Buffer {
  const offsets = f.offsets ?? [0, P, 5 * P];
  return encodeMultiFDPacketHeader({
    flags: 0, pagesAlloc: 128, normalPages: offsets.length, nextPacketSize: offsets.length * P, packetNum: 7,
    ramblock: 'pc.ram', ...f, offsets,
  });
}

function expectError(fn: () => unknown, code: MigrationErrorCode, streamOffset?: number): MigrationError {
  let caught: unknown;
  try { fn(); } catch (e) { caught = e; }
  assert.ok(caught instanceof MigrationError, `expected a MigrationError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code);
  assert.equal(caught.channel, CH);
  if (streamOffset !== undefined) assert.equal(caught.streamOffset, streamOffset);
  return caught;
}

describe('decodeMultiFDInit', () => {
  test('decodes the uuid and channel id of a MultiFDInit_t', () => {
    const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const init = decodeMultiFDInit(encodeMultiFDInit({ id: 200, uuid }), CH);
    assert.equal(init.id, 200);
    assert.deepEqual(init.uuid, uuid);
    assert.equal(init.version, 1);
  });

  test('copies the uuid out of the socket chunk', () => {
    const b = encodeMultiFDInit({ id: 1, uuid: Buffer.alloc(16, 0x11) });
    const init = decodeMultiFDInit(b, CH);
    b.fill(0, 8, 24);
    assert.deepEqual(init.uuid, Buffer.alloc(16, 0x11));
  });

  test('rejects a wrong handshake magic with ERR_BAD_MAGIC', () => {
    const b = encodeMultiFDInit({ id: 0 });
    b.writeUInt32BE(0x5145564d, 0);
    expectError(() => decodeMultiFDInit(b, CH, 0), 'ERR_BAD_MAGIC', 0);
  });

  test('rejects a handshake version 2 with ERR_BAD_VERSION', () => {
    const b = encodeMultiFDInit({ id: 0 });
    b.writeUInt32BE(2, 4);
    expectError(() => decodeMultiFDInit(b, CH, 0), 'ERR_BAD_VERSION', 0);
  });
});

describe('checkPacketCommon', () => {
  test('returns the flags word of a RAM packet', () => {
    assert.equal(checkPacketCommon(header({ flags: MULTIFD_FLAG_SYNC | MULTIFD_FLAG_ZLIB }), CH, AT), 0x03);
  });

  test('rejects a device-state packet with ERR_UNSUPPORTED from the 12-byte common header', () => {
    const b = header({ flags: MULTIFD_FLAG_DEVICE_STATE }).subarray(0, 12);
    expectError(() => checkPacketCommon(b, CH, AT), 'ERR_UNSUPPORTED', AT);
  });
});

describe('decodeMultiFDPacket', () => {
  test('parses a NOCOMP data packet', () => {
    const p = decodeMultiFDPacket(header({ offsets: [0, P, 5 * P], packetNum: 2 ** 40 + 3 }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.flags, 0);
    assert.equal(p.pagesAlloc, 128);
    assert.equal(p.normalPages, 3);
    assert.equal(p.zeroPages, 0);
    assert.equal(p.packetNum, 2 ** 40 + 3);
    assert.equal(p.ramblock, 'pc.ram');
    assert.deepEqual(p.offsets, [0, P, 5 * P]);
    assert.equal(p.payloadLen, 3 * P);
  });

  test('parses a full packet of 128 pages', () => {
    const offsets = Array.from({ length: 128 }, (_, k) => (127 - k) * P);
    const p = decodeMultiFDPacket(header({ offsets }), CH, AT, 'none', MAX_PAYLOAD);
    assert.deepEqual(p.offsets, offsets);
    assert.equal(p.payloadLen, 128 * P);
  });

  test('parses a MULTIFD_FLAG_SYNC packet', () => {
    // 7.2's first packet on every channel: SYNC, pages_alloc 128, no pages (spec §2.9)
    const p = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_SYNC, offsets: [], nextPacketSize: 0, ramblock: '' }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.flags & MULTIFD_FLAG_SYNC, MULTIFD_FLAG_SYNC);
    assert.equal(p.normalPages, 0);
    assert.deepEqual(p.offsets, []);
    assert.equal(p.payloadLen, 0);
  });

  test('parses a 9.2+ SYNC packet with pages_alloc 0', () => {
    const p = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_SYNC, pagesAlloc: 0, offsets: [], nextPacketSize: 0, ramblock: '' }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.pagesAlloc, 0);
    assert.equal(p.payloadLen, 0);
  });

  test('parses a 7.2 SYNC packet that carries pages', () => {
    const p = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_SYNC, offsets: [9 * P] }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.flags, MULTIFD_FLAG_SYNC);
    assert.deepEqual(p.offsets, [9 * P]);
    assert.equal(p.payloadLen, P);
  });

  test('ignores 7.2 stale next_packet_size, ramblock and offsets in an empty packet', () => {
    const img = new MultiFDPacketImage({ clearEachFill: false, staleFields: true, staleOffsets: true });
    img.fill({ flags: 0, pagesAlloc: 128, normalPages: 4, zeroPages: 0, nextPacketSize: 4 * P, packetNum: 10, ramblock: 'pc.ram', offsets: [P, 2 * P, 3 * P, 2 ** 52], count: 4 });
    const empty = Buffer.from(img.fill({ flags: 0, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined, packetNum: 10, ramblock: undefined, offsets: [], count: 0 }));
    assert.equal(empty.readUInt32BE(20), 4 * P, 'the builder left next_packet_size stale');
    assert.equal(empty.toString('latin1', 64, 70), 'pc.ram', 'the builder left ramblock stale');
    for (const comp of ['none', 'zlib', 'zstd'] as const) {
      const p = decodeMultiFDPacket(empty, CH, AT, comp, MAX_PAYLOAD);
      assert.equal(p.payloadLen, 0, `no payload follows an empty packet (${comp})`);
      assert.deepEqual(p.offsets, []);
      assert.equal(p.nextPacketSize, 4 * P);
    }
  });

  test('does not check stale offset slots past the used ones', () => {
    // slot 1 holds an offset above 2^53: only slot 0 is in use
    const b = header({ offsets: [P], staleOffsets: [0, 2 ** 53 + 2 ** 40, 0xffff_ffff * 2 ** 21] });
    const p = decodeMultiFDPacket(b, CH, AT, 'none', MAX_PAYLOAD);
    assert.deepEqual(p.offsets, [P]);
  });

  test('accepts a duplicate packet_num (never validated, spec §2.4)', () => {
    const a = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_SYNC, offsets: [P], packetNum: 42 }), CH, AT, 'none', MAX_PAYLOAD);
    const b = decodeMultiFDPacket(header({ offsets: [], nextPacketSize: P, packetNum: 42 }), CH, AT + 1344 + P, 'none', MAX_PAYLOAD);
    assert.equal(a.packetNum, b.packetNum);
  });

  test('ignores a NOCOMP next_packet_size that disagrees with normal_pages', () => {
    const p = decodeMultiFDPacket(header({ offsets: [0, P], nextPacketSize: 12345 }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.payloadLen, 2 * P);
  });

  test('parses 9.0+ zero pages after the normal pages', () => {
    const p = decodeMultiFDPacket(header({ offsets: [0, 3 * P, 4 * P], normalPages: 1, zeroPages: 2, nextPacketSize: P }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.normalPages, 1);
    assert.equal(p.zeroPages, 2);
    assert.deepEqual(p.offsets, [0, 3 * P, 4 * P]);
    assert.equal(p.payloadLen, P);
  });

  test('parses a packet with only zero pages and no payload', () => {
    const p = decodeMultiFDPacket(header({ offsets: [0, P], normalPages: 0, zeroPages: 2, nextPacketSize: 0 }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.payloadLen, 0);
    assert.equal(p.offsets.length, 2);
  });

  test('ignores flag bits outside SYNC, the method mask and DEVICE_STATE', () => {
    const p = decodeMultiFDPacket(header({ flags: 0x80 | 0x100 }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.normalPages, 3);
  });

  test('reads a 255-character ramblock whose last byte is not NUL', () => {
    const name = 'b'.repeat(MULTIFD_RAMBLOCK_LEN);
    const p = decodeMultiFDPacket(header({ ramblock: name }), CH, AT, 'none', MAX_PAYLOAD);
    assert.equal(p.ramblock, 'b'.repeat(MULTIFD_RAMBLOCK_LEN - 1));
  });

  test('takes the payload length of a zlib packet from next_packet_size', () => {
    const p = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZLIB, nextPacketSize: 777 }), CH, AT, 'zlib', MAX_PAYLOAD);
    assert.equal(p.payloadLen, 777);
    const z = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZSTD, nextPacketSize: 5 }), CH, AT, 'zstd', MAX_PAYLOAD);
    assert.equal(z.payloadLen, 5);
  });

  test('accepts a 7.2 zlib packet without method bits when it has no normal pages', () => {
    const p = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_SYNC, offsets: [], nextPacketSize: 99 }), CH, AT, 'zlib', MAX_PAYLOAD);
    assert.equal(p.payloadLen, 0);
  });

  test('rejects a wrong packet magic with ERR_BAD_MAGIC', () => {
    const b = header();
    b.writeUInt32BE(0x11223345, 0);
    expectError(() => decodeMultiFDPacket(b, CH, AT, 'none', MAX_PAYLOAD), 'ERR_BAD_MAGIC', AT);
  });

  test('rejects a packet version 2 with ERR_BAD_VERSION', () => {
    const b = header();
    b.writeUInt32BE(2, 4);
    expectError(() => decodeMultiFDPacket(b, CH, AT, 'none', MAX_PAYLOAD), 'ERR_BAD_VERSION', AT);
  });

  test('rejects a device-state packet with ERR_UNSUPPORTED', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_DEVICE_STATE }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_UNSUPPORTED', AT);
  });

  test('rejects pages_alloc 129 with ERR_LIMIT', () => {
    expectError(() => decodeMultiFDPacket(header({ pagesAlloc: 129 }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_LIMIT', AT + 12);
  });

  test('rejects normal_pages above pages_alloc with ERR_LIMIT', () => {
    expectError(() => decodeMultiFDPacket(header({ pagesAlloc: 2 }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_LIMIT', AT + 16);
  });

  test('rejects a huge normal_pages with ERR_LIMIT before reading offsets', () => {
    const b = header();
    b.writeUInt32BE(0xffff_ffff, 16);
    expectError(() => decodeMultiFDPacket(b, CH, AT, 'none', MAX_PAYLOAD), 'ERR_LIMIT');
  });

  test('rejects zero_pages above pages_alloc - normal_pages with ERR_LIMIT', () => {
    expectError(() => decodeMultiFDPacket(header({ pagesAlloc: 4, offsets: [0, P, 2 * P, 3 * P, 4 * P], normalPages: 2, zeroPages: 3 }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_LIMIT', AT + 32);
  });

  test('rejects zlib pages on a NOCOMP channel with ERR_BAD_VERSION', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZLIB }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_BAD_VERSION', AT + 8);
  });

  test('rejects NOCOMP pages on a zstd channel with ERR_BAD_VERSION', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: 0 }), CH, AT, 'zstd', MAX_PAYLOAD), 'ERR_BAD_VERSION', AT + 8);
  });

  test('rejects 9.0+ zero-page packets whose method bits differ from the channel with ERR_BAD_VERSION', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZSTD, offsets: [0], normalPages: 0, zeroPages: 1 }), CH, AT, 'zlib', MAX_PAYLOAD), 'ERR_BAD_VERSION');
  });

  for (const [name, flag] of [['QPL', MULTIFD_FLAG_QPL], ['UADK', MULTIFD_FLAG_UADK], ['QATZIP', MULTIFD_FLAG_QATZIP]] as const) {
    test(`rejects ${name} compression with ERR_UNSUPPORTED`, () => {
      expectError(() => decodeMultiFDPacket(header({ flags: flag }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_UNSUPPORTED', AT + 8);
    });
  }

  test('rejects an offset above 2^53 with ERR_RANGE at its slot', () => {
    expectError(() => decodeMultiFDPacket(header({ offsets: [0, 2 ** 53] }), CH, AT, 'none', MAX_PAYLOAD), 'ERR_RANGE', AT + 320 + 8);
  });

  test('rejects a zlib packet with next_packet_size 0 with ERR_LIMIT', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZLIB, nextPacketSize: 0 }), CH, AT, 'zlib', MAX_PAYLOAD), 'ERR_LIMIT', AT + 20);
  });

  test('rejects a zlib payload above the cap with ERR_LIMIT', () => {
    expectError(() => decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZLIB, nextPacketSize: MAX_PAYLOAD + 1 }), CH, AT, 'zlib', MAX_PAYLOAD), 'ERR_LIMIT', AT + 20);
    const ok = decodeMultiFDPacket(header({ flags: MULTIFD_FLAG_ZLIB, nextPacketSize: MAX_PAYLOAD }), CH, AT, 'zlib', MAX_PAYLOAD);
    assert.equal(ok.payloadLen, MAX_PAYLOAD);
  });

  test('reads exactly the 1344-byte header', () => {
    assert.equal(header().length, MULTIFD_PACKET_HEADER_LEN);
  });
});
