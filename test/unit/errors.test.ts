import assert from 'node:assert/strict';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { describe, test } from 'node:test';
import { hex, MigrationError, wireError, type MigrationErrorCode } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { WRITE_GUEST, runWriteTask } from '../../src/memory/page-writer.js';
import { RAMBlockList } from '../../src/memory/ram-block.js';
import { IncomingMigration, type IncomingOptions } from '../../src/migration/incoming.js';
import { DEFAULT_LIMITS } from '../../src/migration/limits.js';
import { MultiFDChannel, type ChannelSink } from '../../src/migration/multifd-channel.js';
import { RamSectionParser } from '../../src/migration/ram-section.js';
import { VmStateParser, type VmStateSink } from '../../src/migration/vmstate-stream.js';
import { listenForMigration } from '../../src/net/listener.js';
import { encodeMultiFDInit, encodeMultiFDPacketHeader } from '../../src/sender/multifd-builder.js';
import { StreamBuilder } from '../../src/sender/stream-builder.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';
import { COLO_MESSAGE_VMSTATE_SEND, MIG_CMD_POSTCOPY_ADVISE } from '../../src/wire/constants.js';

const P = 4096;
const RAM = { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 };
const BLOCKS = [{ idstr: 'pc.ram', usedLength: 4 * P }];

/**
 * Codes that bad bytes from a peer can raise (the rest come from timers, sockets and workers;
 * ERR_NBD and ERR_DISK come from the NBD channel: test/unit/nbd-server.test.ts).
 */
type WireCode = Exclude<MigrationErrorCode, 'ERR_DECOMPRESS' | 'ERR_TIMEOUT' | 'ERR_PEER' | 'ERR_WORKER' | 'ERR_NBD' | 'ERR_DISK'>;

interface Row {
  /** Channel the error must name. */
  channel: string;
  run(): MigrationError | Promise<MigrationError>;
}

// ---------------------------------------------------------------- main channel through VmStateParser

const noopSink: VmStateSink = {
  onConfiguration() {}, onCommand() {}, onSection() {}, onRamEos() {}, onRamFlush() {}, onDeviceSection() {},
};

function mainError(stream: Buffer): MigrationError {
  const blocks = new RAMBlockList();
  const ram = new RamSectionParser({
    onMemSize: (list) => { for (const b of list) blocks.add(b.idstr, b.usedLength); },
    findBlock: (n) => blocks.get(n),
    writeMode: () => WRITE_GUEST,
  }, DEFAULT_LIMITS);
  const q = new ByteQueue();
  const vm = new VmStateParser(q, noopSink, ram, DEFAULT_LIMITS);
  q.push(stream);
  try {
    vm.feed();
  } catch (e) {
    if (e instanceof MigrationError) return e;
    throw e;
  }
  assert.fail('the main channel parsed without an error');
}

function mainPrefix(): StreamBuilder {
  return new StreamBuilder().fileHeader().configuration().sectionStart(RAM).ramMemSize(BLOCKS);
}

// ---------------------------------------------------------------- multifd through MultiFDChannel

function multifdError(stream: Buffer, end = false): MigrationError {
  const blocks = new RAMBlockList();
  blocks.add('pc.ram', 4 * P);
  const errors: MigrationError[] = [];
  const sink: ChannelSink = {
    onHandshake() {}, findBlock: (n) => blocks.get(n), writeMode: () => WRITE_GUEST,
    submit: (_ch, task) => Promise.resolve(runWriteTask(task)),
    onSynced() {}, onBlocked() {}, onError: (e) => { errors.push(e); },
  };
  const ch = new MultiFDChannel(sink, 'none', DEFAULT_LIMITS);
  ch.push(stream);
  if (end) ch.end();
  assert.equal(errors.length, 1, 'exactly one error');
  return errors[0]!;
}

function packet(f: { ramblock?: string; pagesAlloc?: number; offsets?: number[] } = {}): Buffer {
  const offsets = f.offsets ?? [0];
  return Buffer.concat([
    encodeMultiFDPacketHeader({ flags: 0, pagesAlloc: f.pagesAlloc ?? 128, normalPages: offsets.length, nextPacketSize: offsets.length * P, packetNum: 1, ramblock: f.ramblock ?? 'pc.ram', offsets }),
    Buffer.alloc(offsets.length * P, 0x5a),
  ]);
}

// ---------------------------------------------------------------- whole migrations through IncomingMigration

/** Runs one incoming migration on 127.0.0.1, lets `drive` connect, and returns the error it failed with. */
async function incomingError(opts: IncomingOptions, drive: (port: number, open: (bytes: Buffer) => Socket) => void): Promise<MigrationError> {
  const mig = new IncomingMigration({ threads: 1, log: silentLogger, expectVmdesc: false, ...opts });
  const server = await listenForMigration(mig, { log: silentLogger });
  const port = (server.address() as AddressInfo).port;
  const socks: Socket[] = [];
  const open = (bytes: Buffer): Socket => {
    const s = connect(port, '127.0.0.1');
    s.on('error', () => undefined);   // the receiver resets connections when it fails
    s.on('data', () => undefined);    // replies (CHECKPOINT_READY) are not read here
    s.write(bytes);
    socks.push(s);
    return s;
  };
  try {
    drive(port, open);
    const outcome = await mig.done;
    assert.notEqual(outcome.kind, 'completed');
    assert.ok('error' in outcome && outcome.error instanceof MigrationError, `outcome ${outcome.kind} without an error`);
    return outcome.error!;
  } finally {
    for (const s of socks) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
    await mig.close();
  }
}

function be32(n: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(n, 0); return b; }

// ---------------------------------------------------------------- the table

const ROWS: Record<WireCode, Row> = {
  // A connection with an unknown magic is dropped by the listener without failing anything
  // (test/unit/listener.test.ts); inside an identified channel a bad magic is an error.
  ERR_BAD_MAGIC: {
    channel: 'multifd/1',
    run: () => { const p = packet({}); p.writeUInt32BE(0x11223345, 0); return multifdError(Buffer.concat([encodeMultiFDInit({ id: 1 }), p])); },
  },
  ERR_BAD_VERSION: {
    channel: 'multifd/?',
    run: () => { const b = encodeMultiFDInit({ id: 0 }); b.writeUInt32BE(2, 4); return multifdError(b); },
  },
  ERR_UNKNOWN_SECTION: {
    channel: 'main',
    run: () => mainError(Buffer.concat([mainPrefix().ramEos().footer(2).build(), Buffer.from([0x09])])),
  },
  ERR_UNKNOWN_RAMBLOCK: {
    channel: 'multifd/1',
    run: () => multifdError(Buffer.concat([encodeMultiFDInit({ id: 1 }), packet({ ramblock: 'pc.ram0' })])),
  },
  ERR_RANGE: {
    channel: 'main',
    run: () => mainError(mainPrefix().ramPage('pc.ram', 4 * P, Buffer.alloc(P)).build()),
  },
  ERR_LIMIT: {
    channel: 'multifd/0',
    run: () => multifdError(Buffer.concat([encodeMultiFDInit({ id: 0 }), packet({ pagesAlloc: 129 })])),
  },
  ERR_TRUNCATED: {
    channel: 'multifd/0',
    run: () => multifdError(Buffer.concat([encodeMultiFDInit({ id: 0 }), packet().subarray(0, 1344 + 100)]), true),
  },
  ERR_UNSUPPORTED: {
    channel: 'main',
    run: () => mainError(mainPrefix().ramEos().footer(2).command(MIG_CMD_POSTCOPY_ADVISE, Buffer.alloc(16)).build()),
  },
  ERR_HANDSHAKE: {
    channel: 'multifd/2',
    // two channels configured: ids 0 and 1 only
    run: () => incomingError({ multifdChannels: 2 }, (_port, open) => { open(encodeMultiFDInit({ id: 2 })); }),
  },
  ERR_SYNC: {
    channel: 'main',
    // an EOS barrier selected the per-section scheme; a MULTIFD_FLUSH cannot follow
    run: () => incomingError({ multifdChannels: 0 }, (_port, open) => {
      open(mainPrefix().ramEos().footer(2).sectionPart(2).ramMultifdFlush().ramEos().footer(2).build());
    }),
  },
  ERR_COLO_PROTOCOL: {
    channel: 'main',
    // after CHECKPOINT_READY the secondary expects CHECKPOINT_REQUEST, not VMSTATE_SEND
    run: () => incomingError({ multifdChannels: 0 }, (_port, open) => {
      open(Buffer.concat([
        new StreamBuilder().fileHeader().configuration().enableColo().sectionStart(RAM).ramMemSize(BLOCKS).ramEos().footer(2).eof().build(),
        be32(COLO_MESSAGE_VMSTATE_SEND),
      ]));
    }),
  },
};

describe('MigrationError codes raised by bad bytes', () => {
  for (const [code, row] of Object.entries(ROWS) as [WireCode, Row][]) {
    test(`raises ${code} on ${row.channel}`, async () => {
      const err = await row.run();
      assert.ok(err instanceof MigrationError);
      assert.equal(err.name, 'MigrationError');
      assert.equal(err.code, code);
      assert.equal(err.channel, row.channel);
      assert.equal(typeof err.streamOffset, 'number');
      assert.ok(Number.isInteger(err.streamOffset) && err.streamOffset! >= 0);
    });
  }
});

describe('MigrationError', () => {
  test('is an Error with its code, channel, offset and cause', () => {
    const cause = new Error('inner');
    const e = new MigrationError('ERR_WORKER', 'multifd 3: page writer failed', 'multifd/3', 4096, { cause });
    assert.ok(e instanceof Error);
    assert.equal(e.name, 'MigrationError');
    assert.equal(e.code, 'ERR_WORKER');
    assert.equal(e.channel, 'multifd/3');
    assert.equal(e.streamOffset, 4096);
    assert.equal(e.cause, cause);
  });

  test('wireError builds a MigrationError without a cause', () => {
    const e = wireError('ERR_RANGE', 'offset too long', 'main', 12);
    assert.ok(e instanceof MigrationError);
    assert.equal(e.code, 'ERR_RANGE');
    assert.equal(e.channel, 'main');
    assert.equal(e.streamOffset, 12);
    assert.equal(e.cause, undefined);
  });

  test('hex pads to the given width', () => {
    assert.equal(hex(0x11223344), '11223344');
    assert.equal(hex(0x2, 2), '02');
    assert.equal(hex(0x7e), '0000007e');
  });
});
