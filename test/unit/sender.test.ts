// Byte-exact checks of the sender's builders against hand-written bytes from the spec
// (docs/qemu-migration-protocol.md §7.1, §7.2, §5.4): every expectation below is typed from
// the spec's annotated captures, not produced by the code under test.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  MIG_CMD_SWITCHOVER_START,
  MULTIFD_FLAG_SYNC,
  MULTIFD_PACKET_HEADER_LEN,
  TARGET_PAGE_SIZE,
} from '../../src/wire/constants.js';
import {
  encodeMultiFDInit,
  encodeMultiFDPacketHeader,
  MultiFDPacketImage,
  StreamBuilder,
} from '../../src/sender/index.js';

/** Hex digits (whitespace ignored) and quoted latin1 strings: h`06 "pc.ram" 00`. */
function h(strings: TemplateStringsArray, ...values: Array<string | number>): Buffer {
  let src = '';
  strings.forEach((s, i) => { src += s + (i < values.length ? String(values[i]) : ''); });
  const parts: Buffer[] = [];
  for (const m of src.matchAll(/"([^"]*)"|([0-9a-fA-F\s]+)/g)) {
    if (m[1] !== undefined) parts.push(Buffer.from(m[1], 'latin1'));
    else parts.push(Buffer.from(m[2]!.replace(/\s+/g, ''), 'hex'));
  }
  return Buffer.concat(parts);
}

const zeros = (n: number): Buffer => Buffer.alloc(n);

test('writes the file header and configuration of spec §7.1', () => {
  const got = new StreamBuilder().fileHeader().configuration().build();
  assert.deepEqual(got, h`51 45 56 4d 00 00 00 03 07 00 00 00 0d "pc-i440fx-7.2"`);
});

test('writes the first 316 bytes of the 7.2 capture (§7.1): START ram, MEM_SIZE list, EOS, PART, ZERO records', () => {
  const b = new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2')
    .sectionStart({ sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 })
    .ramMemSize([
      { idstr: 'pc.ram', usedLength: 0x4000000 },
      { idstr: '0000:00:02.0/vga.vram', usedLength: 0x1000000 },
      { idstr: '/rom@etc/acpi/tables', usedLength: 0x20000 },
      { idstr: 'pc.bios', usedLength: 0x40000 },
      { idstr: '0000:00:03.0/e1000.rom', usedLength: 0x40000 },
      { idstr: 'pc.rom', usedLength: 0x20000 },
      { idstr: '0000:00:02.0/vga.rom', usedLength: 0x10000 },
      { idstr: '/rom@etc/table-loader', usedLength: 0x1000 },
      { idstr: '/rom@etc/acpi/rsdp', usedLength: 0x1000 },
    ])
    .ramEos().footer(2)
    .sectionPart(2).ramZero('pc.ram', 0x1000).ramZero('pc.ram', 0x2000);
  const got = b.build();
  const want = Buffer.concat([
    h`51 45 56 4d 00 00 00 03 07 00 00 00 0d "pc-i440fx-7.2"`,
    h`01 00 00 00 02 03 "ram" 00 00 00 00 00 00 00 04`,
    h`00 00 00 00 05 0d 20 04`,
    h`06 "pc.ram" 00 00 00 00 04 00 00 00`,
    h`15 "0000:00:02.0/vga.vram" 00 00 00 00 01 00 00 00`,
    h`14 "/rom@etc/acpi/tables" 00 00 00 00 00 02 00 00`,
    h`07 "pc.bios" 00 00 00 00 00 04 00 00`,
    h`16 "0000:00:03.0/e1000.rom" 00 00 00 00 00 04 00 00`,
    h`06 "pc.rom" 00 00 00 00 00 02 00 00`,
    h`14 "0000:00:02.0/vga.rom" 00 00 00 00 00 01 00 00`,
    h`15 "/rom@etc/table-loader" 00 00 00 00 00 00 10 00`,
    h`12 "/rom@etc/acpi/rsdp" 00 00 00 00 00 00 10 00`,
    h`00 00 00 00 00 00 00 10`,
    h`7e 00 00 00 02`,
    h`02 00 00 00 02`,
    h`00 00 00 00 00 00 10 02 06 "pc.ram" 00`,
    h`00 00 00 00 00 00 20 22 00`,
  ]);
  assert.equal(got.length, 316);
  assert.deepEqual(got, want);
  // Landmarks from the capture's offset column.
  assert.deepEqual(got.subarray(0x111, 0x119), h`00 00 00 00 00 00 00 10`);
  assert.deepEqual(got.subarray(0x119, 0x11e), h`7e 00 00 00 02`);
  assert.equal(got[0x11e], 0x02);
});

test('writes ZERO with the block name, then with CONTINUE (§4.6.3)', () => {
  const b = new StreamBuilder();
  assert.deepEqual(b.ramZero('pc.ram', 0x1000).build(), h`00 00 00 00 00 00 10 02 06 "pc.ram" 00`);
  assert.deepEqual(b.ramZero('pc.ram', 0x2000).build(), h`00 00 00 00 00 00 20 22 00`);
});

test('keeps the CONTINUE block across sections and names a block again only when it changes', () => {
  const page = Buffer.alloc(TARGET_PAGE_SIZE, 0xab);
  const b = new StreamBuilder()
    .sectionPart(2).ramZero('pc.ram', 0x1000).ramEos().footer(2)
    .sectionEnd(2).ramZero('pc.ram', 0x3000)
    .ramZero('pc.bios', 0)
    .ramPage('pc.bios', 0x1000, page)
    .ramEos().footer(2).eof();
  assert.equal(b.lastBlock, 'pc.bios');
  const got = b.build();
  assert.deepEqual(got, Buffer.concat([
    h`02 00 00 00 02 00 00 00 00 00 00 10 02 06 "pc.ram" 00 00 00 00 00 00 00 00 10 7e 00 00 00 02`,
    h`03 00 00 00 02 00 00 00 00 00 00 30 22 00`,
    h`00 00 00 00 00 00 00 02 07 "pc.bios" 00`,
    h`00 00 00 00 00 00 10 28`, page,
    h`00 00 00 00 00 00 00 10 7e 00 00 00 02 00`,
  ]));
  b.resetLastBlock().ramZero('pc.bios', 0x2000);
  assert.deepEqual(b.build(), h`00 00 00 00 00 00 20 02 07 "pc.bios" 00`);
});

test('writes page words above 4 GiB as two be32 halves', () => {
  const got = new StreamBuilder().ramZero('pc.ram', 2 ** 40 + 0x5000).ramZero('pc.ram', 2 ** 52).build();
  assert.deepEqual(got, h`00 00 01 00 00 00 50 02 06 "pc.ram" 00  00 10 00 00 00 00 00 22 00`);
});

test('writes commands, ENABLE_COLO, MULTIFD_FLUSH, FULL sections and VMDESCRIPTION', () => {
  const got = new StreamBuilder()
    .command(1).command(2, h`00 00 00 01`).enableColo().command(MIG_CMD_SWITCHOVER_START)
    .ramMultifdFlush()
    .sectionFull({ sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 }, h`01 02 7e 03`)
    .eof().vmdescription('{"page_size": 4096}')
    .build();
  assert.deepEqual(got, Buffer.concat([
    h`08 00 01 00 00  08 00 02 00 04 00 00 00 01  08 00 08 00 00  08 00 0b 00 00`,
    h`00 00 00 00 00 00 02 00`,
    h`04 00 00 00 00 05 "timer" 00 00 00 00 00 00 00 02 01 02 7e 03 7e 00 00 00 00`,
    h`00 06 00 00 00 13`, Buffer.from('{"page_size": 4096}'),
  ]));
});

test('writes the first checkpoint of spec §5.4 byte for byte', () => {
  const got = new StreamBuilder()
    .coloMessage(3).sectionEnd(2).ramZero('pc.ram', 0x8000).ramEos().footer(2).eof().vmstateSize(214439)
    .build();
  assert.deepEqual(got, h`
    00 00 00 03
    03 00 00 00 02
    00 00 00 00 00 00 80 02 06 70 63 2e 72 61 6d 00
    00 00 00 00 00 00 00 10
    7e 00 00 00 02
    00
    00 00 00 04 00 00 00 00 00 03 45 a7`);
});

test('drain() hands out each byte once, in order, and build() of the rest', () => {
  const b = new StreamBuilder().fileHeader();
  const page = Buffer.alloc(TARGET_PAGE_SIZE, 7);
  const first = b.drain();
  for (let i = 0; i < 40; i++) b.ramPage('pc.ram', i * TARGET_PAGE_SIZE, page);   // crosses slabs
  assert.equal(b.pendingBytes, 1 + 6 + 40 * (8 + TARGET_PAGE_SIZE));   // the header went with the first drain
  const second = b.drain();
  b.raw(Buffer.alloc(100_000, 1)).eof();
  const rest = b.build();
  const all = Buffer.concat([...first, ...second, rest]);
  assert.equal(all.length, b.totalBytes);
  assert.deepEqual(all.subarray(0, 8), h`51 45 56 4d 00 00 00 03`);
  assert.deepEqual(all.subarray(8, 23), h`00 00 00 00 00 00 00 08 06 "pc.ram"`);
  assert.equal(all[all.length - 1], 0);
  assert.equal(b.pendingBytes, 0);
});

test('encodes MultiFDInit_t of spec §7.2 (64 bytes) and one with a uuid and id', () => {
  assert.deepEqual(encodeMultiFDInit({ id: 0 }), Buffer.concat([h`11 22 33 44 00 00 00 01`, zeros(56)]));
  const uuid = h`00112233445566778899aabbccddeeff`;
  const got = encodeMultiFDInit({ id: 3, uuid });
  assert.deepEqual(got, Buffer.concat([h`11 22 33 44 00 00 00 01`, uuid, h`03`, zeros(39)]));
});

test('encodes the 7.2 setup SYNC packet of spec §7.2', () => {
  const got = encodeMultiFDPacketHeader({
    flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, nextPacketSize: 0, packetNum: 0, ramblock: '', offsets: [],
  });
  assert.equal(got.length, 1344);
  assert.deepEqual(got, Buffer.concat([
    h`11 22 33 44 00 00 00 01 00 00 00 01 00 00 00 80 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00`,
    zeros(32), zeros(256), zeros(1024),
  ]));
});

test('encodes the 7.2 data packet header of spec §7.2 with its offsets', () => {
  const offsets = [0x0, 0x6000, 0x9f000, 0xc0000];
  for (let k = 4; k < 104; k++) offsets.push(0x100000 + k * 0x1000);
  const got = encodeMultiFDPacketHeader({
    flags: 0, pagesAlloc: 128, normalPages: 104, nextPacketSize: 425984, packetNum: 4, ramblock: 'pc.ram', offsets,
    staleOffsets: Array.from({ length: 128 }, (_, k) => 0xdead000 + k * 0x1000),
  });
  // Offsets relative to the packet start (the capture's 0x0580).
  assert.deepEqual(got.subarray(0x00, 0x20), h`11 22 33 44 00 00 00 01 00 00 00 00 00 00 00 80 00 00 00 68 00 06 80 00 00 00 00 00 00 00 00 04`);
  assert.deepEqual(got.subarray(0x20, 0x40), zeros(32));
  assert.deepEqual(got.subarray(0x40, 0x140), Buffer.concat([Buffer.from('pc.ram'), zeros(250)]));
  assert.deepEqual(got.subarray(0x140, 0x160), h`
    00 00 00 00 00 00 00 00  00 00 00 00 00 00 60 00  00 00 00 00 00 09 f0 00  00 00 00 00 00 0c 00 00`);
  // Slots 104..127 keep what an earlier packet left there.
  assert.deepEqual(got.subarray(0x140 + 8 * 104, 0x140 + 8 * 105), Buffer.from([0, 0, 0, 0, ...be32(0xdead000 + 104 * 0x1000)]));
  assert.equal(got.length, MULTIFD_PACKET_HEADER_LEN);
});

test('encodes zero_pages at offset 32 (10.x) with zero offsets after the normal ones', () => {
  const got = encodeMultiFDPacketHeader({
    flags: 0, pagesAlloc: 128, normalPages: 2, zeroPages: 3, nextPacketSize: 8192, packetNum: 2 ** 33 + 5,
    ramblock: 'pc.ram', offsets: [0x1000, 0x3000, 0x2000, 0x5000, 0x4000],
  });
  assert.deepEqual(got.subarray(8, 40), h`
    00 00 00 00 00 00 00 80 00 00 00 02 00 00 20 00 00 00 00 02 00 00 00 05 00 00 00 03 00 00 00 00`);
  assert.deepEqual(got.subarray(0x140, 0x140 + 40), h`
    00 00 00 00 00 00 10 00  00 00 00 00 00 00 30 00  00 00 00 00 00 00 20 00  00 00 00 00 00 00 50 00  00 00 00 00 00 00 40 00`);
  assert.deepEqual(got.subarray(0x140 + 40), zeros(1024 - 40));
});

test('a 7.2 packet image keeps stale next_packet_size, ramblock and offsets; a 10.x one clears them', () => {
  const fillData = { flags: 0, pagesAlloc: 128, normalPages: 3, zeroPages: 0, nextPacketSize: 3 * 4096,
    packetNum: 7, ramblock: 'pc.ram', offsets: [0x1000, 0x2000, 0x3000], count: 3 };
  const fillSync = { flags: MULTIFD_FLAG_SYNC, pagesAlloc: 128, normalPages: 0, zeroPages: 0, nextPacketSize: undefined,
    packetNum: 8, ramblock: undefined, offsets: [], count: 0 };
  const old = new MultiFDPacketImage({ clearEachFill: false, staleFields: true, staleOffsets: true });
  old.fill(fillData);
  const s72 = Buffer.from(old.fill(fillSync));
  assert.deepEqual(s72.subarray(8, 32), h`00 00 00 01 00 00 00 80 00 00 00 00 00 00 30 00 00 00 00 00 00 00 00 08`);
  assert.deepEqual(s72.subarray(0x40, 0x47), h`"pc.ram" 00`);
  assert.deepEqual(s72.subarray(0x140, 0x158), h`00 00 00 00 00 00 10 00 00 00 00 00 00 00 20 00 00 00 00 00 00 00 30 00`);

  const tidy = new MultiFDPacketImage({ clearEachFill: false });
  tidy.fill(fillData);
  const t72 = Buffer.from(tidy.fill(fillSync));
  assert.deepEqual(t72.subarray(20, 24), zeros(4));
  assert.deepEqual(t72.subarray(0x40), zeros(1344 - 0x40));

  const up = new MultiFDPacketImage({ clearEachFill: true });
  up.fill(fillData);
  const s10 = Buffer.from(up.fill({ ...fillSync, pagesAlloc: 0, nextPacketSize: 0 }));
  assert.deepEqual(s10, Buffer.concat([h`11 22 33 44 00 00 00 01 00 00 00 01`, zeros(12),
    h`00 00 00 00 00 00 00 08`, zeros(1344 - 32)]));
});

function be32(v: number): number[] {
  return [v >>> 24 & 0xff, v >>> 16 & 0xff, v >>> 8 & 0xff, v & 0xff];
}
