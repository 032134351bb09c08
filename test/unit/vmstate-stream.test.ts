import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { MigrationError, type MigrationErrorCode } from '../../src/errors.js';
import { WRITE_GUEST, type WriteMode } from '../../src/memory/page-writer.js';
import { RAMBlockList, type RAMBlock } from '../../src/memory/ram-block.js';
import { DEFAULT_LIMITS, type Limits } from '../../src/migration/limits.js';
import { RamSectionParser, type RamSink } from '../../src/migration/ram-section.js';
import { VmStateParser, type FeedResult, type SectionHeader, type VmStateSink } from '../../src/migration/vmstate-stream.js';
import { StreamBuilder, type SectionHeader as BuilderHeader } from '../../src/sender/stream-builder.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import {
  MIG_CMD_ENABLE_COLO, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MIG_CMD_POSTCOPY_ADVISE, MIG_CMD_POSTCOPY_LISTEN,
  MIG_CMD_SWITCHOVER_START, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_START,
} from '../../src/wire/constants.js';

const P = 4096;
const RAM: BuilderHeader = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 };
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 8 * P }, { idstr: '/rom@etc/acpi/tables', usedLength: 2 * P }];
const VMDESC = '{"page_size":4096,"devices":[]}';

function pageBytes(seed: number): Buffer {
  const b = Buffer.allocUnsafe(P);
  for (let i = 0; i < P; i++) b[i] = (seed * 29 + i * 3 + (i >> 7)) & 0xff;
  return b;
}

function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n >>> 0, 0); return b; }
function counted(s: string): Buffer { return Buffer.concat([Buffer.from([s.length]), Buffer.from(s, 'latin1')]); }
/** A configuration subsection as vmstate_save_state writes it: 05, counted name, be32 version, body. */
function subsection(name: string, body: Buffer): Buffer { return Buffer.concat([Buffer.from([0x05]), counted(name), be32(1), body]); }
/** A FULL section header (save_section_header) for hand-made candidates inside device bodies. */
function fullHeader(id: number, idstr: string, instance = 0, version = 1, type = QEMU_VM_SECTION_FULL): Buffer {
  return Buffer.concat([Buffer.from([type]), be32(id), counted(idstr), be32(instance), be32(version)]);
}
function fakeFooter(id: number): Buffer { return Buffer.concat([Buffer.from([0x7e]), be32(id)]); }

class Host implements RamSink {
  readonly blocks = new RAMBlockList();
  mode: WriteMode = WRITE_GUEST;
  onMemSize(list: { idstr: string; usedLength: number }[]): void { for (const b of list) this.blocks.add(b.idstr, b.usedLength); }
  findBlock(idstr: string): RAMBlock | undefined { return this.blocks.get(idstr); }
  writeMode(): WriteMode { return this.mode; }
}

class Events implements VmStateSink {
  readonly log: string[] = [];
  readonly devices: Buffer[] = [];
  config: Buffer | null = null;
  eos: () => Promise<void> | void = () => undefined;
  onConfiguration(machine: string, raw: Buffer): void { this.log.push(`config ${machine}`); this.config = raw; }
  onCommand(cmd: number, payload: Buffer): void { this.log.push(`cmd ${cmd} ${payload.toString('hex')}`); }
  onSection(h: SectionHeader): void { this.log.push(`section ${h.type} ${h.sectionId} ${h.idstr} ${h.instanceId} ${h.versionId}`); }
  onRamEos(h: SectionHeader): Promise<void> | void { this.log.push(`eos ${h.sectionId}`); return this.eos(); }
  flush: () => Promise<void> | void = () => undefined;
  onRamFlush(): Promise<void> | void { this.log.push('flush'); return this.flush(); }
  onDeviceSection(h: SectionHeader, raw: Buffer): void { this.log.push(`device ${h.sectionId} ${h.idstr}`); this.devices.push(Buffer.from(raw)); }
}

interface Rig { vm: VmStateParser; q: ByteQueue; host: Host; ev: Events; run(bytes: Buffer): FeedResult[] }

function rig(opts: { limits?: Partial<Limits>; expectVmdesc?: boolean } = {}): Rig {
  const limits = { ...DEFAULT_LIMITS, ...opts.limits };
  const host = new Host();
  const ev = new Events();
  const q = new ByteQueue();
  const vm = new VmStateParser(q, ev, new RamSectionParser(host, limits), limits);
  vm.expectVmdesc = opts.expectVmdesc ?? true;
  let vmdescAsked = false;
  return {
    vm, q, host, ev,
    run(bytes) {
      q.push(bytes);
      const out: FeedResult[] = [];
      for (;;) {
        const r = vm.feed();
        out.push(r);
        if (r === 'eof' && vm.expectVmdesc && !vmdescAsked) { vmdescAsked = true; vm.beginVmdesc(); continue; }
        return out;
      }
    },
  };
}

/** Feeds the stream one byte at a time. */
function runBytewise(r: Rig, bytes: Buffer): FeedResult[] {
  const out: FeedResult[] = [];
  for (let i = 0; i < bytes.length; i++) out.push(...r.run(bytes.subarray(i, i + 1)).filter((x) => x !== 'blocked'));
  return out;
}

function expectError(fn: () => unknown, code: MigrationErrorCode, streamOffset?: number): MigrationError {
  let caught: unknown;
  try { fn(); } catch (e) { caught = e; }
  assert.ok(caught instanceof MigrationError, `expected a MigrationError ${code}, got ${String(caught)}`);
  assert.equal(caught.code, code);
  assert.equal(caught.channel, 'main');
  assert.equal(typeof caught.streamOffset, 'number');
  if (streamOffset !== undefined) assert.equal(caught.streamOffset, streamOffset);
  return caught;
}

/** Header, configuration and the ram START section with the block list. */
function prefix(sb = new StreamBuilder()): StreamBuilder {
  return sb.fileHeader().configuration().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(RAM.sectionId);
}

function deviceBytes(hdr: BuilderHeader, body: Buffer): Buffer { return new StreamBuilder().sectionFull(hdr, body).build(); }

describe('VmStateParser', () => {
  test('parses a whole precopy stream', () => {
    const r = rig();
    const timer = { sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 };
    const gs = { sectionId: 46, idstr: 'globalstate', instanceId: 0, versionId: 1 };
    const timerBody = Buffer.from('0102030405060708090a0b0c0d0e0f10', 'hex');
    const gsBody = Buffer.concat([be32(8), Buffer.from('running\0')]);
    const stream = new StreamBuilder().fileHeader().configuration('pc-i440fx-7.2')
      .command(MIG_CMD_OPEN_RETURN_PATH).command(MIG_CMD_PING, be32(1)).enableColo()
      .sectionStart(RAM).ramMemSize(BLOCKS).ramPage('pc.ram', 0, pageBytes(1)).ramZero('pc.ram', P, 0).ramEos().footer(2)
      .sectionPart(2).ramPage('/rom@etc/acpi/tables', P, pageBytes(2)).ramMultifdFlush().ramPage('pc.ram', 7 * P, pageBytes(3)).ramEos().footer(2)
      .sectionEnd(2).ramEos().footer(2)
      .sectionFull(timer, timerBody).sectionFull(gs, gsBody)
      .eof().vmdescription(VMDESC).build();
    assert.deepEqual(r.run(stream), ['eof', 'vmdesc']);
    assert.deepEqual(r.ev.log, [
      'config pc-i440fx-7.2',
      `cmd ${MIG_CMD_OPEN_RETURN_PATH} `, `cmd ${MIG_CMD_PING} 00000001`, `cmd ${MIG_CMD_ENABLE_COLO} `,
      `section ${QEMU_VM_SECTION_START} 2 ram 0 4`, 'eos 2',
      `section ${QEMU_VM_SECTION_PART} 2 ram 0 4`, 'flush', 'eos 2',
      `section ${QEMU_VM_SECTION_END} 2 ram 0 4`, 'eos 2',
      `section ${QEMU_VM_SECTION_FULL} 0 timer 0 2`, 'device 0 timer',
      `section ${QEMU_VM_SECTION_FULL} 46 globalstate 0 1`, 'device 46 globalstate',
    ]);
    assert.deepEqual(r.ev.devices, [deviceBytes(timer, timerBody), deviceBytes(gs, gsBody)]);
    assert.equal(r.vm.vmdesc?.toString(), VMDESC);
    assert.equal(r.vm.ramSectionId, 2);
    assert.equal(r.vm.machineType, 'pc-i440fx-7.2');
    assert.deepEqual(r.ev.config, new StreamBuilder().configuration('pc-i440fx-7.2').build());
    const pc = r.host.blocks.get('pc.ram')!;
    assert.deepEqual(Buffer.from(pc.guest.page(0)), pageBytes(1));
    assert.deepEqual(Buffer.from(pc.guest.page(7)), pageBytes(3));
    assert.deepEqual(Buffer.from(r.host.blocks.get('/rom@etc/acpi/tables')!.guest.page(1)), pageBytes(2));
    assert.ok(r.vm.idle);
    assert.equal(r.q.length, 0);
  });

  test('parses the same stream fed one byte at a time', () => {
    const stream = new StreamBuilder().fileHeader().configuration()
      .sectionStart(RAM).ramMemSize(BLOCKS).ramPage('pc.ram', 2 * P, pageBytes(4)).ramEos().footer(2)
      .sectionFull({ sectionId: 5, idstr: 'apic', instanceId: 0, versionId: 3 }, Buffer.concat([fakeFooter(5), Buffer.from([0x09]), pageBytes(5).subarray(0, 100)]))
      .eof().vmdescription(VMDESC).build();
    const whole = rig();
    whole.run(stream);
    const bytewise = rig();
    assert.deepEqual(runBytewise(bytewise, stream), ['eof', 'vmdesc']);
    assert.deepEqual(bytewise.ev.log, whole.ev.log);
    assert.deepEqual(bytewise.ev.devices, whole.ev.devices);
    assert.deepEqual(bytewise.ev.config, whole.ev.config);
    assert.deepEqual(Buffer.from(bytewise.host.blocks.get('pc.ram')!.guest.page(2)), pageBytes(4));
  });

  test('parses configuration subsections and keeps the record verbatim', () => {
    const r = rig({ expectVmdesc: false });
    const subs = Buffer.concat([
      subsection('configuration/target-page-bits', be32(12)),
      subsection('configuration/capabilities', Buffer.concat([be32(2), counted('x-ignore-shared'), counted('mapped-ram')])),
      subsection('configuration/uuid', Buffer.alloc(16, 0xab)),
    ]);
    const stream = new StreamBuilder().fileHeader().configuration('pc-q35-9.2').raw(subs).command(MIG_CMD_SWITCHOVER_START).eof().build();
    assert.deepEqual(runBytewise(r, stream), ['eof']);
    assert.equal(r.ev.log[0], 'config pc-q35-9.2');
    assert.deepEqual(r.ev.config, Buffer.concat([new StreamBuilder().configuration('pc-q35-9.2').build(), subs]));
    assert.equal(r.ev.log[1], `cmd ${MIG_CMD_SWITCHOVER_START} `);
  });

  test('accepts a stream without a configuration record', () => {
    const r = rig({ expectVmdesc: false });
    assert.deepEqual(r.run(new StreamBuilder().fileHeader().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(2).eof().build()), ['eof']);
    assert.ok(!r.ev.log.some((l) => l.startsWith('config')));
  });

  test('holds at a barrier returned by onRamEos until it settles', async () => {
    const r = rig({ expectVmdesc: false });
    let release!: () => void;
    r.ev.eos = () => new Promise<void>((res) => { release = res; });
    const stream = prefix().sectionFull({ sectionId: 3, idstr: 'cpu', instanceId: 0, versionId: 12 }, Buffer.alloc(40, 1)).eof().build();
    assert.deepEqual(r.run(stream), ['held']);
    assert.ok(r.vm.held);
    assert.deepEqual(r.run(Buffer.alloc(0)), ['held']);
    assert.ok(!r.ev.log.some((l) => l.startsWith('device')), 'nothing after the EOS is parsed while held');
    release();
    await r.vm.held;
    assert.equal(r.vm.held, null);
    assert.deepEqual(r.run(Buffer.alloc(0)), ['eof']);
    assert.ok(r.ev.log.includes('device 3 cpu'));
  });

  test('holds at a barrier returned by onRamFlush, then reads the rest of the section', async () => {
    const r = rig({ expectVmdesc: false });
    let release!: () => void;
    r.ev.flush = () => new Promise<void>((res) => { release = res; });
    const stream = new StreamBuilder().fileHeader().configuration().sectionStart(RAM).ramMemSize(BLOCKS)
      .ramMultifdFlush().ramPage('pc.ram', 6 * P, pageBytes(6)).ramEos().footer(2).eof().build();
    assert.deepEqual(r.run(stream), ['held']);
    assert.ok(!r.vm.atBoundary);
    assert.deepEqual(Buffer.from(r.host.blocks.get('pc.ram')!.guest.page(6)), Buffer.alloc(P), 'the page after the flush waits for the barrier');
    release();
    await r.vm.held;
    assert.deepEqual(r.run(Buffer.alloc(0)), ['eof']);
    assert.deepEqual(Buffer.from(r.host.blocks.get('pc.ram')!.guest.page(6)), pageBytes(6));
    assert.deepEqual(r.ev.log.slice(-2), ['flush', 'eos 2']);
    assert.ok(r.vm.atBoundary);
  });

  test('reads a COLO checkpoint RAM part without a file header after beginRecords()', () => {
    const r = rig({ expectVmdesc: false });
    const sb = prefix();
    r.run(sb.eof().build());
    r.vm.beginRecords();
    assert.deepEqual(r.run(sb.sectionPart(2).ramPage('pc.ram', 5 * P, pageBytes(5)).ramEos().footer(2).eof().build()), ['eof']);
    assert.deepEqual(Buffer.from(r.host.blocks.get('pc.ram')!.guest.page(5)), pageBytes(5));
    assert.deepEqual(r.ev.log.slice(-2), [`section ${QEMU_VM_SECTION_PART} 2 ram 0 4`, 'eos 2']);
  });

  describe('footer scan of device sections', () => {
    const dev: BuilderHeader = { sectionId: 7, idstr: 'fw_cfg', instanceId: 0, versionId: 2 };
    const next: BuilderHeader = { sectionId: 8, idstr: 'PCIBUS', instanceId: 0, versionId: 1 };
    const nextBody = Buffer.from('00112233', 'hex');

    /** The device section with `body`, then another one, then EOF and VMDESCRIPTION: both must come back verbatim. */
    function check(body: Buffer, what: string): void {
      const stream = prefix().sectionFull(dev, body).sectionFull(next, nextBody).eof().vmdescription(VMDESC).build();
      for (const [how, feed] of [['whole', (r: Rig) => r.run(stream)], ['bytewise', (r: Rig) => runBytewise(r, stream)]] as const) {
        const r = rig();
        assert.deepEqual(feed(r).filter((x) => x !== 'blocked'), ['eof', 'vmdesc'], `${what} (${how})`);
        assert.deepEqual(r.ev.devices, [deviceBytes(dev, body), deviceBytes(next, nextBody)], `${what} (${how})`);
        assert.equal(r.vm.vmdesc?.toString(), VMDESC);
      }
    }

    test('finds the footer of a body without 0x7E bytes', () => {
      check(Buffer.alloc(300, 0x11), 'plain body');
    });

    test('finds the footer of an empty body', () => {
      check(Buffer.alloc(0), 'empty body');
    });

    test('skips fake 7E 00 00 00 <other id> sequences in a body', () => {
      check(Buffer.concat([fakeFooter(8), fullHeader(9, 'x'), fakeFooter(2), Buffer.from([0x02]), be32(2), fakeFooter(0x7e7e)]), 'other ids');
    });

    test('skips its own footer bytes followed by a byte that starts no record', () => {
      check(Buffer.concat([fakeFooter(7), Buffer.from([0x09, 0x7e]), fakeFooter(7), Buffer.from([0x05]), counted('sub'), be32(1)]), 'bad type byte');
    });

    test('skips its own footer bytes followed by a FULL header with an empty or unprintable idstr', () => {
      check(Buffer.concat([fakeFooter(7), fullHeader(9, ''), fakeFooter(7), fullHeader(9, 'ab\x01c')]), 'bad idstr');
    });

    test('skips its own footer bytes followed by a FULL header with a large id, instance or version', () => {
      check(Buffer.concat([fakeFooter(7), fullHeader(0x10000, 'x'), fakeFooter(7), fullHeader(9, 'x', 0x10000), fakeFooter(7), fullHeader(9, 'x', 0, 0x10000)]), 'large numbers');
    });

    test('skips its own footer bytes followed by a FULL header that reuses its own section id', () => {
      check(Buffer.concat([fakeFooter(7), fullHeader(7, 'fw_cfg')]), 'same id');
    });

    test('skips its own footer bytes followed by a FULL header that contradicts a known id/idstr pair', () => {
      check(Buffer.concat([fakeFooter(7), fullHeader(2, 'timer'), Buffer.alloc(3)]), 'known pair');
    });

    test('skips its own footer bytes followed by PART/END of a section that is not ram', () => {
      check(Buffer.concat([fakeFooter(7), Buffer.from([QEMU_VM_SECTION_PART]), be32(3), fakeFooter(7), Buffer.from([QEMU_VM_SECTION_END]), be32(0)]), 'PART/END');
    });

    test('skips its own footer bytes followed by an unknown or long command', () => {
      check(Buffer.concat([fakeFooter(7), Buffer.from([0x08, 0, 0, 0, 0]), fakeFooter(7), Buffer.from([0x08, 0, 12, 0, 0]), fakeFooter(7), Buffer.from([0x08, 0, 1, 0, 65])]), 'commands');
    });

    test('skips its own footer bytes followed by EOF without a VMDESCRIPTION', () => {
      check(Buffer.concat([fakeFooter(7), Buffer.from([0x00, 0x00, 0, 0, 0, 5, 0x7b]), fakeFooter(7), Buffer.from([0x00, 0x06, 0, 0, 0, 0, 0x7b]), fakeFooter(7), Buffer.from([0x00, 0x06, 0, 0, 0, 5, 0x20])]), 'eof');
    });

    test('skips fake footers that end the body', () => {
      check(Buffer.concat([Buffer.alloc(10, 0x7e), fakeFooter(7), fakeFooter(7)]), 'trailing');
    });

    test('finds the footers of two instances of one device', () => {
      const r = rig({ expectVmdesc: false });
      const a = { sectionId: 11, idstr: 'i8259', instanceId: 0, versionId: 1 };
      const b = { sectionId: 12, idstr: 'i8259', instanceId: 1, versionId: 1 };
      const stream = prefix().sectionFull(a, Buffer.alloc(24, 0x7e)).sectionFull(b, Buffer.alloc(24, 0x7e)).eof().build();
      assert.deepEqual(r.run(stream), ['eof']);
      assert.deepEqual(r.ev.devices, [deviceBytes(a, Buffer.alloc(24, 0x7e)), deviceBytes(b, Buffer.alloc(24, 0x7e))]);
    });

    test('accepts the last section before EOF without VMDESCRIPTION when none is expected', () => {
      const r = rig({ expectVmdesc: false });
      const stream = prefix().sectionFull(dev, Buffer.alloc(10, 3)).eof().build();
      assert.deepEqual(r.run(stream), ['eof']);
      assert.deepEqual(r.ev.devices, [deviceBytes(dev, Buffer.alloc(10, 3))]);
    });

    test('waits for the VMDESCRIPTION before accepting a footer followed by EOF', () => {
      const r = rig();
      const sb = prefix().sectionFull(dev, Buffer.alloc(10, 3)).eof();
      assert.deepEqual(r.run(sb.build()), ['blocked']);
      assert.deepEqual(r.ev.devices, []);
      assert.deepEqual(r.run(sb.vmdescription(VMDESC).build()), ['eof', 'vmdesc']);
      assert.equal(r.ev.devices.length, 1);
    });

    test('accepts a footer followed by a command or the ram section', () => {
      const r = rig({ expectVmdesc: false });
      const stream = prefix().sectionFull(dev, Buffer.alloc(5, 0x7e)).command(MIG_CMD_SWITCHOVER_START)
        .sectionFull(next, nextBody).sectionPart(2).ramEos().footer(2).eof().build();
      assert.deepEqual(r.run(stream), ['eof']);
      assert.deepEqual(r.ev.devices, [deviceBytes(dev, Buffer.alloc(5, 0x7e)), deviceBytes(next, nextBody)]);
    });

    test('rejects a device section without a footer within maxSectionBytes with ERR_LIMIT', () => {
      const r = rig({ limits: { maxSectionBytes: 1000 } });
      const pre = prefix().build();
      r.run(pre);
      const hdr = new StreamBuilder().sectionFull(dev, Buffer.alloc(0)).build().subarray(0, -5);
      r.run(hdr);
      r.run(Buffer.alloc(900, 0x7e));
      expectError(() => r.run(Buffer.alloc(200, 0x7e)), 'ERR_LIMIT');
    });

    test('rejects a live START section of a device other than ram with ERR_UNSUPPORTED', () => {
      const r = rig();
      expectError(() => r.run(prefix().sectionStart({ sectionId: 9, idstr: 'block', instanceId: 0, versionId: 1 }).build()), 'ERR_UNSUPPORTED');
    });
  });

  describe('bad input', () => {
    test('rejects a wrong file magic with ERR_BAD_MAGIC', () => {
      expectError(() => rig().run(Buffer.from('QEVN\0\0\0\x03', 'latin1')), 'ERR_BAD_MAGIC', 0);
    });

    test('rejects the obsolete stream version 2 with ERR_BAD_VERSION', () => {
      expectError(() => rig().run(Buffer.from('QEVM\0\0\0\x02', 'latin1')), 'ERR_BAD_VERSION', 4);
    });

    test('rejects stream version 4 with ERR_BAD_VERSION', () => {
      expectError(() => rig().run(Buffer.from('QEVM\0\0\0\x04', 'latin1')), 'ERR_BAD_VERSION', 4);
    });

    test('rejects a machine type name of 0 bytes with ERR_LIMIT', () => {
      const b = Buffer.concat([new StreamBuilder().fileHeader().build(), Buffer.from([0x07]), be32(0)]);
      expectError(() => rig().run(b), 'ERR_LIMIT', 9);
    });

    test('rejects a machine type name longer than 255 bytes with ERR_LIMIT before it arrives', () => {
      const b = Buffer.concat([new StreamBuilder().fileHeader().build(), Buffer.from([0x07]), be32(0x7fff_ffff)]);
      expectError(() => rig().run(b), 'ERR_LIMIT', 9);
    });

    test('rejects an unknown configuration subsection with ERR_UNSUPPORTED', () => {
      const b = new StreamBuilder().fileHeader().configuration().raw(subsection('configuration/foo', be32(0))).build();
      expectError(() => rig().run(b), 'ERR_UNSUPPORTED');
    });

    test('rejects more than 64 configuration capabilities with ERR_LIMIT', () => {
      const b = new StreamBuilder().fileHeader().configuration().raw(subsection('configuration/capabilities', be32(1000))).build();
      expectError(() => rig().run(b), 'ERR_LIMIT');
    });

    test('rejects an unknown record type with ERR_UNKNOWN_SECTION at its offset', () => {
      const pre = prefix().build();
      expectError(() => rig().run(Buffer.concat([pre, Buffer.from([0x09])])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects a subsection, footer or configuration at the top level with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().build();
      for (const t of [0x05, 0x7e, 0x07, 0x06]) expectError(() => rig().run(Buffer.concat([pre, Buffer.from([t, 0, 0, 0, 0, 0])])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects a ram section version 3 with ERR_BAD_VERSION', () => {
      const b = new StreamBuilder().fileHeader().sectionStart({ ...RAM, versionId: 3 }).build();
      expectError(() => rig().run(b), 'ERR_BAD_VERSION', 8);
    });

    test('rejects a ram FULL section with ERR_UNKNOWN_SECTION', () => {
      const b = new StreamBuilder().fileHeader().sectionFull(RAM, Buffer.alloc(0)).build();
      expectError(() => rig().run(b), 'ERR_UNKNOWN_SECTION', 8);
    });

    test('rejects a second ram START section with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().build();
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().sectionStart(RAM).build()])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects PART for an unknown section id with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().build();
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().sectionPart(3).build()])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects END before any ram START with ERR_UNKNOWN_SECTION', () => {
      expectError(() => rig().run(new StreamBuilder().fileHeader().configuration().sectionEnd(2).build()), 'ERR_UNKNOWN_SECTION');
    });

    test('rejects a missing section footer with ERR_UNKNOWN_SECTION', () => {
      const b = new StreamBuilder().fileHeader().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().eof().raw(Buffer.alloc(4)).build();
      expectError(() => rig().run(b), 'ERR_UNKNOWN_SECTION', b.length - 5);
    });

    test('rejects a mismatched section id in a footer with ERR_UNKNOWN_SECTION', () => {
      const b = new StreamBuilder().fileHeader().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(3).build();
      expectError(() => rig().run(b), 'ERR_UNKNOWN_SECTION', b.length - 5);
    });

    test('rejects a section id reused for another idstr with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().sectionFull({ sectionId: 5, idstr: 'apic', instanceId: 0, versionId: 3 }, Buffer.alloc(4)).build();
      const b = new StreamBuilder().sectionFull({ sectionId: 5, idstr: 'hpet', instanceId: 0, versionId: 3 }, Buffer.alloc(4)).build();
      // a command after the first section lets the footer scan accept its footer; the reuse comes next
      const r = rig();
      r.run(Buffer.concat([pre, new StreamBuilder().command(MIG_CMD_SWITCHOVER_START).build()]));
      expectError(() => r.run(b), 'ERR_UNKNOWN_SECTION', pre.length + 5);
    });

    test('rejects MIG_CMD 0 and MIG_CMD_MAX with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().build();
      for (const cmd of [0, 12, 0xffff]) expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().command(cmd).build()])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects postcopy commands with ERR_UNSUPPORTED', () => {
      const pre = prefix().build();
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().command(MIG_CMD_POSTCOPY_ADVISE, Buffer.alloc(16)).build()])), 'ERR_UNSUPPORTED', pre.length);
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().command(MIG_CMD_POSTCOPY_LISTEN).build()])), 'ERR_UNSUPPORTED', pre.length);
    });

    test('rejects a PING with a bad length with ERR_BAD_VERSION', () => {
      const pre = prefix().build();
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().command(MIG_CMD_PING, Buffer.alloc(2)).build()])), 'ERR_BAD_VERSION', pre.length);
      expectError(() => rig().run(Buffer.concat([pre, new StreamBuilder().command(MIG_CMD_ENABLE_COLO, Buffer.alloc(1)).build()])), 'ERR_BAD_VERSION', pre.length);
    });

    test('rejects a command longer than maxCommandBytes with ERR_LIMIT before its payload arrives', () => {
      const r = rig({ limits: { maxCommandBytes: 16 } });
      const pre = prefix().build();
      expectError(() => r.run(Buffer.concat([pre, Buffer.from([0x08, 0, 1, 0, 17])])), 'ERR_LIMIT', pre.length);
    });

    test('rejects a record other than VMDESCRIPTION after the final EOF with ERR_UNKNOWN_SECTION', () => {
      const pre = prefix().eof().build();
      expectError(() => rig().run(Buffer.concat([pre, Buffer.from([0x01, 0, 0, 0, 0])])), 'ERR_UNKNOWN_SECTION', pre.length);
    });

    test('rejects a VMDESCRIPTION above maxVmdescBytes with ERR_LIMIT before it arrives', () => {
      const r = rig({ limits: { maxVmdescBytes: 100 } });
      const pre = prefix().eof().build();
      expectError(() => r.run(Buffer.concat([pre, Buffer.from([0x06]), be32(101)])), 'ERR_LIMIT', pre.length);
    });

    test('stops at the first error and ignores later input', () => {
      const r = rig();
      const good = prefix().eof().vmdescription(VMDESC).build();
      expectError(() => r.run(Buffer.from('QEVM\0\0\0\x09', 'latin1')), 'ERR_BAD_VERSION');
      assert.deepEqual(r.run(good), ['blocked']);
      assert.deepEqual(r.ev.log, []);
    });

    test('stops at the first error inside a ram section and ignores later input', () => {
      const r = rig();
      const pre = new StreamBuilder().fileHeader().configuration().sectionStart(RAM).ramMemSize(BLOCKS).build();
      r.run(pre);
      const logged = r.ev.log.length;
      expectError(() => r.run(new StreamBuilder().ramPage('no.such.block', 0, pageBytes(1)).build()), 'ERR_UNKNOWN_RAMBLOCK');
      // bytes that would parse as records if the parser kept going
      const more = new StreamBuilder().ramPage('pc.ram', 0, pageBytes(1)).ramEos().footer(2).eof().vmdescription(VMDESC).build();
      assert.deepEqual(r.run(more), ['blocked']);
      assert.equal(r.ev.log.length, logged, 'no event after the error');
      assert.deepEqual(Buffer.from(r.host.blocks.get('pc.ram')!.guest.page(0)), Buffer.alloc(P), 'no write after the error');
    });

    test('stops at an error thrown by the sink and ignores later input', () => {
      const r = rig({ expectVmdesc: false });
      r.ev.onCommand = () => { throw new MigrationError('ERR_UNKNOWN_SECTION', 'PING without a return path', 'main', 0); };
      const pre = new StreamBuilder().fileHeader().configuration().build();
      r.run(pre);
      expectError(() => r.run(new StreamBuilder().command(MIG_CMD_PING, be32(1)).build()), 'ERR_UNKNOWN_SECTION');
      assert.deepEqual(r.run(new StreamBuilder().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(2).eof().build()), ['blocked']);
      assert.ok(!r.ev.log.some((l) => l.startsWith('section')));
    });
  });
});
