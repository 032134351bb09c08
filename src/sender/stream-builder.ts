// The main channel as QEMU's save side writes it: every method is one qemu_put_* sequence from
// migration/savevm.c (header, sections, commands, EOF, vmdesc), migration/ram.c (MEM_SIZE list,
// page records, EOS, MULTIFD_FLUSH) or migration/colo.c (COLO messages). Spec §4 and §5.
//
// Bytes are staged in a slab, as QEMUFile stages them in its buffer: small puts and page
// copies land in one allocation, and drain() hands out the filled part as a chunk that is never
// written to again. Page bytes are copied, so the caller may change guest memory right after
// the call; a chunk never aliases the memory model.

import assert from 'node:assert/strict';
import {
  COLO_MESSAGE_VMSTATE_SIZE,
  MIG_CMD_ENABLE_COLO,
  QEMU_VM_COMMAND,
  QEMU_VM_CONFIGURATION,
  QEMU_VM_EOF,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_SECTION_END,
  QEMU_VM_SECTION_FOOTER,
  QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART,
  QEMU_VM_SECTION_START,
  QEMU_VM_VMDESCRIPTION,
  RAM_SAVE_FLAG_CONTINUE,
  RAM_SAVE_FLAG_EOS,
  RAM_SAVE_FLAG_MEM_SIZE,
  RAM_SAVE_FLAG_MULTIFD_FLUSH,
  RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_ZERO,
  TARGET_PAGE_SIZE,
} from '../wire/constants.js';

const SLAB_SIZE = 64 * 1024;
const TWO_32 = 2 ** 32;

/** Full section header (START and FULL): spec §4.3. */
export interface SectionHeader {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

/** One entry of the MEM_SIZE list (spec §4.6.2) with default capabilities: no optional fields. */
export interface RamBlockInfo {
  idstr: string;
  usedLength: number;
}

/**
 * Builds main-channel bytes exactly as QEMU's save side writes them.
 * Chainable; `build()` returns everything, `drain()` returns what was added since the last drain.
 * Tracks RAM_SAVE_FLAG_CONTINUE like `save_page_header()`: the block name is written only when it
 * differs from the previous page record's block, and that state survives sections and checkpoints.
 */
export class StreamBuilder {
  #chunks: Buffer[] = [];
  #chunkBytes = 0;
  #slab: Buffer = Buffer.allocUnsafeSlow(SLAB_SIZE);
  #start = 0;                          // first byte of #slab not yet handed out by drain()
  #pos = 0;
  #total = 0;
  #lastBlock: string | undefined;      // pss->last_sent_block: what CONTINUE refers to

  /** Bytes added since the last drain(). */
  get pendingBytes(): number {
    return this.#chunkBytes + this.#pos - this.#start;
  }

  /** Bytes added over the builder's lifetime. */
  get totalBytes(): number {
    return this.#total;
  }

  /** Block named by the last page record, or undefined before the first one / after a reset. */
  get lastBlock(): string | undefined {
    return this.#lastBlock;
  }

  /** Forget the CONTINUE block, as `ram_state_reset()` does when RAM blocks change. */
  resetLastBlock(): this {
    this.#lastBlock = undefined;
    return this;
  }

  /** `qemu_savevm_state_header()` first half: magic "QEVM" and stream version 3 (spec §4.1). */
  fileHeader(): this {
    this.#reserve(8);
    this.#u32(QEMU_VM_FILE_MAGIC);
    this.#u32(QEMU_VM_FILE_VERSION);
    return this;
  }

  /** QEMU_VM_CONFIGURATION with the machine type name; no subsections, no footer (spec §4.1). */
  configuration(machineType = 'pc-i440fx-7.2'): this {
    const n = Buffer.byteLength(machineType, 'latin1');
    this.#reserve(5 + n);
    this.#u8(QEMU_VM_CONFIGURATION);
    this.#u32(n);
    this.#latin1(machineType, n);
    return this;
  }

  /** QEMU_VM_COMMAND: u8 0x08, be16 cmd, be16 len, payload (spec §4.4). */
  command(cmd: number, payload: Uint8Array = EMPTY): this {
    assert(payload.length <= 0xffff, 'command payload longer than a be16 length');
    this.#reserve(5 + payload.length);
    this.#u8(QEMU_VM_COMMAND);
    this.#u16(cmd);
    this.#u16(payload.length);
    this.#bytes(payload, 0, payload.length);
    return this;
  }

  /** MIG_CMD_ENABLE_COLO: `08 00 08 00 00`. */
  enableColo(): this {
    return this.command(MIG_CMD_ENABLE_COLO);
  }

  /** QEMU_VM_SECTION_START full header (`save_section_header()`). */
  sectionStart(hdr: SectionHeader): this {
    return this.#fullHeader(QEMU_VM_SECTION_START, hdr);
  }

  /** QEMU_VM_SECTION_PART short header. */
  sectionPart(sectionId: number): this {
    return this.#shortHeader(QEMU_VM_SECTION_PART, sectionId);
  }

  /** QEMU_VM_SECTION_END short header. */
  sectionEnd(sectionId: number): this {
    return this.#shortHeader(QEMU_VM_SECTION_END, sectionId);
  }

  /** A whole QEMU_VM_SECTION_FULL section: header, body as given, footer. */
  sectionFull(hdr: SectionHeader, body: Uint8Array): this {
    this.#fullHeader(QEMU_VM_SECTION_FULL, hdr);
    this.#reserve(body.length);
    this.#bytes(body, 0, body.length);
    return this.footer(hdr.sectionId);
  }

  /** QEMU_VM_SECTION_FOOTER: `7E` + be32 section id (`save_section_footer()`). */
  footer(sectionId: number): this {
    this.#reserve(5);
    this.#u8(QEMU_VM_SECTION_FOOTER);
    this.#u32(sectionId);
    return this;
  }

  /** The MEM_SIZE record and block list that open the `ram` START section (spec §4.6.2). */
  ramMemSize(blocks: readonly RamBlockInfo[]): this {
    let total = 0;
    for (const b of blocks) total += b.usedLength;
    this.#reserve(8);
    this.#word(total, RAM_SAVE_FLAG_MEM_SIZE);
    for (const b of blocks) {
      const n = idstrLength(b.idstr);
      this.#reserve(1 + n + 8);
      this.#u8(n);
      this.#latin1(b.idstr, n);
      this.#u64(b.usedLength);
    }
    return this;
  }

  /** RAM_SAVE_FLAG_PAGE record: word, block name unless CONTINUE, 4096 bytes (`save_normal_page()`). */
  ramPage(idstr: string, offset: number, bytes4096: Uint8Array): this {
    return this.ramPageFrom(idstr, offset, bytes4096, 0);
  }

  /** As ramPage(), reading the page at src[srcOffset..]: no subarray per page on the hot path. */
  ramPageFrom(idstr: string, offset: number, src: Uint8Array, srcOffset: number): this {
    assert(srcOffset + TARGET_PAGE_SIZE <= src.length, 'ramPage: source shorter than a page');
    this.#pageHeader(idstr, offset, RAM_SAVE_FLAG_PAGE, TARGET_PAGE_SIZE);
    this.#bytes(src, srcOffset, TARGET_PAGE_SIZE);
    return this;
  }

  /**
   * RAM_SAVE_FLAG_ZERO record: word, block name unless CONTINUE, fill byte (`save_zero_page()`).
   * QEMU always sends fill 0; another value is only for fault tests (spec §4.6.3).
   */
  ramZero(idstr: string, offset: number, fill = 0): this {
    this.#pageHeader(idstr, offset, RAM_SAVE_FLAG_ZERO, 1);
    this.#u8(fill);
    return this;
  }

  /** RAM_SAVE_FLAG_EOS: ends the RAM records of a section. */
  ramEos(): this {
    this.#reserve(8);
    this.#word(0, RAM_SAVE_FLAG_EOS);
    return this;
  }

  /** RAM_SAVE_FLAG_MULTIFD_FLUSH: the per-round barrier marker (spec §3.2). */
  ramMultifdFlush(): this {
    this.#reserve(8);
    this.#word(0, RAM_SAVE_FLAG_MULTIFD_FLUSH);
    return this;
  }

  /** QEMU_VM_EOF. */
  eof(): this {
    this.#reserve(1);
    this.#u8(QEMU_VM_EOF);
    return this;
  }

  /** QEMU_VM_VMDESCRIPTION: be32 length and the JSON text (spec §4.7.3). */
  vmdescription(json: string): this {
    const n = Buffer.byteLength(json, 'utf8');
    this.#reserve(5 + n);
    this.#u8(QEMU_VM_VMDESCRIPTION);
    this.#u32(n);
    this.#pos += this.#slab.write(json, this.#pos, n, 'utf8');
    return this;
  }

  /** A COLO message: be32 enum value (`colo_send_message()`). */
  coloMessage(n: number): this {
    this.#reserve(4);
    this.#u32(n);
    return this;
  }

  /** COLO_MESSAGE_VMSTATE_SIZE followed by the be64 blob size (`colo_send_message_value()`). */
  vmstateSize(n: number): this {
    this.#reserve(12);
    this.#u32(COLO_MESSAGE_VMSTATE_SIZE);
    this.#u64(n);
    return this;
  }

  /** Arbitrary bytes, copied (device-state blob, or deliberate garbage in fault tests). */
  raw(bytes: Uint8Array): this {
    if (bytes.length > SLAB_SIZE) {
      this.#seal();
      this.#chunks.push(Buffer.from(bytes));
      this.#chunkBytes += bytes.length;
      this.#total += bytes.length;
      return this;
    }
    this.#reserve(bytes.length);
    this.#bytes(bytes, 0, bytes.length);
    return this;
  }

  /** Everything added since the last drain(), as one Buffer. */
  build(): Buffer {
    const chunks = this.drain();
    return chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
  }

  /** The chunks added since the last drain(), in order; the builder keeps no reference to them. */
  drain(): Buffer[] {
    this.#seal();
    const out = this.#chunks;
    this.#chunks = [];
    this.#chunkBytes = 0;
    return out;
  }

  // --- internals ---

  #fullHeader(type: number, hdr: SectionHeader): this {
    const n = idstrLength(hdr.idstr);
    this.#reserve(1 + 4 + 1 + n + 8);
    this.#u8(type);
    this.#u32(hdr.sectionId);
    this.#u8(n);
    this.#latin1(hdr.idstr, n);
    this.#u32(hdr.instanceId);
    this.#u32(hdr.versionId);
    return this;
  }

  #shortHeader(type: number, sectionId: number): this {
    this.#reserve(5);
    this.#u8(type);
    this.#u32(sectionId);
    return this;
  }

  // save_page_header(): CONTINUE when the block is the one named last; reserves the payload too.
  #pageHeader(idstr: string, offset: number, flag: number, payload: number): void {
    assert(offset % TARGET_PAGE_SIZE === 0, 'page offset not page aligned');
    if (idstr === this.#lastBlock) {
      this.#reserve(8 + payload);
      this.#word(offset, flag | RAM_SAVE_FLAG_CONTINUE);
      return;
    }
    const n = idstrLength(idstr);
    this.#reserve(8 + 1 + n + payload);
    this.#word(offset, flag);
    this.#u8(n);
    this.#latin1(idstr, n);
    this.#lastBlock = idstr;
  }

  // Hands the filled part of the slab to the chunk list; later bytes continue after it.
  #seal(): void {
    if (this.#pos > this.#start) {
      this.#chunks.push(this.#slab.subarray(this.#start, this.#pos));
      this.#chunkBytes += this.#pos - this.#start;
      this.#start = this.#pos;
    }
  }

  #reserve(n: number): void {
    this.#total += n;
    if (this.#pos + n <= this.#slab.length) return;
    this.#seal();
    this.#slab = Buffer.allocUnsafeSlow(Math.max(SLAB_SIZE, n));
    this.#start = this.#pos = 0;
  }

  #u8(v: number): void {
    this.#slab[this.#pos++] = v;
  }

  #u16(v: number): void {
    this.#slab.writeUInt16BE(v, this.#pos);
    this.#pos += 2;
  }

  #u32(v: number): void {
    this.#slab.writeUInt32BE(v >>> 0, this.#pos);
    this.#pos += 4;
  }

  // be64 of a non-negative integer up to 2^53, as two be32 halves (no BigInt per record).
  #u64(v: number): void {
    this.#u32(Math.floor(v / TWO_32));
    this.#u32(v);
  }

  // The ram word "addr | flags": flags sit in the low 12 bits, which a page-aligned addr leaves free.
  #word(addr: number, flags: number): void {
    this.#u32(Math.floor(addr / TWO_32));
    this.#u32(((addr >>> 0) | flags) >>> 0);
  }

  #latin1(s: string, n: number): void {
    this.#pos += this.#slab.write(s, this.#pos, n, 'latin1');
  }

  #bytes(src: Uint8Array, from: number, n: number): void {
    this.#slab.set(n === src.length && from === 0 ? src : src.subarray(from, from + n), this.#pos);
    this.#pos += n;
  }
}

const EMPTY = new Uint8Array(0);

function idstrLength(idstr: string): number {
  const n = Buffer.byteLength(idstr, 'latin1');
  assert(n >= 1 && n <= 255, `idstr "${idstr}" must be 1..255 bytes for a counted string`);
  return n;
}
