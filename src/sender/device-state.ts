// Fake but well-formed device state: the FULL sections that end a precopy migration, the
// VMDESCRIPTION that describes them (spec §4.7.3) and the COLO device blob (spec §5.5).
//
// Bodies are PRNG bytes laid out like vmstate output: fields back to back, then subsections
// (`05`, counted name, be32 version, fields). They deliberately contain 0x7E bytes and
// `7E 00 00 00 <other id>` sequences, and even `7E be32(own id)` followed by a byte that cannot
// start a record, to stress a footer scanner (spec §4.7.2). What they never contain is
// `7E be32(own id)` followed by a byte that could start the next record: for a validating
// scanner the true footer stays the first acceptable candidate.

import assert from 'node:assert/strict';
import {
  QEMU_VM_COMMAND,
  QEMU_VM_EOF,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SUBSECTION,
  TARGET_PAGE_SIZE,
} from '../wire/constants.js';
import { Prng } from './prng.js';
import { StreamBuilder, type SectionHeader } from './stream-builder.js';

/** How one device is faked. */
export interface DeviceSpec extends SectionHeader {
  /** 'old': custom save code, described by "size" only; 'vmsd': described field by field. */
  style: 'old' | 'vmsd';
  /** Bytes of the device's own fields (subsections come on top). */
  size: number;
  /** Subsections to append (vmsd style only). Default 0. */
  subsections?: number;
  /** One field of this name and type instead of generated ones, e.g. virtio's `{virtio, virtio}`. */
  singleField?: { name: string; type: string };
}

/**
 * Devices of a small pc guest, in save order with their section ids (`ram` holds id 2 and is
 * not among them). Names and ids follow the 7.2 captures where known (spec §4.3).
 */
export const DEFAULT_DEVICES: readonly DeviceSpec[] = [
  dev(0, 'timer', 0, 2, 24),
  dev(1, 'cpu_common', 0, 1, 12),
  dev(3, 'cpu', 0, 12, 4800, 4),
  dev(4, 'kvm-tpr-opt', 0, 1, 40),
  dev(5, 'apic', 0, 3, 180, 1),
  dev(6, 'kvmclock', 0, 1, 16, 1),
  dev(7, 'fw_cfg', 0, 2, 8),
  dev(8, 'PCIBUS', 0, 1, 20),
  dev(9, '0000:00:00.0/I440FX', 0, 3, 300),
  dev(10, '0000:00:01.0/PIIX3', 0, 3, 290),
  dev(11, 'i8259', 0, 1, 24),
  dev(12, 'i8259', 1, 1, 24),
  dev(13, 'ioapic', 0, 2, 210),
  dev(14, 'mc146818rtc', 0, 3, 90, 1),
  dev(15, 'i8254', 0, 3, 180),
  dev(16, 'pcspk', 0, 1, 8),
  dev(17, 'dma', 0, 1, 120),
  dev(18, 'dma', 1, 1, 120),
  dev(19, 'fdc', 0, 2, 150, 2),
  dev(20, 'serial', 0, 3, 80, 1),
  dev(21, 'ps2kbd', 0, 3, 280),
  dev(22, 'ps2mouse', 0, 2, 290),
  dev(23, 'pckbd', 0, 3, 12),
  dev(24, 'vmmouse', 0, 0, 4100),
  dev(25, 'port92', 0, 1, 4),
  dev(26, '0000:00:01.1/ide', 0, 3, 1100, 1),
  dev(27, 'i2c_bus', 0, 1, 4),
  dev(28, '0000:00:01.3/piix4_pm', 0, 3, 380),
  dev(29, 'acpi_build', 0, 1, 4),
  dev(31, '0000:00:02.0/vga', 0, 2, 820),
  { ...dev(33, '0000:00:03.0/virtio-net', 0, 11, 1400), singleField: { name: 'virtio', type: 'virtio' } },
  { ...dev(35, 'slirp', 0, 4, 512), style: 'old' },
  dev(46, 'globalstate', 0, 1, 104),
];

/** One field of a vmdesc `fields` array. `size` is per element when `arrayLen` is set. */
export interface VmdescField {
  name: string;
  type: string;
  size: number;
  arrayLen?: number;
}

/** A vmstate description: the device itself or one subsection. */
export interface VmdescVmsd {
  vmsdName: string;
  version: number;
  fields: VmdescField[];
  subsections: VmdescVmsd[];
}

/** A device's FULL section: header, current body, and how the body is described. */
export interface DeviceSection extends SectionHeader {
  body: Buffer;
  /** Described devices; undefined for old-style ones (vmdesc has "size" only). */
  vmsd: VmdescVmsd | undefined;
}

/** Options of the device-state generator. */
export interface DeviceStateOptions {
  seed?: number;
  devices?: readonly DeviceSpec[];
  /** Plant 0x7E bytes and footer look-alikes in the bodies. Default true. */
  decoys?: boolean;
}

/**
 * Device state of the synthetic guest. `writeFullSections()` emits the precopy tail,
 * `vmdescription()` its JSON, `nextColoBlob()` a new COLO blob per checkpoint.
 */
export class DeviceState {
  readonly sections: DeviceSection[];
  readonly #regions: Array<Array<[number, number]>>;   // per section: the PRNG-filled byte ranges
  readonly #prng: Prng;
  readonly #decoys: boolean;
  readonly #ids: number[];
  #version = 0;

  constructor(opts: DeviceStateOptions = {}) {
    const specs = opts.devices ?? DEFAULT_DEVICES;
    this.#prng = new Prng(opts.seed ?? 7);
    this.#decoys = opts.decoys ?? true;
    this.#ids = specs.map((s) => s.sectionId);
    assert(new Set(specs.map((s) => `${s.idstr}\0${s.instanceId}`)).size === specs.length,
      'each (idstr, instance_id) must be unique');
    assert(new Set(this.#ids).size === specs.length, 'section ids must be unique');
    this.sections = [];
    this.#regions = [];
    for (const s of specs) {
      const vmsd = s.style === 'vmsd' ? this.#describe(s) : undefined;
      const regions: Array<[number, number]> = [];
      const body = layoutBody(s, vmsd, regions);
      const section: DeviceSection = {
        sectionId: s.sectionId, idstr: s.idstr, instanceId: s.instanceId, versionId: s.versionId, body, vmsd,
      };
      this.sections.push(section);
      this.#regions.push(regions);
      this.#scramble(this.sections.length - 1);
    }
  }

  /** How many COLO blobs nextColoBlob() has produced. */
  get version(): number {
    return this.#version;
  }

  /** Every device as a FULL section, in save order (`qemu_savevm_state_complete_precopy_non_iterable()`). */
  writeFullSections(b: StreamBuilder): StreamBuilder {
    for (const s of this.sections) b.sectionFull(s, s.body);
    return b;
  }

  /** The VMDESCRIPTION JSON for the current bodies, in QEMU's JSON writer layout. */
  vmdescription(): string {
    const devices = this.sections.map((s) => s.vmsd === undefined
      ? {
          name: s.idstr, instance_id: s.instanceId, size: s.body.length,
          fields: [{ name: 'data', size: s.body.length, type: 'buffer' }],
        }
      : { name: s.idstr, instance_id: s.instanceId, ...vmsdJson(s.vmsd) });
    return qemuJson({ page_size: TARGET_PAGE_SIZE, devices });
  }

  /** The COLO blob for the current state: FULL sections and an EOF byte, no file header (spec §5.5). */
  coloBlob(): Buffer {
    return this.writeFullSections(new StreamBuilder()).eof().build();
  }

  /**
   * Advance the device state by one checkpoint (the guest ran: some devices changed) and return
   * its blob. Sizes stay those of the initial migration; contents differ from every earlier blob.
   */
  nextColoBlob(): Buffer {
    this.#version++;
    for (let i = 0; i < this.sections.length; i++) {
      if (i === 0 || this.#prng.chance(0.6)) this.#scramble(i);
    }
    return this.coloBlob();
  }

  // New PRNG bytes in every field range, the checkpoint counter in the first one, decoys, cleanup.
  #scramble(i: number): void {
    const s = this.sections[i]!, regions = this.#regions[i]!, rnd = this.#prng;
    for (const [a, z] of regions) rnd.fill(s.body, a, z);
    if (this.#decoys) this.#plantDecoys(s, regions);
    const first = regions[0];
    if (i === 0 && first !== undefined && first[1] - first[0] >= 4) s.body.writeUInt32BE(this.#version, first[0]);
    sanitizeBody(s.body, s.sectionId);
  }

  #plantDecoys(s: DeviceSection, regions: Array<[number, number]>): void {
    const rnd = this.#prng, b = s.body;
    const n = 1 + Math.floor(b.length / 512);
    for (let k = 0; k < n; k++) {
      const [a, z] = regions[rnd.int(regions.length)] ?? [0, 0];
      if (z - a < 1) continue;
      const kind = rnd.int(3);
      if (kind === 0 || z - a < 6) {
        b[a + rnd.int(z - a)] = QEMU_VM_SECTION_FOOTER;
        continue;
      }
      const at = a + rnd.int(z - a - 5);
      b[at] = QEMU_VM_SECTION_FOOTER;
      if (kind === 1) {
        // Another section's footer, even followed by what looks like a valid record.
        const others = this.#ids.filter((id) => id !== s.sectionId);
        b.writeUInt32BE(others.length > 0 ? others[rnd.int(others.length)]! : s.sectionId + 1, at + 1);
        if (rnd.chance(0.5)) b[at + 5] = [QEMU_VM_EOF, 0x04, QEMU_VM_COMMAND][rnd.int(3)]!;
        else if (others.length === 0) b[at + 5] = 0xff;
      } else {
        // Our own footer, followed by a byte no record starts with: a validating scanner rejects it.
        b.writeUInt32BE(s.sectionId, at + 1);
        b[at + 5] = 0x09 + rnd.int(0x7e - 0x09);
      }
    }
  }

  #describe(s: DeviceSpec): VmdescVmsd {
    const vmsdName = s.idstr.includes('/') ? s.idstr.slice(s.idstr.lastIndexOf('/') + 1) : s.idstr;
    const fields = s.singleField !== undefined
      ? [{ name: s.singleField.name, type: s.singleField.type, size: s.size }]
      : generateFields(this.#prng, s.size);
    const subsections: VmdescVmsd[] = [];
    for (let k = 0; k < (s.subsections ?? 0); k++) {
      subsections.push({
        vmsdName: `${vmsdName}/sub${k}`, version: 1, subsections: [],
        fields: generateFields(this.#prng, 4 + this.#prng.int(Math.max(4, s.size >>> 2))),
      });
    }
    return { vmsdName, version: s.versionId, fields, subsections };
  }
}

/** True if `b` can start the record after a section footer (or is ambiguous enough to be treated so). */
export function mayStartRecord(b: number): boolean {
  return b <= 0x08 || b === QEMU_VM_SECTION_FOOTER;
}

/**
 * Body length per spec §4.7.3: fields (size x array_len) plus, per subsection,
 * 1 + 1 + len(name) + 4 + its own body.
 */
export function vmsdBodyLength(d: VmdescVmsd): number {
  let n = 0;
  for (const f of d.fields) n += f.size * (f.arrayLen ?? 1);
  for (const s of d.subsections) n += 1 + 1 + Buffer.byteLength(s.vmsdName, 'latin1') + 4 + vmsdBodyLength(s);
  return n;
}

function dev(sectionId: number, idstr: string, instanceId: number, versionId: number, size: number,
  subsections = 0): DeviceSpec {
  return { sectionId, idstr, instanceId, versionId, style: 'vmsd', size, subsections };
}

const SCALARS: ReadonlyArray<readonly [string, number]> = [
  ['uint8', 1], ['bool', 1], ['uint16', 2], ['uint32', 4], ['int32', 4], ['uint64', 8], ['int64', 8],
];

// A plausible field list of exactly `size` bytes: a few scalars, then an array or a buffer.
function generateFields(rnd: Prng, size: number): VmdescField[] {
  const fields: VmdescField[] = [];
  let left = size;
  for (let want = 1 + rnd.int(6); fields.length < want && left > 0;) {
    const fit = SCALARS.filter(([, n]) => n <= left);
    const [type, n] = fit[rnd.int(fit.length)]!;
    fields.push({ name: `f${fields.length}`, type, size: n });
    left -= n;
  }
  if (left >= 16 && left % 8 === 0 && rnd.chance(0.5)) {
    fields.push({ name: `f${fields.length}`, type: 'uint64', size: 8, arrayLen: left / 8 });
  } else if (left >= 8 && left % 4 === 0 && rnd.chance(0.5)) {
    fields.push({ name: `f${fields.length}`, type: 'uint32', size: 4, arrayLen: left / 4 });
  } else if (left > 0) {
    fields.push({ name: `f${fields.length}`, type: 'buffer', size: left });
  }
  return fields;
}

// Allocates the body and records which byte ranges are field data (the rest is subsection framing).
function layoutBody(s: DeviceSpec, vmsd: VmdescVmsd | undefined, regions: Array<[number, number]>): Buffer {
  if (vmsd === undefined) {
    regions.push([0, s.size]);
    return Buffer.alloc(s.size);
  }
  const body = Buffer.alloc(vmsdBodyLength(vmsd));
  const place = (d: VmdescVmsd, at: number): number => {
    let n = 0;
    for (const f of d.fields) n += f.size * (f.arrayLen ?? 1);
    if (n > 0) regions.push([at, at + n]);
    at += n;
    for (const sub of d.subsections) {
      body[at++] = QEMU_VM_SUBSECTION;
      const len = Buffer.byteLength(sub.vmsdName, 'latin1');
      body[at++] = len;
      at += body.write(sub.vmsdName, at, len, 'latin1');
      body.writeUInt32BE(sub.version, at);
      at = place(sub, at + 4);
    }
    return at;
  };
  assert.equal(place(vmsd, 0), body.length, 'vmsd layout length');
  return body;
}

/**
 * Remove every `7E be32(id)` in the body that a validating scanner could take for the footer:
 * one running into the true footer, or one followed by a byte that may start a record.
 * Only 0x7E bytes are changed, so no new match can appear.
 */
function sanitizeBody(body: Buffer, id: number): void {
  const len = body.length;
  const footer = Buffer.alloc(5);
  footer[0] = QEMU_VM_SECTION_FOOTER;
  footer.writeUInt32BE(id, 1);
  const at = (i: number): number => (i < len ? body[i]! : footer[i - len]!);
  for (let p = body.indexOf(QEMU_VM_SECTION_FOOTER); p !== -1 && p < len; p = body.indexOf(QEMU_VM_SECTION_FOOTER, p + 1)) {
    let match = true;
    for (let k = 1; k < 5 && match; k++) match = at(p + k) === footer[k];
    if (!match) continue;
    if (p + 5 < len && !mayStartRecord(body[p + 5]!)) continue;
    body[p] = QEMU_VM_SECTION_FOOTER - 1;
  }
}

function vmsdJson(d: VmdescVmsd): Record<string, unknown> {
  const out: Record<string, unknown> = {
    vmsd_name: d.vmsdName,
    version: d.version,
    fields: d.fields.map((f) => f.arrayLen === undefined
      ? { name: f.name, type: f.type, size: f.size }
      : { name: f.name, array_len: f.arrayLen, type: f.type, size: f.size }),
  };
  if (d.subsections.length > 0) out['subsections'] = d.subsections.map(vmsdJson);
  return out;
}

// QEMU's JSONWriter without pretty printing: ", " between members, ": " after keys, and
// non-ASCII or control characters as \uXXXX (qobject/json-writer.c).
function qemuJson(v: unknown): string {
  if (typeof v === 'number') return String(v);
  if (typeof v === 'string') return quote(v);
  if (Array.isArray(v)) return `[${v.map(qemuJson).join(', ')}]`;
  const o = v as Record<string, unknown>;
  return `{${Object.keys(o).map((k) => `${quote(k)}: ${qemuJson(o[k])}`).join(', ')}}`;
}

function quote(s: string): string {
  let out = '"';
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (cp > 0xffff) {
      const v = cp - 0x10000;
      out += `\\u${hex4(0xd800 + (v >> 10))}\\u${hex4(0xdc00 + (v & 0x3ff))}`;
    } else if (cp < 0x20 || cp >= 0x7f) out += `\\u${hex4(cp)}`;
    else out += ch;
  }
  return `${out}"`;
}

function hex4(n: number): string {
  return n.toString(16).toUpperCase().padStart(4, '0');
}
