import { readFile } from 'node:fs/promises';
import { gunzipSync } from 'node:zlib';
import { MigrationError } from '../errors.js';
import { DEFAULT_LIMITS } from '../migration/limits.js';
import { MultiFDChannel, type ChannelSink } from '../migration/multifd-channel.js';
import type { Compression } from '../migration/multifd-packet.js';
import { RamSectionParser, type RamSink } from '../migration/ram-section.js';
import { VmStateParser, type SectionHeader, type VmStateSink } from '../migration/vmstate-stream.js';
import { WRITE_GUEST } from '../memory/page-writer.js';
import type { RAMBlock } from '../memory/ram-block.js';
import { ByteQueue } from '../wire/byte-queue.js';
import {
  COLO_MESSAGE_NAMES, COLO_MESSAGE_VMSTATE_SEND, COLO_MESSAGE_VMSTATE_SIZE, MIG_CMD_ENABLE_COLO, MIG_CMD_OPEN_RETURN_PATH,
  MIG_CMD_PING, MIG_CMD_SWITCHOVER_START, MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FULL,
  QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START,
} from '../wire/constants.js';

const SECTION_TYPES: Record<number, string> = { [QEMU_VM_SECTION_START]: 'START', [QEMU_VM_SECTION_PART]: 'PART', [QEMU_VM_SECTION_END]: 'END', [QEMU_VM_SECTION_FULL]: 'FULL' };
const COMMANDS: Record<number, string> = { [MIG_CMD_OPEN_RETURN_PATH]: 'OPEN_RETURN_PATH', [MIG_CMD_PING]: 'PING', [MIG_CMD_ENABLE_COLO]: 'ENABLE_COLO', [MIG_CMD_SWITCHOVER_START]: 'SWITCHOVER_START' };

/**
 * A block that validates offsets like a real one and has no memory: the main channel's
 * parser runs with `discardPages`, multifd pages are only counted.
 */
function dryBlock(index: number, idstr: string, usedLength: number): RAMBlock {
  return { index, idstr, usedLength, pages: usedLength / 4096 } as unknown as RAMBlock;
}

function out(line: string): void { process.stdout.write(line + '\n'); }

async function load(path: string): Promise<Buffer> {
  const b = await readFile(path);
  return b[0] === 0x1f && b[1] === 0x8b ? gunzipSync(b) : b;
}

/** The main channel: records, sections, commands, and COLO checkpoints if the capture has them. */
function inspectMain(name: string, data: Buffer, blocks: Map<string, RAMBlock>): void {
  const q = new ByteQueue();
  const ramSink: RamSink = {
    onMemSize: (list) => {
      out(`  MEM_SIZE: ${list.length} RAMBlocks, ${list.reduce((s, b) => s + b.usedLength, 0)} bytes`);
      for (const b of list) { out(`    ${b.idstr}  0x${b.usedLength.toString(16)}`); blocks.set(b.idstr, dryBlock(blocks.size, b.idstr, b.usedLength)); }
    },
    findBlock: (idstr) => blocks.get(idstr),
    writeMode: () => WRITE_GUEST,
    discardPages: true,
  };
  const ram = new RamSectionParser(ramSink, DEFAULT_LIMITS);
  let flushes = 0, sectionAt = 0;
  let pages0 = 0, zero0 = 0;
  const vmSink: VmStateSink = {
    onConfiguration: (machine, raw) => out(`  CONFIGURATION machine "${machine}" (${raw.length} bytes)`),
    onCommand: (cmd, payload) => out(`  COMMAND ${COMMANDS[cmd] ?? cmd}${payload.length ? ` ${payload.toString('hex')}` : ''}`),
    onSection: (h: SectionHeader) => {
      sectionAt = q.consumed;
      pages0 = ram.pages; zero0 = ram.zeroPages; flushes = 0;
      if (h.idstr === 'ram') out(`  ${SECTION_TYPES[h.type]} ram (section ${h.sectionId}${h.type === QEMU_VM_SECTION_START ? `, version ${h.versionId}` : ''})`);
    },
    onRamEos: () => { out(`    ${ram.pages - pages0} pages, ${ram.zeroPages - zero0} zero pages${flushes ? `, ${flushes} MULTIFD_FLUSH` : ''}, EOS`); },
    onRamFlush: () => { flushes++; },
    onDeviceSection: (h, raw) => out(`  FULL ${h.idstr} (section ${h.sectionId}, instance ${h.instanceId}, version ${h.versionId}): ${raw.length} bytes at ${sectionAt - 1}`),
  };
  const vm = new VmStateParser(q, vmSink, ram, DEFAULT_LIMITS);
  q.push(data);
  let phase: 'savevm' | 'vmdesc' | 'colo' | 'blob' = 'savevm';
  let initial = true, checkpoints = 0, blobLeft = 0;
  for (;;) {
    if (phase === 'savevm') {
      const r = vm.feed();
      if (r === 'blocked') break;
      if (r === 'eof') {
        out(`  EOF at ${q.consumed - 1}`);
        if (initial && q.length > 0 && q.peekByte(0) === 0x06) { vm.beginVmdesc(); phase = 'vmdesc'; }
        else { initial = false; phase = 'colo'; }
      }
    } else if (phase === 'vmdesc') {
      if (vm.feed() !== 'vmdesc') break;
      out(`  VMDESCRIPTION ${vm.vmdesc!.length} bytes of JSON`);
      initial = false;
      phase = 'colo';
    } else if (phase === 'colo') {
      if (q.length < 4) break;
      const msg = q.peekU32(0);
      if (msg === COLO_MESSAGE_VMSTATE_SIZE) {
        if (q.length < 12) break;
        q.skip(4);
        const hi = q.peekU32(0), lo = q.peekU32(4);
        q.skip(8);
        blobLeft = hi * 2 ** 32 + lo;
        out(`  COLO VMSTATE_SIZE ${blobLeft} (device-state blob)`);
        phase = 'blob';
        continue;
      }
      q.skip(4);
      out(`  COLO ${COLO_MESSAGE_NAMES[msg] ?? `invalid message ${msg}`}`);
      if (msg === COLO_MESSAGE_VMSTATE_SEND) { checkpoints++; out(`  -- checkpoint ${checkpoints}`); vm.beginRecords(); phase = 'savevm'; }
      else if (msg >= COLO_MESSAGE_NAMES.length) throw new MigrationError('ERR_COLO_PROTOCOL', `${name}: invalid COLO message ${msg}`, 'main', q.consumed - 4);
    } else {
      const n = Math.min(blobLeft, q.length);
      q.skip(n);
      blobLeft -= n;
      if (blobLeft > 0) break;
      phase = 'colo';
    }
  }
  out(`  ${q.consumed} bytes parsed${q.length ? `, ${q.length} bytes left over (stream cut inside a record)` : ''}; ${ram.pages} pages, ${ram.zeroPages} zero pages on the main channel${checkpoints ? `; ${checkpoints} COLO checkpoints` : ''}`);
}

async function inspectMultifd(_name: string, data: Buffer, compression: Compression, blocks: Map<string, RAMBlock>): Promise<void> {
  const sink: ChannelSink = {
    onHandshake: (_c, init) => out(`  MultiFDInit: channel id ${init.id}, uuid ${init.uuid.toString('hex')}`),
    // Block names and lengths come from the main stream when it is given; else any offset is accepted.
    findBlock: (idstr) => blocks.get(idstr) ?? dryBlock(0, idstr, 2 ** 52),
    writeMode: () => WRITE_GUEST,
    discardPages: true,
    submit: () => Promise.resolve(0),
    onSynced: (c) => { c.release(); },
    onBlocked: () => undefined,
    onError: (e) => { throw e; },
  };
  const ch = new MultiFDChannel(sink, compression, DEFAULT_LIMITS, 1);
  let err: MigrationError | null = null;
  sink.onError = (e) => { err = e; };
  ch.push(data);
  // Page writes settle asynchronously (they free staging slots): let them, until the channel
  // has parsed everything or stops making progress.
  for (let left = -1; ch.q.length > 0 && ch.q.length !== left && !err;) {
    left = ch.q.length;
    await new Promise((r) => setImmediate(r));
  }
  if (err) throw err;
  out(`  ${ch.packets} packets, ${ch.syncs} SYNC, ${ch.pages} normal pages, ${ch.zeroPages} zero pages, ${ch.bytes} payload bytes${ch.q.length ? `; ${ch.q.length} bytes left over` : ''}`);
}

/** `colo-receiver inspect FILE...`: what analyze-migration.py does for files, plus multifd. */
export async function inspect(argv: string[]): Promise<number> {
  const files = argv.filter((a) => !a.startsWith('--'));
  const comp = (argv.find((a) => a.startsWith('--compression='))?.split('=')[1] ?? 'none') as Compression;
  if (files.length === 0 || argv.includes('--help')) {
    process.stdout.write('usage: colo-receiver inspect [--compression=none|zlib|zstd] FILE...   (captured main and multifd streams; .gz accepted)\n');
    return files.length === 0 ? 1 : 0;
  }
  const blocks = new Map<string, RAMBlock>();
  let failed = false;
  const datas = await Promise.all(files.map(load));
  // Main streams first: their MEM_SIZE list lets multifd offsets be checked against real blocks.
  const order = files.map((f, i) => ({ f, d: datas[i]! })).sort((a, b) => Number(b.d.readUInt32BE(0) === QEMU_VM_FILE_MAGIC) - Number(a.d.readUInt32BE(0) === QEMU_VM_FILE_MAGIC));
  for (const { f, d } of order) {
    const magic = d.length >= 4 ? d.readUInt32BE(0) : 0;
    try {
      if (magic === QEMU_VM_FILE_MAGIC) {
        out(`${f}: main channel (QEVM), ${d.length} bytes`);
        inspectMain(f, d, blocks);
      } else if (magic === MULTIFD_MAGIC) {
        out(`${f}: multifd channel, ${d.length} bytes`);
        await inspectMultifd(f, d, comp, blocks);
      } else {
        out(`${f}: not a migration stream (magic 0x${magic.toString(16)})`);
        failed = true;
      }
    } catch (e) {
      failed = true;
      if (e instanceof MigrationError) out(`  ERROR ${e.code} at byte ${e.streamOffset ?? '?'}: ${e.message}`);
      else throw e;
    }
  }
  return failed ? 2 : 0;
}
