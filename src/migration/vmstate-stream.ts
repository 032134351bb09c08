import { hex, wireError } from '../errors.js';
import type { ByteQueue } from '../wire/byte-queue.js';
import {
  MIG_CMD_ENABLE_COLO, MIG_CMD_MAX, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MIG_CMD_SWITCHOVER_START,
  QEMU_VM_COMMAND, QEMU_VM_CONFIGURATION, QEMU_VM_EOF, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FOOTER, QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START, QEMU_VM_SUBSECTION, QEMU_VM_VMDESCRIPTION, RAM_SECTION_VERSION,
} from '../wire/constants.js';
import type { Limits } from './limits.js';
import type { RamSectionParser } from './ram-section.js';

export interface SectionHeader { type: number; sectionId: number; idstr: string; instanceId: number; versionId: number }

/** Callbacks of the savevm stream. A returned promise holds the parser (a barrier) until it settles. */
export interface VmStateSink {
  onConfiguration(machineType: string, raw: Buffer): void;
  onCommand(cmd: number, payload: Buffer): void;
  onSection(h: SectionHeader): void;
  /** RAM_SAVE_FLAG_EOS of a ram section (a barrier in the per-section scheme). */
  onRamEos(h: SectionHeader): Promise<void> | void;
  /** RAM_SAVE_FLAG_MULTIFD_FLUSH (a barrier in the per-round scheme). */
  onRamFlush(): Promise<void> | void;
  /** A whole device section (header, body, footer) kept verbatim for a later resume (spec §4.7.5). */
  onDeviceSection(h: SectionHeader, raw: Buffer): void;
}

const S = {
  FileHeader: 0, AfterHeader: 1, ConfigName: 2, ConfigSub: 3, Record: 4, FullHeader: 5, ShortHeader: 6,
  RamBody: 7, Footer: 8, DeviceBody: 9, Command: 10, Idle: 11, Vmdesc: 12, Failed: 13,
} as const;
type S = (typeof S)[keyof typeof S];

export type FeedResult = 'blocked' | 'held' | 'eof' | 'vmdesc';

/**
 * The main channel's savevm stream (qemu_loadvm_state / qemu_loadvm_state_main): file header,
 * configuration, sections with footers, commands, EOF, VMDESCRIPTION. Push-driven: the owner
 * pushes socket chunks into `q` and calls `feed()`, which consumes what it can. It stops at
 * EOF (`'eof'`) so the owner can read what follows (VMDESCRIPTION or COLO messages), and at a
 * barrier (`'held'`, wait for `held`).
 */
export class VmStateParser {
  #state: S = S.FileHeader;
  #hdr: SectionHeader | null = null;
  #sections = new Map<number, string>();   // section id -> idstr, learned from START/FULL
  #ramSectionId = -1;
  #configRaw: Buffer[] = [];
  #machine = '';
  // Device body footer scan (spec §4.7.2)
  #acc: Buffer = Buffer.alloc(0);
  #accLen = 0;
  #searchFrom = 0;
  #held: Promise<void> | null = null;
  vmdesc: Buffer | null = null;
  expectVmdesc = true;

  constructor(readonly q: ByteQueue, private readonly sink: VmStateSink, private readonly ram: RamSectionParser,
              private readonly limits: Limits, readonly channel = 'main') {}

  get held(): Promise<void> | null { return this.#held; }
  get ramSectionId(): number { return this.#ramSectionId; }
  get sectionNames(): ReadonlyMap<number, string> { return this.#sections; }
  /** Between records: an EOF of the connection here is not a truncation. */
  get atBoundary(): boolean { return this.#state === S.Idle || this.#state === S.Record || this.#state === S.AfterHeader; }
  get idle(): boolean { return this.#state === S.Idle; }

  /** COLO: after VMSTATE_SEND the RAM part is a record sequence without file header (spec §5.3). */
  beginRecords(): void { this.#state = S.Record; }
  /** Read a VMDESCRIPTION record next (after the initial migration's EOF). */
  beginVmdesc(): void { this.#state = S.Vmdesc; }

  #err(code: Parameters<typeof wireError>[0], msg: string, at = this.q.consumed): never {
    this.#state = S.Failed;
    throw wireError(code, msg, this.channel, at);
  }

  feed(): FeedResult {
    // Errors raised by the ram parser or a sink callback (not only #err) must fail the parser
    // too: otherwise the next feed() resumes mid-record and parses page bytes as records (STYLE §3).
    try {
      return this.#feed();
    } catch (e) {
      this.#state = S.Failed;
      throw e;
    }
  }

  #feed(): FeedResult {
    const q = this.q;
    if (this.#held) return 'held';
    for (;;) {
      switch (this.#state) {
        case S.FileHeader: {
          if (q.length < 8) return 'blocked';
          const b = q.take(8);
          const magic = b.readUInt32BE(0), version = b.readUInt32BE(4);
          if (magic !== QEMU_VM_FILE_MAGIC) this.#err('ERR_BAD_MAGIC', `main: stream magic 0x${hex(magic)}, expected 0x${hex(QEMU_VM_FILE_MAGIC)} ("QEVM")`, q.consumed - 8);
          if (version === QEMU_VM_FILE_VERSION_COMPAT) this.#err('ERR_BAD_VERSION', 'main: SaveVM v2 format is obsolete', q.consumed - 4);
          if (version !== QEMU_VM_FILE_VERSION) this.#err('ERR_BAD_VERSION', `main: stream version ${version}, expected ${QEMU_VM_FILE_VERSION}`, q.consumed - 4);
          this.#state = S.AfterHeader;
          break;
        }
        case S.AfterHeader: {
          if (q.length < 1) return 'blocked';
          this.#state = q.peekByte(0) === QEMU_VM_CONFIGURATION ? S.ConfigName : S.Record;
          break;
        }
        case S.ConfigName: {
          if (q.length < 5) return 'blocked';
          const len = q.peek(5).readUInt32BE(1);
          if (len === 0 || len > 255) this.#err('ERR_LIMIT', `main: machine type name of ${len} bytes`, q.consumed + 1);
          if (q.length < 5 + len) return 'blocked';
          const raw = Buffer.from(q.take(5 + len));
          this.#machine = raw.toString('latin1', 5);
          this.#configRaw = [raw];
          this.#state = S.ConfigSub;
          break;
        }
        case S.ConfigSub: {
          if (q.length < 1) return 'blocked';
          if (q.peekByte(0) !== QEMU_VM_SUBSECTION) {
            this.sink.onConfiguration(this.#machine, Buffer.concat(this.#configRaw));
            this.#state = S.Record;
            break;
          }
          if (q.length < 2) return 'blocked';
          const nlen = q.peekByte(1);
          if (q.length < 2 + nlen + 4 + 4) return 'blocked';
          const head = q.peek(2 + nlen + 8);
          const name = head.toString('latin1', 2, 2 + nlen);
          let bodyLen: number;
          if (name === 'configuration/target-page-bits') bodyLen = 4;
          else if (name === 'configuration/uuid') bodyLen = 16;
          else if (name === 'configuration/capabilities') {
            // be32 count, then counted strings: walk them without consuming
            const count = head.readUInt32BE(2 + nlen + 4);
            if (count > 64) this.#err('ERR_LIMIT', `main: configuration lists ${count} capabilities`);
            let at = 2 + nlen + 4 + 4;
            for (let i = 0; i < count; i++) {
              if (q.length < at + 1) return 'blocked';
              at += 1 + q.peekByte(at);
            }
            if (q.length < at) return 'blocked';
            bodyLen = at - (2 + nlen + 4);
          } else {
            this.#err('ERR_UNSUPPORTED', `main: unknown configuration subsection "${name}"`);
          }
          if (q.length < 2 + nlen + 4 + bodyLen) return 'blocked';
          this.#configRaw.push(Buffer.from(q.take(2 + nlen + 4 + bodyLen)));
          break;
        }
        case S.Record: {
          if (q.length < 1) return 'blocked';
          const t = q.peekByte(0);
          switch (t) {
            case QEMU_VM_EOF:
              q.skip(1);
              this.#state = S.Idle;
              return 'eof';
            case QEMU_VM_SECTION_START:
            case QEMU_VM_SECTION_FULL:
              this.#state = S.FullHeader; break;
            case QEMU_VM_SECTION_PART:
            case QEMU_VM_SECTION_END:
              this.#state = S.ShortHeader; break;
            case QEMU_VM_COMMAND:
              this.#state = S.Command; break;
            default:
              this.#err('ERR_UNKNOWN_SECTION', `main: unknown savevm section type ${t}`);
          }
          break;
        }
        case S.FullHeader: {
          if (q.length < 6) return 'blocked';
          const nlen = q.peekByte(5);
          if (q.length < 6 + nlen + 8) return 'blocked';
          const at = q.consumed;
          const b = q.take(6 + nlen + 8);
          const h: SectionHeader = {
            type: b[0]!, sectionId: b.readUInt32BE(1), idstr: b.toString('latin1', 6, 6 + nlen),
            instanceId: b.readUInt32BE(6 + nlen), versionId: b.readUInt32BE(10 + nlen),
          };
          const known = this.#sections.get(h.sectionId);
          if (known !== undefined && known !== h.idstr) this.#err('ERR_UNKNOWN_SECTION', `main: section id ${h.sectionId} was "${known}", now "${h.idstr}"`, at);
          this.#sections.set(h.sectionId, h.idstr);
          this.#hdr = h;
          this.sink.onSection(h);
          if (h.idstr === 'ram') {
            if (h.type !== QEMU_VM_SECTION_START) this.#err('ERR_UNKNOWN_SECTION', 'main: ram section must start with SECTION_START', at);
            if (this.#ramSectionId >= 0) this.#err('ERR_UNKNOWN_SECTION', 'main: second ram SECTION_START', at);
            if (h.versionId !== RAM_SECTION_VERSION) this.#err('ERR_BAD_VERSION', `main: ram section version ${h.versionId}, expected ${RAM_SECTION_VERSION}`, at);
            this.#ramSectionId = h.sectionId;
            this.ram.beginSection(true);
            this.#state = S.RamBody;
          } else if (h.type === QEMU_VM_SECTION_FULL) {
            this.#acc = Buffer.allocUnsafe(64 * 1024);
            this.#accLen = 0;
            this.#searchFrom = 0;
            this.#acc.set(b, 0);       // keep the header: the section is stored verbatim
            this.#accLen = b.length;
            this.#searchFrom = b.length;
            this.#state = S.DeviceBody;
          } else {
            this.#err('ERR_UNSUPPORTED', `main: live section "${h.idstr}" (only ram is supported)`, at);
          }
          break;
        }
        case S.ShortHeader: {
          if (q.length < 5) return 'blocked';
          const at = q.consumed;
          const b = q.take(5);
          const id = b.readUInt32BE(1);
          if (id !== this.#ramSectionId) this.#err('ERR_UNKNOWN_SECTION', `main: ${b[0] === QEMU_VM_SECTION_PART ? 'PART' : 'END'} for unknown section id ${id}`, at);
          this.#hdr = { type: b[0]!, sectionId: id, idstr: 'ram', instanceId: 0, versionId: RAM_SECTION_VERSION };
          this.sink.onSection(this.#hdr);
          this.ram.beginSection(false);
          this.#state = S.RamBody;
          break;
        }
        case S.RamBody: {
          const r = this.ram.feed(q);
          if (r === 'blocked') return 'blocked';
          if (r === 'eos') {
            this.#state = S.Footer;
            const p = this.sink.onRamEos(this.#hdr!);
            if (p) return this.#hold(p);
          } else {
            const p = this.sink.onRamFlush();
            if (p) return this.#hold(p);
          }
          break;
        }
        case S.Footer: {
          if (q.length < 5) return 'blocked';
          const at = q.consumed;
          const b = q.take(5);
          if (b[0] !== QEMU_VM_SECTION_FOOTER) this.#err('ERR_UNKNOWN_SECTION', `main: missing section footer for ${this.#hdr!.idstr} (byte 0x${hex(b[0]!, 2)})`, at);
          if (b.readUInt32BE(1) !== this.#hdr!.sectionId) this.#err('ERR_UNKNOWN_SECTION', `main: mismatched section id in footer for ${this.#hdr!.idstr}: ${b.readUInt32BE(1)}, expected ${this.#hdr!.sectionId}`, at);
          this.#state = S.Record;
          break;
        }
        case S.DeviceBody: {
          if (!this.#scanDevice()) return 'blocked';
          break;
        }
        case S.Command: {
          if (q.length < 5) return 'blocked';
          const head = q.peek(5);
          const cmd = head.readUInt16BE(1), len = head.readUInt16BE(3);
          if (cmd === 0 || cmd >= MIG_CMD_MAX) this.#err('ERR_UNKNOWN_SECTION', `main: MIG_CMD 0x${cmd.toString(16)} unknown`);
          if (len > this.limits.maxCommandBytes) this.#err('ERR_LIMIT', `main: command ${cmd} of ${len} bytes`);
          const fixed: Record<number, number> = { [MIG_CMD_OPEN_RETURN_PATH]: 0, [MIG_CMD_PING]: 4, [MIG_CMD_ENABLE_COLO]: 0, [MIG_CMD_SWITCHOVER_START]: 0 };
          if (!(cmd in fixed)) this.#err('ERR_UNSUPPORTED', `main: command ${cmd} (postcopy or packaged stream) is not supported`);
          if (fixed[cmd] !== len) this.#err('ERR_BAD_VERSION', `main: command ${cmd} received with bad length ${len}`);
          if (q.length < 5 + len) return 'blocked';
          q.skip(5);
          const payload = Buffer.from(q.take(len));
          this.sink.onCommand(cmd, payload);
          this.#state = S.Record;
          break;
        }
        case S.Vmdesc: {
          if (q.length < 5) return 'blocked';
          const head = q.peek(5);
          if (head[0] !== QEMU_VM_VMDESCRIPTION) this.#err('ERR_UNKNOWN_SECTION', `main: expected VMDESCRIPTION after EOF, got byte 0x${hex(head[0]!, 2)}`);
          const len = head.readUInt32BE(1);
          if (len > this.limits.maxVmdescBytes) this.#err('ERR_LIMIT', `main: VMDESCRIPTION of ${len} bytes, max ${this.limits.maxVmdescBytes}`);
          if (q.length < 5 + len) return 'blocked';
          q.skip(5);
          this.vmdesc = Buffer.from(q.take(len));
          this.#state = S.Idle;
          return 'vmdesc';
        }
        case S.Idle:
          return 'eof';
        case S.Failed:
          return 'blocked';
      }
    }
  }

  #hold(p: Promise<void>): 'held' {
    this.#held = p.finally(() => { this.#held = null; });
    return 'held';
  }

  /**
   * Footer scan with validation (spec §4.7.2): device bodies carry no length, so search for
   * 7E + be32(id) and accept a candidate only if a valid record follows it. Bytes read past
   * the footer go back to the queue.
   */
  #scanDevice(): boolean {
    const q = this.q;
    if (q.length > 0) {
      const n = q.length;
      if (this.#accLen + n > this.#acc.length) {
        const grown = Buffer.allocUnsafe(Math.max(this.#acc.length * 2, this.#accLen + n));
        this.#acc.copy(grown, 0, 0, this.#accLen);
        this.#acc = grown;
      }
      const start = q.consumed;
      q.copyInto(this.#acc, this.#accLen, n);
      void start;
      this.#accLen += n;
    }
    const h = this.#hdr!;
    const pat = Buffer.from([QEMU_VM_SECTION_FOOTER, 0, 0, 0, 0]);
    pat.writeUInt32BE(h.sectionId, 1);
    const view = this.#acc.subarray(0, this.#accLen);
    for (;;) {
      const i = view.indexOf(pat, this.#searchFrom);
      if (i < 0) {
        this.#searchFrom = Math.max(this.#searchFrom, this.#accLen - 4);
        if (this.#accLen > this.limits.maxSectionBytes) this.#err('ERR_LIMIT', `main: device section "${h.idstr}" longer than ${this.limits.maxSectionBytes} bytes without a footer`);
        return false;
      }
      const v = this.#validateNext(view, i + 5);
      if (v === 'more') { this.#searchFrom = i; return false; }
      if (v === 'bad') { this.#searchFrom = i + 1; continue; }
      // The cap holds for the section found, not only while its footer is missing.
      if (i + 5 > this.limits.maxSectionBytes) this.#err('ERR_LIMIT', `main: device section "${h.idstr}" of ${i + 5} bytes, max ${this.limits.maxSectionBytes}`);
      const raw = Buffer.from(view.subarray(0, i + 5));
      q.unshift(Buffer.from(view.subarray(i + 5)));
      this.#acc = Buffer.alloc(0);
      this.#accLen = 0;
      this.#state = S.Record;
      this.sink.onDeviceSection(h, raw);
      return true;
    }
  }

  #validateNext(b: Buffer, i: number): 'ok' | 'bad' | 'more' {
    if (i >= b.length) return 'more';
    const t = b[i]!;
    switch (t) {
      case QEMU_VM_EOF: {
        if (!this.expectVmdesc) return 'ok';
        if (i + 6 >= b.length) return 'more';
        if (b[i + 1] !== QEMU_VM_VMDESCRIPTION) return 'bad';
        // The length is not capped here: an oversize VMDESCRIPTION must fail at its own record
        // with ERR_LIMIT, not make the scan miss the true footer.
        const len = b.readUInt32BE(i + 2);
        return len > 0 && b[i + 6] === 0x7b /* '{' */ ? 'ok' : 'bad';
      }
      case QEMU_VM_SECTION_START:
      case QEMU_VM_SECTION_FULL: {
        if (i + 6 > b.length) return 'more';
        const id = b.readUInt32BE(i + 1), nlen = b[i + 5]!;
        if (nlen === 0 || id > 0xffff) return 'bad';
        if (i + 6 + nlen + 8 > b.length) return 'more';
        for (let k = 0; k < nlen; k++) { const c = b[i + 6 + k]!; if (c < 0x20 || c > 0x7e) return 'bad'; }
        const idstr = b.toString('latin1', i + 6, i + 6 + nlen);
        if (b.readUInt32BE(i + 6 + nlen) > 0xffff || b.readUInt32BE(i + 10 + nlen) > 0xffff) return 'bad';
        const known = this.#sections.get(id);
        if (known !== undefined && known !== idstr) return 'bad';
        if (id === this.#hdr!.sectionId) return 'bad';
        return 'ok';
      }
      case QEMU_VM_SECTION_PART:
      case QEMU_VM_SECTION_END: {
        if (i + 5 > b.length) return 'more';
        return b.readUInt32BE(i + 1) === this.#ramSectionId ? 'ok' : 'bad';
      }
      case QEMU_VM_COMMAND: {
        if (i + 5 > b.length) return 'more';
        const cmd = b.readUInt16BE(i + 1), len = b.readUInt16BE(i + 3);
        return cmd > 0 && cmd < MIG_CMD_MAX && len <= 64 ? 'ok' : 'bad';
      }
      default:
        return 'bad';
    }
  }

  /** Raw configuration record (0x07, name, subsections) for replay. */
  get machineType(): string { return this.#machine; }
}
