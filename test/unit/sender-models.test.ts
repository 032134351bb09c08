// The sender's guest memory model and device state: determinism, workload shapes, and device
// bodies that are hostile to a naive footer scanner but exact for a validating one (spec §4.7).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { TARGET_PAGE_SIZE } from '../../src/wire/constants.js';
import {
  DEFAULT_DEVICES,
  DeviceState,
  drawLoadBytes,
  MemoryModel,
  Prng,
  StreamBuilder,
} from '../../src/sender/index.js';

const MiB = 1024 * 1024;

test('the same seed builds the same guest; another seed a different one', () => {
  const a = new MemoryModel({ seed: 42, ramMiB: 4 });
  const b = new MemoryModel({ seed: 42, ramMiB: 4 });
  const c = new MemoryModel({ seed: 43, ramMiB: 4 });
  a.blocks.forEach((blk, i) => assert(blk.host.equals(b.blocks[i]!.host)));
  assert(!a.blocks[0]!.host.equals(c.blocks[0]!.host));
  const da = a.dirty('idle'), db = b.dirty('idle');
  assert.deepEqual(da, db);
  a.blocks.forEach((blk, i) => assert(blk.host.equals(b.blocks[i]!.host)));
});

test('the default guest has the pc block list and about 40% zero pages', () => {
  const m = new MemoryModel({ seed: 1, ramMiB: 16 });
  assert.deepEqual(m.ramBlocks().slice(0, 4), [
    { idstr: 'pc.ram', usedLength: 16 * MiB },
    { idstr: '0000:00:02.0/vga.vram', usedLength: MiB },
    { idstr: '/rom@etc/acpi/tables', usedLength: 128 * 1024 },
    { idstr: 'pc.bios', usedLength: 256 * 1024 },
  ]);
  let zero = 0;
  for (const b of m.blocks) for (let p = 0; p < b.pages; p++) if (b.isZeroPage(p)) zero++;
  const share = zero / m.totalPages;
  assert(share > 0.35 && share < 0.45, `zero share ${share}`);
});

test("'idle' writes about 60 pages, only in RAM and video memory, reported in ascending order", () => {
  const m = new MemoryModel({ seed: 2, ramMiB: 8 });
  const before = m.snapshot();
  for (let i = 0; i < 20; i++) {
    const d = m.dirty('idle');
    assert(d.total >= 45 && d.total <= 75, `idle wrote ${d.total}`);
    assert.equal(d.blocks.reduce((n, b) => n + b.length, 0), d.total);
    d.blocks.forEach((pages, bi) => {
      if (!m.blocks[bi]!.writable) assert.equal(pages.length, 0);
      for (let k = 1; k < pages.length; k++) assert(pages[k]! > pages[k - 1]!);
    });
  }
  m.blocks.forEach((b, i) => { if (!b.writable) assert(b.host.equals(before[i]!)); });
});

test("'load' is lognormal: median ~23.4 MiB, mean ~25 MiB, p99 ~55 MiB", () => {
  const rnd = new Prng(3);
  const xs = Array.from({ length: 20_000 }, () => drawLoadBytes(rnd) / MiB).sort((a, b) => a - b);
  const median = xs[xs.length >> 1]!, p99 = xs[Math.floor(xs.length * 0.99)]!;
  const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
  assert(Math.abs(median - 23.4) < 1, `median ${median}`);
  assert(Math.abs(mean - 25) < 1, `mean ${mean}`);
  assert(Math.abs(p99 - 55) < 4, `p99 ${p99}`);
});

test("'load' is capped by writable RAM, and some written pages become zero", () => {
  const m = new MemoryModel({ seed: 4, ramMiB: 2 });
  const writable = m.blocks.filter((b) => b.writable).reduce((n, b) => n + b.pages, 0);
  const d = m.dirty('load');
  assert.equal(d.total, writable);
  assert(d.zeroed > 0);
  const exact = m.dirty({ pages: 100 });
  assert.equal(exact.total, 100);
  let zeroNow = 0;
  exact.blocks.forEach((pages, bi) => { for (const p of pages) if (m.blocks[bi]!.isZeroPage(p)) zeroNow++; });
  assert.equal(zeroNow >= exact.zeroed, true);
});

// --- device state -----------------------------------------------------------------------------

interface VmdescEntry {
  name: string; instance_id: number; size?: number; vmsd_name?: string; version?: number;
  fields: Array<{ name: string; type: string; size: number; array_len?: number }>;
  subsections?: VmdescEntry[];
}

// Spec §4.7.3: body(entry).
function bodyOf(e: VmdescEntry): number {
  if (e.vmsd_name === undefined) return e.size!;
  let n = 0;
  for (const f of e.fields) n += f.size * (f.array_len ?? 1);
  for (const s of e.subsections ?? []) n += 1 + 1 + s.vmsd_name!.length + 4 + bodyOf(s);
  return n;
}

test('VMDESCRIPTION is QEMU-shaped JSON whose sizes match every body (§4.7.3)', () => {
  const d = new DeviceState({ seed: 5 });
  const json = d.vmdescription();
  assert(json.startsWith('{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "f0", "type": "'));
  assert(!json.includes(',"') && !json.includes('":"'), 'QEMU separators: ", " and ": "');
  const desc = JSON.parse(json) as { page_size: number; devices: VmdescEntry[] };
  assert.equal(desc.devices.length, d.sections.length);
  desc.devices.forEach((e, i) => {
    const s = d.sections[i]!;
    assert.equal(e.name, s.idstr);
    assert.equal(e.instance_id, s.instanceId);
    assert.equal(bodyOf(e), s.body.length, `${s.idstr}: described ${bodyOf(e)}, sent ${s.body.length}`);
  });
  const slirp = desc.devices.find((e) => e.name === 'slirp')!;
  assert.deepEqual(Object.keys(slirp), ['name', 'instance_id', 'size', 'fields']);
  assert.deepEqual(slirp.fields, [{ name: 'data', size: slirp.size, type: 'buffer' }]);
  assert(desc.devices.some((e) => (e.subsections?.length ?? 0) > 0));
  assert.equal(d.sections.at(-1)!.idstr, 'globalstate');
  assert.equal(d.sections.length, DEFAULT_DEVICES.length);
});

// Spec §4.7.2: is there a valid record at `at` (after a candidate footer)?
function validNext(b: Buffer, at: number, colo: boolean): boolean {
  if (at === b.length) return true;
  const t = b[at]!;
  if (t === 0x00) {
    if (at + 1 === b.length) return true;
    if (colo) return false;
    return b[at + 1] === 0x06 && b.subarray(at + 6, at + 18).toString('latin1') === '{"page_size"';
  }
  if (t === 0x01 || t === 0x04) {
    if (at + 6 > b.length) return false;
    const n = b[at + 5]!;
    if (n < 1 || at + 6 + n + 8 > b.length) return false;
    for (let k = 0; k < n; k++) { const c = b[at + 6 + k]!; if (c < 0x20 || c > 0x7e) return false; }
    return b.readUInt32BE(at + 6 + n) < 65536 && b.readUInt32BE(at + 10 + n) < 65536;
  }
  if (t === 0x08) return at + 5 <= b.length && b.readUInt16BE(at + 1) >= 1 && b.readUInt16BE(at + 1) <= 11;
  return false;
}

/** Walk FULL sections by footer scan; returns body lengths. `naive` skips validation. */
function scan(b: Buffer, colo: boolean, naive = false): number[] {
  const lens: number[] = [];
  let at = 0;
  while (b[at] === 0x04) {
    const id = b.readUInt32BE(at + 1), n = b[at + 5]!;
    const bodyStart = at + 6 + n + 8;
    const pat = Buffer.from([0x7e, id >>> 24, (id >>> 16) & 0xff, (id >>> 8) & 0xff, id & 0xff]);
    let p = b.indexOf(pat, bodyStart);
    while (p !== -1 && !naive && !validNext(b, p + 5, colo)) p = b.indexOf(pat, p + 1);
    assert(p !== -1, `no footer for section ${id}`);
    lens.push(p - bodyStart);
    at = p + 5;
  }
  return lens;
}

test('device bodies hold 0x7E and footer look-alikes, yet a validating scan finds every true footer', () => {
  const d = new DeviceState({ seed: 6 });
  const tail = d.writeFullSections(new StreamBuilder()).eof().vmdescription(d.vmdescription()).build();
  const truth = d.sections.map((s) => s.body.length);
  assert.deepEqual(scan(tail, false), truth);
  const bodies = Buffer.concat(d.sections.map((s) => s.body));
  assert(bodies.includes(0x7e));
  const ids = new Set(d.sections.map((s) => s.sectionId));
  const lookalikes = d.sections.flatMap((s) => {
    const hits: number[] = [];
    for (let p = s.body.indexOf(0x7e); p !== -1 && p + 5 <= s.body.length; p = s.body.indexOf(0x7e, p + 1)) {
      const v = s.body.readUInt32BE(p + 1);
      if (ids.has(v)) hits.push(v === s.sectionId ? -1 : v);
    }
    return hits;
  });
  assert(lookalikes.some((v) => v >= 0), 'another section\'s footer inside a body');
  assert(lookalikes.includes(-1), 'the own footer inside a body (followed by a non-record byte)');
  assert.notDeepEqual(scan(tail, false, true), truth, 'a naive scan is fooled');
});

test('COLO blobs: FULL sections then EOF, same framing, new contents every checkpoint', () => {
  const d = new DeviceState({ seed: 8 });
  const seen = new Set<string>();
  const truth = d.sections.map((s) => s.body.length);
  for (let v = 1; v <= 20; v++) {
    const blob = d.nextColoBlob();
    assert.equal(d.version, v);
    assert.equal(blob[blob.length - 1], 0x00);
    assert.deepEqual(scan(blob, true), truth);
    assert.deepEqual(blob, d.coloBlob());
    const key = blob.toString('base64');
    assert(!seen.has(key), `blob ${v} repeats an earlier one`);
    seen.add(key);
  }
});

test('a page-sized PRNG fill is not all zero and the Prng is deterministic', () => {
  const a = new Prng(9), b = new Prng(9);
  const x = Buffer.alloc(TARGET_PAGE_SIZE), y = Buffer.alloc(TARGET_PAGE_SIZE);
  a.fill(x); b.fill(y);
  assert(x.equals(y));
  assert(!x.equals(Buffer.alloc(TARGET_PAGE_SIZE)));
  const w = new Uint32Array(8), v = new Uint32Array(8);
  a.fillWords(w);
  for (let i = 0; i < 8; i++) v[i] = b.u32();
  assert.deepEqual(w, v);
});
