// Mutation fuzzing of whole incoming migrations (issue "Hardening"), shared by
// test/property/fuzz.test.ts and bench/fuzz.ts.
//
// Seeds are recorded sessions: real QEMU 7.2 captures (test/fixtures/captures, see its README)
// and SyntheticSource sessions recorded here through the same kind of proxy. A recording keeps,
// per connection, the bytes the source sent and "gates": from which offset on the source had
// seen how many reply bytes on the main connection (a COLO primary sends a checkpoint's RAM part
// only after CHECKPOINT_REPLY). A case mutates the streams (byte flips, truncations, packet
// duplication/reordering, oversize length fields, wrong magic/version, unknown blocks, offsets at
// and past a block's end, stale 7.2 fields) and replays them in memory into a fresh
// IncomingMigration over Duplex transports, honouring the gates: bytes behind a gate are held
// until the receiver has written that many reply bytes, as the real primary would wait.
//
// Each case must end, before a hard deadline, in success or in exactly one MigrationError that
// is not an internal one (ERR_WORKER wraps TypeError/RangeError/assert or a failed page write);
// guest memory must hold only what the stream could legitimately have written (checked page by
// page against the reference image of an unmutated replay); and when the damage lies inside
// COLO checkpoint c and the session ends there, the committed image must be checkpoint c-1
// exactly, memory and device state.

import { imageBlockBytes } from '../../src/memory/ram-block.js';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import net from 'node:net';
import { Duplex } from 'node:stream';
import { gunzipSync } from 'node:zlib';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { MigrationError, type MigrationErrorCode } from '../../src/errors.js';
import { silentLogger } from '../../src/log.js';
import { IncomingMigration, type Outcome } from '../../src/migration/incoming.js';
import { DEFAULT_LIMITS, type Limits } from '../../src/migration/limits.js';
import type { Compression } from '../../src/migration/multifd-packet.js';
import { listenForMigration } from '../../src/net/listener.js';
import type { PagePool } from '../../src/pool/page-pool.js';
import { Prng } from '../../src/sender/prng.js';
import { ZlibEncoder, ZstdEncoder } from '../../src/sender/multifd-compress.js';
import { SyntheticSource, type SyntheticSourceOptions } from '../../src/sender/source.js';
import {
  COLO_MESSAGE_CHECKPOINT_REQUEST, COLO_MESSAGE_VMSTATE_SEND, COLO_MESSAGE_VMSTATE_SIZE, MULTIFD_FLAG_DEVICE_STATE,
  MULTIFD_FLAG_SYNC, MULTIFD_FLAG_ZLIB, MULTIFD_FLAG_ZSTD, MULTIFD_INIT_LEN, MULTIFD_MAGIC, MULTIFD_PACKET_HEADER_LEN, QEMU_VM_FILE_MAGIC,
  RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO, TARGET_PAGE_SIZE,
} from '../../src/wire/constants.js';

const P = TARGET_PAGE_SIZE;
const TWO_32 = 2 ** 32;
export const PROJECT_ROOT = new URL('../../../', import.meta.url).pathname;
export const CAPTURES_DIR = `${PROJECT_ROOT}test/fixtures/captures`;
export const CAPTURES_QEMU10_DIR = `${PROJECT_ROOT}test/fixtures/captures-qemu10`;

/** Caps for fuzzing: small enough that a mutated length cannot make a case allocate gigabytes. */
export const FUZZ_LIMITS: Limits = {
  ...DEFAULT_LIMITS,
  maxRamBytes: 256 * 2 ** 20,
  maxBlobBytes: 8 * 2 ** 20,
  maxSectionBytes: 4 * 2 ** 20,
  maxVmdescBytes: 1 * 2 ** 20,
};

// ------------------------------------------------------------------------------------------
// seeds

/** One recorded connection: what the source sent, and from where on it had seen how many reply bytes. */
export interface SeedConn {
  role: string;                      // 'main' | 'multifd-<id>'
  data: Buffer;
  gates: Array<[at: number, replies: number]>;
}

/** The VM at a committed checkpoint: per block a base image plus the pages that differ from it. */
export interface Image {
  blocks: Map<string, { usedLength: number; base: Buffer; patch: Map<number, Buffer> }>;
  device: Buffer;
}

export interface Seed {
  name: string;
  origin: 'capture' | 'synthetic';
  layout: '7.2' | '10.x';
  colo: boolean;
  channels: number;
  compression: Compression;
  conns: SeedConn[];
  /** Reply bytes the source had seen when it closed its connections. */
  eofGate: number;
  /** Every page is sent at most once with its final contents (a paused source): a partly received image is "final or zero". */
  pagesOnce: boolean;
  /** Relative share of fuzz cases. */
  weight: number;
  /**
   * Replay timing. Guests of 32 MiB cost a page fault per fresh 4 KiB page (~16 us on these
   * hosts): one 64 KiB chunk of zero-page records blocks the event loop for ~0.2-0.4 s, and
   * with several cases in one process a timer of another case would fire in that shadow. So
   * big seeds get smaller chunks and longer timeouts.
   */
  ioTimeoutMs: number;
  heartbeatTimeoutMs: number;
  maxChunk: number;
  /** Model memory per committed checkpoint, for synthetic seeds (checks the replayer itself). */
  model?: Map<number, Map<string, Buffer>>;
  // filled by calibrate()
  ref?: Reference;
  struct?: Structure;
}

export interface Reference {
  outcome: { kind: Outcome['kind']; code: string | null };
  committed: number;
  images: Map<number, Image>;
  blockList: { idstr: string; usedLength: number }[];
  ms: number;
}

function readMaybeGz(path: string): Buffer {
  const b = readFileSync(path);
  return path.endsWith('.gz') ? gunzipSync(b) : b;
}

/** Seeds from test/fixtures/captures[-qemu10]/<name>/index.json (written by scripts/capture.mjs). */
export function loadCaptures(dir = CAPTURES_DIR, layout: '7.2' | '10.x' = '7.2'): Seed[] {
  if (!existsSync(dir)) return [];
  const out: Seed[] = [];
  for (const name of readdirSync(dir).sort()) {
    const idx = `${dir}/${name}/index.json`;
    if (!existsSync(idx)) continue;
    const meta = JSON.parse(readFileSync(idx, 'utf8')) as {
      kind: string; multifdChannels: number; colo: boolean;
      connections: { role: string; file: string; bytes: number; gates: [number, number][]; replies?: { bytes: number } }[];
    };
    const conns = meta.connections.map((c) => {
      const data = readMaybeGz(`${dir}/${name}/${c.file}`);
      assert.equal(data.length, c.bytes, `${name}/${c.file}: size`);
      return { role: c.role, data, gates: c.gates };
    });
    const main = meta.connections.find((c) => c.role === 'main');
    out.push({
      name: `capture${layout === '7.2' ? '' : '-qemu10'}/${name}`, origin: 'capture', layout, colo: meta.colo, channels: meta.multifdChannels, compression: 'none',
      conns, eofGate: main?.replies?.bytes ?? 0, pagesOnce: meta.kind === 'precopy', weight: 0.2,
      ioTimeoutMs: 1000, heartbeatTimeoutMs: 2000, maxChunk: 4096,
    });
  }
  return out;
}

/** Bytes of one proxied connection, with gates. */
class RecordedConn {
  readonly chunks: Buffer[] = [];
  bytes = 0;
  readonly gates: Array<[number, number]> = [];
  role(): string {
    const h = Buffer.concat(this.chunks.slice(0, 4));
    if (h.length < 4) return 'unknown';
    const m = h.readUInt32BE(0);
    return m === QEMU_VM_FILE_MAGIC ? 'main' : m === MULTIFD_MAGIC && h.length > 24 ? `multifd-${h[24]}` : 'unknown';
  }
}

/**
 * A recording proxy 127.0.0.1:<port> -> 127.0.0.1:<upstream>, as scripts/capture.mjs uses for
 * real QEMU: each connection's source bytes with the main connection's reply bytes seen before.
 */
export async function startRecordingProxy(upstream: number): Promise<{ port: number; conns: RecordedConn[]; replies: () => number; close: () => void }> {
  const conns: RecordedConn[] = [];
  let mainReplies = 0;
  const server = net.createServer((client) => {
    const rec = new RecordedConn();
    conns.push(rec);
    const up = net.connect(upstream, '127.0.0.1');
    client.setNoDelay(true);
    up.setNoDelay(true);
    client.on('data', (c: Buffer) => {
      const last = rec.gates[rec.gates.length - 1];
      if (!last || last[1] !== mainReplies) rec.gates.push([rec.bytes, mainReplies]);
      rec.chunks.push(Buffer.from(c));
      rec.bytes += c.length;
      up.write(c);
    });
    up.on('data', (c: Buffer) => {
      if (rec.role() === 'main') mainReplies += c.length;
      client.write(c);
    });
    client.on('end', () => up.end());
    up.on('end', () => client.end());
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
    client.on('close', () => up.destroy());
    up.on('close', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  return { port: (server.address() as net.AddressInfo).port, conns, replies: () => mainReplies, close: () => server.close() };
}

export interface SyntheticSeedSpec {
  name: string;
  source: Omit<SyntheticSourceOptions, 'port'>;
  compression?: Compression;
  pagesOnce: boolean;
  weight?: number;
}

// Small, because every page a case writes costs a page fault in fresh memory (~16 us here).
const SMALL_BLOCKS = [
  { idstr: 'pc.ram', usedLength: 512 * 1024, writable: true },
  { idstr: '0000:00:02.0/vga.vram', usedLength: 128 * 1024, writable: true },
  { idstr: 'pc.bios', usedLength: 64 * 1024, writable: false },
  { idstr: '/rom@etc/acpi/rsdp', usedLength: 4096, writable: false },
];

/** The synthetic part of the corpus: 7.2 and 10.x, plain and multifd, precopy and COLO. */
export function syntheticSpecs(): SyntheticSeedSpec[] {
  const memory = { blocks: SMALL_BLOCKS };
  const colo = { colo: true, checkpoints: 3, workload: { pages: 48 } } as const;
  return [
    { name: 'syn/7.2-plain-precopy', source: { layout: '7.2', channels: 0, seed: 11, memory }, pagesOnce: true },
    { name: 'syn/7.2-mfd2-precopy', source: { layout: '7.2', channels: 2, seed: 12, memory }, pagesOnce: true },
    { name: 'syn/10.x-plain-precopy', source: { layout: '10.x', channels: 0, seed: 13, memory }, pagesOnce: true },
    { name: 'syn/10.x-mfd3-precopy', source: { layout: '10.x', channels: 3, seed: 14, memory }, pagesOnce: true },
    { name: 'syn/7.2-mfd2-precopy-dirty', source: { layout: '7.2', channels: 2, seed: 15, memory, iterations: 3, precopyWorkload: { pages: 40 } }, pagesOnce: false },
    { name: 'syn/7.2-plain-colo', source: { layout: '7.2', channels: 0, seed: 16, memory, ...colo }, pagesOnce: true, weight: 1.5 },
    { name: 'syn/7.2-mfd2-colo', source: { layout: '7.2', channels: 2, seed: 17, memory, ...colo }, pagesOnce: true, weight: 1.5 },
    { name: 'syn/10.x-mfd2-colo', source: { layout: '10.x', channels: 2, seed: 18, memory, ...colo }, pagesOnce: true, weight: 1.5 },
    { name: 'syn/10.x-plain-colo', source: { layout: '10.x', channels: 0, seed: 19, memory, ...colo }, pagesOnce: true },
    // compressed multifd: one decoder thread per channel and case, so fewer of them
    { name: 'syn/7.2-mfd2-zlib-precopy', source: { layout: '7.2', channels: 2, seed: 20, memory, encoders: () => new ZlibEncoder() }, compression: 'zlib', pagesOnce: true, weight: 0.5 },
    { name: 'syn/10.x-mfd2-zstd-colo', source: { layout: '10.x', channels: 2, seed: 21, memory, encoders: () => new ZstdEncoder(), ...colo }, compression: 'zstd', pagesOnce: true, weight: 0.5 },
  ];
}

/** Records a SyntheticSource session through the proxy into a real receiver on loopback. */
export async function recordSynthetic(spec: SyntheticSeedSpec, pool: PagePool): Promise<Seed> {
  const channels = spec.source.channels ?? 0;
  const mig = new IncomingMigration({ pool, log: silentLogger, multifdChannels: channels, heartbeatTimeoutMs: 0, ioTimeoutMs: 30_000, compression: spec.compression ?? 'none' });
  const server = await listenForMigration(mig, { port: 0, log: silentLogger });
  const proxy = await startRecordingProxy((server.address() as net.AddressInfo).port);
  const model = new Map<number, Map<string, Buffer>>();
  try {
    const src: SyntheticSource = new SyntheticSource({
      ...spec.source, port: proxy.port,
      onBeforeCheckpoint: (i) => { if (i === 0) model.set(0, new Map(src.model.blocks.map((b) => [b.idstr, Buffer.from(b.host)]))); },
      onCheckpoint: (info) => { model.set(info.index + 1, new Map(info.model.blocks.map((b) => [b.idstr, Buffer.from(b.host)]))); },
    });
    const res = await src.run();
    if (!spec.source.colo) model.set(0, new Map(src.model.blocks.map((b) => [b.idstr, Buffer.from(b.host)])));
    const o = await mig.done;
    assert.equal(res.killed, false);
    assert.equal(o.kind, spec.source.colo ? 'primary-lost' : 'completed', `${spec.name}: recording run ended ${JSON.stringify(o)}`);
    // let the proxy see the last bytes and EOFs
    for (let i = 0; i < 50 && proxy.conns.reduce((s, c) => s + c.bytes, 0) < res.bytesSent; i++) await new Promise((r) => setTimeout(r, 10));
    const conns = proxy.conns.filter((c) => c.role() !== 'unknown').map((c) => ({ role: c.role(), data: Buffer.concat(c.chunks), gates: c.gates }));
    conns.sort((a, b) => (a.role === 'main' ? -1 : b.role === 'main' ? 1 : a.role.localeCompare(b.role, 'en', { numeric: true })));
    return {
      name: spec.name, origin: 'synthetic', layout: spec.source.layout ?? '7.2', colo: spec.source.colo ?? false, channels, compression: spec.compression ?? 'none',
      conns, eofGate: proxy.replies(), pagesOnce: spec.pagesOnce, weight: spec.weight ?? 1, model,
      // compressed channels start a decoder thread each, per case: on a loaded host that alone
      // can take longer than a short io timeout (the barrier waits for the decoded pages)
      ...(spec.compression && spec.compression !== 'none'
        ? { ioTimeoutMs: 2000, heartbeatTimeoutMs: 3000 }
        : { ioTimeoutMs: DEFAULT_REPLAY.ioTimeoutMs, heartbeatTimeoutMs: DEFAULT_REPLAY.heartbeatTimeoutMs }),
      maxChunk: 65536,
    };
  } finally {
    proxy.close();
    server.close();
    await mig.close().catch(() => undefined);
  }
}

// ------------------------------------------------------------------------------------------
// in-memory transport and replay

/**
 * A Duplex standing in for a net.Socket. Readable side: what the source sends (push()).
 * Writable side: the receiver's replies, counted. setTimeout() follows net.Socket: one idle
 * timer, refreshed by every delivered chunk and every write, and the callback is a `once`
 * listener of 'timeout' (as net.Socket registers it).
 */
export class MemTransport extends Duplex {
  replyBytes = 0;
  readonly replies: Buffer[] = [];
  #ms = 0;
  #timer: NodeJS.Timeout | null = null;
  constructor(private readonly onReply: () => void) {
    super({ allowHalfOpen: true, readableHighWaterMark: 1 << 20 });
  }
  override _read(): void { /* data is pushed by the feeder */ }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.replyBytes += chunk.length;
    if (this.replies.length < 64) this.replies.push(Buffer.from(chunk));
    this.#touch();
    cb();
    this.onReply();
  }
  override _final(cb: (e?: Error | null) => void): void { cb(); }
  override _destroy(err: Error | null, cb: (e?: Error | null) => void): void {
    if (this.#timer) clearTimeout(this.#timer);
    this.#timer = null;
    cb(err);
  }
  override emit(ev: string | symbol, ...args: unknown[]): boolean {
    if (ev === 'data') this.#touch();
    return super.emit(ev, ...args);
  }
  setTimeout(ms: number, cb?: () => void): this {
    this.#ms = ms;
    if (cb) this.once('timeout', cb);
    if (ms === 0) { if (this.#timer) clearTimeout(this.#timer); this.#timer = null; } else this.#touch();
    return this;
  }
  setNoDelay(): this { return this; }
  #touch(): void {
    if (this.#ms <= 0 || this.destroyed) return;
    if (this.#timer) this.#timer.refresh();
    else {
      this.#timer = setTimeout(() => {
        if (this.destroyed) return;
        this.timeouts++;
        if (this.isPaused()) this.pausedTimeouts++;
        this.emit('timeout');
      }, this.#ms);
    }
  }
  /** Socket timeouts, and those that fired while the receiver itself had paused the socket. */
  timeouts = 0;
  pausedTimeouts = 0;
}

/** A connection as a case feeds it. */
export interface CaseConn {
  role: string;
  data: Buffer;
  gates: Array<[number, number]>;
  /** Bytes delivered before the connection stops (data.length: all). */
  cut: number;
  /** What happens after the last byte: EOF, or nothing at all (a silent, half-dead peer). */
  end: 'eof' | 'silent';
}

export interface ReplayOptions {
  pool: PagePool;
  /** --multifd-channels; undefined: learnt at the first barrier. */
  channels: number | undefined;
  compression?: Compression;
  ioTimeoutMs: number;
  heartbeatTimeoutMs: number;
  deadlineMs: number;
  limits?: Partial<Limits>;
  expectUuid?: string;
  /** Chunk sizes of delivery; default 64 KiB. */
  chunk?: (left: number) => number;
  /** Attach multifd connections before the main one. */
  multifdFirst?: boolean;
  eofGate: number;
  /** Called on each 'checkpoint' event (calibration keeps images here). */
  onCheckpoint?: (mig: IncomingMigration, index: number) => void;
}

/** A connection at the moment the migration ended. */
export interface ConnAtEnd { role: string; undelivered: number; buffered: number; paused: boolean; timeouts: number; pausedTimeouts: number }

/** A multifd channel of the receiver at that moment. */
export interface ChannelAtEnd { name: string; waitingForPeer: boolean; synced: boolean; queued: number }

export interface ReplayResult {
  outcome: Outcome | null;
  /** Connections and channels when the migration ended (or at the deadline of a hang). */
  atEnd: ConnAtEnd[];
  channelsAtEnd: ChannelAtEnd[];
  /** 'end' events seen (must be 1 once settled). */
  ends: number;
  hang: boolean;
  /** The main connection was never attached (refused by the listener rules): no migration started. */
  noMigration: boolean;
  committed: number;
  image: Awaited<ReturnType<IncomingMigration['committedImage']>>;
  mig: IncomingMigration;
  ms: number;
}

/** The listener's classification of a connection by its first 4 bytes (src/net/listener.ts). */
function classify(c: CaseConn): 'main' | 'multifd' | 'bad' | 'short' {
  const n = Math.min(c.cut, c.data.length);
  if (n < 4) return 'short';
  const m = c.data.readUInt32BE(0);
  return m === QEMU_VM_FILE_MAGIC ? 'main' : m === MULTIFD_MAGIC ? 'multifd' : 'bad';
}

/** Replays connections into a fresh IncomingMigration, gated on the receiver's replies. */
export async function replay(conns: CaseConn[], o: ReplayOptions): Promise<ReplayResult> {
  const t0 = performance.now();
  const mig = new IncomingMigration({
    pool: o.pool, log: silentLogger, multifdChannels: o.channels, ioTimeoutMs: o.ioTimeoutMs,
    heartbeatTimeoutMs: o.heartbeatTimeoutMs, limits: o.limits ?? FUZZ_LIMITS, slotsPerChannel: 2,
    ...(o.compression ? { compression: o.compression } : {}),
    ...(o.expectUuid ? { expectUuid: o.expectUuid } : {}),
  });
  let ends = 0;
  let atEnd: ConnAtEnd[] = [];
  let channelsAtEnd: ChannelAtEnd[] = [];
  const snapshot = (): void => {
    atEnd = feeders.map((f) => ({
      role: f.c.role, undelivered: Math.max(0, Math.min(f.c.cut, f.c.data.length) - f.pos), buffered: f.t.readableLength,
      paused: f.t.isPaused(), timeouts: f.t.timeouts, pausedTimeouts: f.t.pausedTimeouts,
    }));
    channelsAtEnd = mig.channels.map((ch) => ({ name: ch.name, waitingForPeer: ch.waitingForPeer, synced: ch.synced, queued: ch.q.length }));
  };
  mig.on('end', () => { if (++ends === 1) snapshot(); });
  if (o.onCheckpoint) mig.on('checkpoint', (e: { index: number }) => o.onCheckpoint!(mig, e.index));
  let settled = false;
  void mig.done.then(() => { settled = true; wake(); });

  let kick: (() => void) | null = null;
  let scheduled = false;
  function wake(): void {
    if (scheduled) return;
    scheduled = true;
    setImmediate(() => { scheduled = false; kick?.(); });
  }
  let main: MemTransport | null = null;
  const feeders = conns.map((c) => ({ c, t: new MemTransport(wake), pos: 0, ended: false, attached: false }));
  const replies = () => main?.replyBytes ?? 0;
  const chunk = o.chunk ?? (() => 65536);
  const order = o.multifdFirst ? [...feeders.slice(1), feeders[0]!] : feeders;
  let mainAttached = false;
  let attachedAll = false;

  function attach(): void {
    for (const f of order) {
      const kind = classify(f.c);
      if (kind === 'short') continue;          // the listener waits for 4 bytes (or drops it at EOF)
      f.attached = true;
      f.t.pause();                              // the listener hands sockets over paused; the channel resumes it
      if (kind === 'main') {
        if (f.c.role === 'main') main = f.t;
        const ok = mig.attachMain(f.t, Buffer.alloc(0));
        if (!ok) { f.t.destroy(); f.attached = false; } else mainAttached = true;
      } else if (kind === 'multifd') {
        if (!mig.attachMultifd(f.t, Buffer.alloc(0))) { f.t.destroy(); f.attached = false; }
      } else {
        f.t.destroy();
        f.attached = false;
        mig.badConnection(new MigrationError('ERR_BAD_MAGIC', `unknown channel magic 0x${f.c.data.readUInt32BE(0).toString(16)} from ${f.c.role}`, `unclassified ${f.c.role}`, 0));
      }
    }
    attachedAll = true;
  }

  function step(): void {
    if (settled) return;
    let progressed = false;
    for (const f of feeders) {
      if (!f.attached || f.t.destroyed || f.ended) continue;
      let lim = Math.min(f.c.cut, f.c.data.length);
      for (const [at, r] of f.c.gates) if (r > replies()) { lim = Math.min(lim, at); break; }
      if (f.pos < lim) {
        const n = Math.max(1, Math.min(lim - f.pos, chunk(lim - f.pos)));
        f.t.push(f.c.data.subarray(f.pos, f.pos + n));
        f.pos += n;
        progressed = true;
      } else if (f.pos >= Math.min(f.c.cut, f.c.data.length) && f.c.end === 'eof') {
        // The EOF travels like a byte at offset `cut`: behind that offset's gate, and after the
        // last gate of a complete recording (the source closed when it had seen every reply).
        const cut = Math.min(f.c.cut, f.c.data.length);
        const gated = f.c.gates.some(([at, r]) => at <= cut && r > replies());
        const full = f.c.cut >= f.c.data.length;
        if (!gated && (!full || replies() >= o.eofGate)) { f.t.push(null); f.ended = true; progressed = true; }
      }
    }
    if (progressed) wake();
  }
  kick = step;
  attach();
  wake();

  // No main connection: nothing can start; the receiver waits for one, by design.
  let hang = false;
  let noMigration = false;
  const deadline = new Promise<'deadline'>((r) => { const t = setTimeout(() => r('deadline'), o.deadlineMs); mig.done.finally(() => clearTimeout(t)); });
  if (!mainAttached) {
    const r = await Promise.race([mig.done, new Promise<'idle'>((res) => setTimeout(() => res('idle'), 50))]);
    if (r === 'idle') noMigration = true;
  }
  if (!noMigration) {
    const r = await Promise.race([mig.done, deadline]);
    if (r === 'deadline') { hang = true; snapshot(); }
  }
  void attachedAll;
  kick = null;
  let outcome: Outcome | null = null;
  if (!hang && !noMigration) outcome = await mig.done;
  const committed = mig.committedCheckpoint;
  let image: ReplayResult['image'] = null;
  if (!hang) image = await Promise.race([mig.committedImage(), new Promise<null>((r) => setTimeout(() => r(null), 2000))]);
  const ms = performance.now() - t0;
  // Tear down; a hung receiver must not hang the fuzzer as well.
  await Promise.race([mig.close().catch(() => undefined), new Promise((r) => setTimeout(r, 2000))]);
  for (const f of feeders) f.t.destroy();
  return { outcome, atEnd, channelsAtEnd, ends, hang, noMigration, committed, image, mig, ms };
}

/**
 * Event-loop lag, sampled every 20 ms: every case of a campaign shares one loop, and on a
 * loaded 2-core host a timer can fire late by more than a timeout. A timeout that fired while
 * the loop lagged by half the timeout or more says nothing about the receiver.
 */
class LagMonitor {
  #last = performance.now();
  #samples: Array<[number, number]> = [];      // [time, lag]
  #timer: NodeJS.Timeout | null = null;
  #users = 0;
  start(): void {
    if (this.#users++ > 0) return;
    this.#last = performance.now();
    this.#timer = setInterval(() => {
      const now = performance.now();
      this.#samples.push([now, now - this.#last - 20]);
      if (this.#samples.length > 4096) this.#samples.splice(0, 2048);
      this.#last = now;
    }, 20);
    this.#timer.unref();
  }
  stop(): void { if (--this.#users === 0 && this.#timer) { clearInterval(this.#timer); this.#timer = null; } }
  /** Largest lag seen since t0 (including now). */
  maxSince(t0: number): number {
    let m = performance.now() - this.#last - 20;
    for (let i = this.#samples.length - 1; i >= 0 && this.#samples[i]![0] >= t0; i--) m = Math.max(m, this.#samples[i]![1]);
    return m;
  }
}
export const lag = new LagMonitor();

// ------------------------------------------------------------------------------------------
// images

function snapshotMemory(mig: IncomingMigration): Map<string, Buffer> {
  return new Map(mig.blocks.blocks.map((b) => [b.idstr, Buffer.from(b.denseCopy())]));
}

/** Image with `mem` stored as pages differing from `base` (full copies for the first one). */
function makeImage(mem: Map<string, Buffer>, device: Buffer, base: Image | undefined): Image {
  const blocks: Image['blocks'] = new Map();
  for (const [idstr, buf] of mem) {
    const b = base?.blocks.get(idstr);
    if (!b || b.usedLength !== buf.length) { blocks.set(idstr, { usedLength: buf.length, base: buf, patch: new Map() }); continue; }
    const patch = new Map<number, Buffer>();
    for (let p = 0; p < buf.length / P; p++) {
      const a = p * P;
      const want = b.patch.get(p) ?? b.base.subarray(a, a + P);
      if (buf.compare(want, 0, P, a, a + P) !== 0) patch.set(p, Buffer.from(buf.subarray(a, a + P)));
      else if (b.patch.has(p)) patch.set(p, b.patch.get(p)!);
    }
    blocks.set(idstr, { usedLength: buf.length, base: b.base, patch });
  }
  return { blocks, device };
}


const ZERO_PAGE = Buffer.alloc(P);

/**
 * Pages of `got` that differ from the image's block (and, with allowZero, are not all-zero):
 * a page a stream could not have written there. Whole 256 KiB runs are compared first.
 */
export function diffPages(got: Buffer, ref: Image['blocks'] extends Map<string, infer V> ? V : never, allowZero: boolean, limit = Infinity): number {
  let n = 0;
  const pages = ref.usedLength / P;
  const RUN = 64;
  for (let p0 = 0; p0 < pages; p0 += RUN) {
    const p1 = Math.min(pages, p0 + RUN);
    let patched = false;
    if (ref.patch.size > 0) for (let p = p0; p < p1; p++) if (ref.patch.has(p)) { patched = true; break; }
    if (!patched && got.compare(ref.base, p0 * P, p1 * P, p0 * P, p1 * P) === 0) continue;
    for (let p = p0; p < p1; p++) {
      const a = p * P;
      const want = ref.patch.get(p) ?? ref.base.subarray(a, a + P);
      if (got.compare(want, 0, P, a, a + P) === 0) continue;
      if (allowZero && got.compare(ZERO_PAGE, 0, P, a, a + P) === 0) continue;
      if (++n > limit) return n;
    }
  }
  return n;
}

// ------------------------------------------------------------------------------------------
// calibration: the unmutated replay is the reference

export const DEFAULT_REPLAY = { ioTimeoutMs: 500, heartbeatTimeoutMs: 1000 };

function seedConns(seed: Seed): CaseConn[] {
  return seed.conns.map((c) => ({ role: c.role, data: c.data, gates: c.gates, cut: c.data.length, end: 'eof' as const }));
}

/** Replays the seed unmutated; its committed images are what mutated cases are checked against. */
export async function calibrate(seed: Seed, pool: PagePool): Promise<Reference> {
  const images = new Map<number, Image>();
  const pendingDevice: Promise<void>[] = [];
  let last: Image | undefined;
  const r = await replay(seedConns(seed), {
    pool, channels: seed.channels, compression: seed.compression, ioTimeoutMs: 10_000, heartbeatTimeoutMs: 20_000, deadlineMs: 60_000, eofGate: seed.eofGate,
    onCheckpoint: (mig, index) => {
      const mem = snapshotMemory(mig);
      pendingDevice.push(mig.committedImage().then((img) => {
        assert.ok(img && img.checkpoint === index, `${seed.name}: image of checkpoint ${index}`);
        const im = makeImage(mem, Buffer.from(img.deviceState), last);
        last = im;
        images.set(index, im);
      }));
    },
  });
  await Promise.all(pendingDevice);
  assert.ok(!r.hang && r.outcome, `${seed.name}: the unmutated replay hung`);
  const o = r.outcome;
  if (seed.colo) {
    assert.equal(o.kind, 'primary-lost', `${seed.name}: unmutated COLO replay ended ${JSON.stringify(o)}`);
  } else {
    assert.equal(o.kind, 'completed', `${seed.name}: unmutated precopy replay ended ${JSON.stringify(o)}`);
    assert.ok(r.image);
    images.set(0, makeImage(new Map(r.image.blocks.map((b) => [b.idstr, Buffer.from(imageBlockBytes(b))])), Buffer.from(r.image.deviceState), undefined));
  }
  assert.ok(r.image, `${seed.name}: no committed image`);
  assert.equal(r.committed, seed.colo ? images.size - 1 : 0);
  // The replayer reproduces the source: synthetic seeds carry the model's memory per checkpoint.
  if (seed.model) {
    for (const [k, mem] of seed.model) {
      const im = images.get(k);
      assert.ok(im, `${seed.name}: no image for checkpoint ${k}`);
      for (const [idstr, buf] of mem) {
        const b = im.blocks.get(idstr);
        assert.ok(b, `${seed.name}: block ${idstr}`);
        assert.equal(diffPages(buf, b, false), 0, `${seed.name}: checkpoint ${k} block ${idstr} differs from the source model`);
      }
    }
  }
  return {
    outcome: { kind: o.kind, code: 'error' in o && o.error ? o.error.code : null },
    committed: r.committed, images, blockList: r.image.blocks.map((b) => ({ idstr: b.idstr, usedLength: b.usedLength })), ms: r.ms,
  };
}

// ------------------------------------------------------------------------------------------
// structure of a seed: where the interesting fields are

export interface Field { conn: number; at: number; len: number }
export interface PacketInfo { conn: number; at: number; len: number; flags: number; pagesAlloc: number; normal: number; zero: number; ramblock: string; offsets: number[] }
export interface RamRecordInfo { at: number; flags: number; named: boolean; nameLen: number; block: string; addr: number; len: number }

export interface Structure {
  blocks: { idstr: string; usedLength: number }[];
  memSize?: { word: number; entries: { lenAt: number; nameAt: number; name: string; usedAt: number; usedLength: number }[] };
  config?: Field;
  ramRecords: RamRecordInfo[];
  packets: PacketInfo[];
  inits: Field[];
  vmstateSize: Field[];      // the be32 4 + be64 size of every checkpoint
  coloMsgs: Field[];         // REQUEST and VMSTATE_SEND words
  vmdesc?: Field;
  sectionHeaders: Field[];   // FULL/START headers: at = type byte
  /** Segment of each connection: [from, to, checkpoint]. */
  segments: Array<Array<[number, number, number]>>;
}

/** Checkpoint a gate belongs to: 0 = initial migration, c = COLO checkpoint c (replies are 4-byte COLO messages). */
export function checkpointOfGate(replies: number): number {
  const r = Math.floor(replies / 4);
  return r === 0 ? 0 : Math.floor((r - 1) / 3) + 1;
}

function segmentsOf(c: SeedConn): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  const g = c.gates.length ? c.gates : [[0, 0] as [number, number]];
  for (let i = 0; i < g.length; i++) {
    const from = g[i]![0], to = i + 1 < g.length ? g[i + 1]![0] : c.data.length;
    if (to > from) out.push([from, to, checkpointOfGate(g[i]![1])]);
  }
  return out;
}

function be64(b: Buffer, at: number): number { return b.readUInt32BE(at) * TWO_32 + b.readUInt32BE(at + 4); }

/** Walks a ram section body from `at`; returns its records if it ends with EOS + footer(id), else null. */
function walkRam(b: Buffer, at: number, ramId: number, blocks: Map<string, number>, cur: { block: string }, out: RamRecordInfo[]): number | null {
  const recs: RamRecordInfo[] = [];
  let block = cur.block;
  for (let guard = 0; guard < 1 << 22; guard++) {
    if (at + 8 > b.length) return null;
    const hi = b.readUInt32BE(at), lo = b.readUInt32BE(at + 4);
    const flags = lo & 0xfff, addr = hi * TWO_32 + (lo - flags);
    const kind = flags & ~RAM_SAVE_FLAG_CONTINUE;
    if (kind === RAM_SAVE_FLAG_EOS) {
      if (at + 13 > b.length || b[at + 8] !== 0x7e || b.readUInt32BE(at + 9) !== ramId) return null;
      out.push(...recs);
      cur.block = block;
      return at + 13;
    }
    if (kind === RAM_SAVE_FLAG_MULTIFD_FLUSH) { at += 8; continue; }
    if (kind !== RAM_SAVE_FLAG_PAGE && kind !== RAM_SAVE_FLAG_ZERO) return null;
    let named = false, nameLen = 0, p = at + 8;
    if (!(flags & RAM_SAVE_FLAG_CONTINUE)) {
      if (p >= b.length) return null;
      nameLen = b[p]!;
      const name = b.toString('latin1', p + 1, p + 1 + nameLen);
      if (!blocks.has(name)) return null;
      block = name;
      named = true;
      p += 1 + nameLen;
    } else if (block === '') return null;
    const used = blocks.get(block)!;
    if (addr + P > used) return null;
    const len = p - at + (kind === RAM_SAVE_FLAG_PAGE ? P : 1);
    recs.push({ at, flags, named, nameLen, block, addr, len });
    at += len;
  }
  return null;
}

export function analyze(seed: Seed): Structure {
  const s: Structure = { blocks: [], ramRecords: [], packets: [], inits: [], vmstateSize: [], coloMsgs: [], sectionHeaders: [], segments: seed.conns.map(segmentsOf) };
  const main = seed.conns[0]!;
  assert.equal(main.role, 'main');
  const b = main.data;
  if (b[8] === 0x07) s.config = { conn: 0, at: 9, len: 4 };
  // ram START with MEM_SIZE: 01 id(4) 03 "ram" instance(4)=0 version(4)=4
  const pat = Buffer.from([0x03, 0x72, 0x61, 0x6d, 0, 0, 0, 0, 0, 0, 0, 4]);
  const i = b.indexOf(pat);
  let ramId = -1;
  const blocks = new Map<string, number>();
  const cur = { block: '' };
  if (i >= 5 && b[i - 5] === 0x01) {
    ramId = b.readUInt32BE(i - 4);
    const w = i + pat.length;
    const total = be64(b, w) - (b.readUInt32BE(w + 4) & 0xfff);
    assert.equal(b.readUInt32BE(w + 4) & 0xfff, RAM_SAVE_FLAG_MEM_SIZE);
    const entries: NonNullable<Structure['memSize']>['entries'] = [];
    let at = w + 8, seen = 0;
    while (seen < total) {
      const n = b[at]!;
      const name = b.toString('latin1', at + 1, at + 1 + n);
      const used = be64(b, at + 1 + n);
      entries.push({ lenAt: at, nameAt: at + 1, name, usedAt: at + 1 + n, usedLength: used });
      blocks.set(name, used);
      s.blocks.push({ idstr: name, usedLength: used });
      seen += used;
      at += 1 + n + 8;
    }
    s.memSize = { word: w, entries };
    const end = walkRam(b, at, ramId, blocks, cur, s.ramRecords);
    assert.ok(end !== null, `${seed.name}: the ram START section does not walk`);
  }
  // PART / END sections of ram: walk every candidate header; keep the walks that end in EOS + footer.
  if (ramId >= 0) {
    const id = Buffer.alloc(4);
    id.writeUInt32BE(ramId, 0);
    for (const t of [0x02, 0x03]) {
      const hdr = Buffer.concat([Buffer.from([t]), id]);
      for (let k = b.indexOf(hdr); k >= 0; k = b.indexOf(hdr, k + 1)) {
        const c = { block: cur.block };
        const inPage = s.ramRecords.some((r) => k > r.at && k < r.at + r.len);
        if (inPage) continue;
        const end = walkRam(b, k + 5, ramId, blocks, c, s.ramRecords);
        if (end !== null) { cur.block = c.block; k = end - 1; }
      }
    }
    s.ramRecords.sort((x, y) => x.at - y.at);
  }
  // COLO: each checkpoint's main segment starts with REQUEST (own segment), then VMSTATE_SEND ... VMSTATE_SIZE blob.
  for (const [from, to, ck] of s.segments[0]!) {
    if (ck === 0) {
      // VMDESCRIPTION at the end of the initial migration: 06 be32(len) '{'...
      for (let p = to - 6; p >= Math.max(from, to - 2 * 2 ** 20); p--) {
        if (b[p] === 0x06 && b.readUInt32BE(p + 1) === to - p - 5 && b[p + 5] === 0x7b) { s.vmdesc = { conn: 0, at: p, len: 5 }; break; }
      }
      continue;
    }
    const first = b.readUInt32BE(from);
    if (to - from === 4 && first === COLO_MESSAGE_CHECKPOINT_REQUEST) { s.coloMsgs.push({ conn: 0, at: from, len: 4 }); continue; }
    if (first === COLO_MESSAGE_VMSTATE_SEND) s.coloMsgs.push({ conn: 0, at: from, len: 4 });
    for (let p = to - 13; p >= from; p--) {
      if (b.readUInt32BE(p) === COLO_MESSAGE_VMSTATE_SIZE && b.readUInt32BE(p + 4) === 0 && b.readUInt32BE(p + 8) === to - p - 12) {
        s.vmstateSize.push({ conn: 0, at: p, len: 12 });
        break;
      }
    }
  }
  // FULL / START section headers outside page payloads: 04|01 id(4) len name inst(4) ver(4)
  const pages = s.ramRecords;
  let ri = 0;
  for (let p = 0; p + 15 < b.length; p++) {
    while (ri < pages.length && pages[ri]!.at + pages[ri]!.len <= p) ri++;
    if (ri < pages.length && p >= pages[ri]!.at) { p = pages[ri]!.at + pages[ri]!.len - 1; continue; }
    if (b[p] !== 0x04 && b[p] !== 0x01) continue;
    if (b.readUInt32BE(p + 1) > 0xff) continue;
    const n = b[p + 5]!;
    if (n < 2 || n > 64 || p + 6 + n + 8 > b.length) continue;
    let ok = true;
    for (let k = 0; k < n && ok; k++) { const ch = b[p + 6 + k]!; ok = ch >= 0x20 && ch < 0x7f; }
    if (!ok || b.readUInt32BE(p + 6 + n) > 0xff || b.readUInt32BE(p + 10 + n) > 0xff) continue;
    s.sectionHeaders.push({ conn: 0, at: p, len: 6 + n + 8 });
    p += 5 + n + 8;
  }
  // multifd connections: init, then 1344-byte headers and nocomp payloads
  for (let ci = 1; ci < seed.conns.length; ci++) {
    const d = seed.conns[ci]!.data;
    if (d.length < MULTIFD_INIT_LEN) continue;
    s.inits.push({ conn: ci, at: 0, len: MULTIFD_INIT_LEN });
    let at = MULTIFD_INIT_LEN;
    while (at + MULTIFD_PACKET_HEADER_LEN <= d.length) {
      const flags = d.readUInt32BE(at + 8), pagesAlloc = d.readUInt32BE(at + 12), normal = d.readUInt32BE(at + 16), zero = d.readUInt32BE(at + 32);
      const ramblock = d.toString('latin1', at + 64, d.indexOf(0, at + 64) >= 0 ? Math.min(d.indexOf(0, at + 64), at + 320) : at + 320);
      const offsets: number[] = [];
      for (let k = 0; k < normal + zero; k++) offsets.push(be64(d, at + 320 + 8 * k));
      const len = MULTIFD_PACKET_HEADER_LEN + (normal === 0 ? 0 : seed.compression === 'none' ? normal * P : d.readUInt32BE(at + 20));
      s.packets.push({ conn: ci, at, len, flags, pagesAlloc, normal, zero, ramblock, offsets });
      at += len;
    }
    assert.equal(at, d.length, `${seed.name}: ${seed.conns[ci]!.role} does not split into packets`);
  }
  if (s.blocks.length === 0) s.blocks = seed.ref?.blockList ?? [];
  return s;
}

// ------------------------------------------------------------------------------------------
// mutations

/** Replace `del` bytes at `at` of connection `conn` with `ins`. Every mutation is a list of splices (or a cut). */
export interface Splice { conn: number; at: number; del: number; ins: Buffer }

export type Expect =
  | { kind: 'benign' }                        // same outcome and images as the unmutated replay
  | { kind: 'codes'; codes: MigrationErrorCode[]; orOk?: boolean }
  | { kind: 'any' };

export interface Mutation {
  name: string;
  splices: Splice[];
  cut?: { conn: number; at: number; end: 'eof' | 'silent' };
  expect: Expect;
  /** Damaged pages this mutation may legitimately cause. */
  budget: number;
  /** The block list legitimately differs from the reference (no memory comparison then). */
  changesBlocks?: boolean;
  /**
   * Moves a SYNC packet (swapped with a neighbour, or onto another channel): a consistent stream
   * in which pages land in another barrier round, so the image may legitimately differ.
   */
  syncMove?: boolean;
  /** Adds a SYNC packet (a duplicated one, or the flag set on another packet). */
  addsSync?: boolean;
}

export interface FuzzCase {
  id: number;
  seed: Seed;
  muts: Mutation[];
  chunking: 'big' | 'random' | 'small';
  multifdFirst: boolean;
  rngSeed: number;
}

function u32(v: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32BE(v >>> 0, 0); return b; }
function u64(v: number): Buffer { const b = Buffer.alloc(8); b.writeUInt32BE(Math.floor(v / TWO_32) >>> 0, 0); b.writeUInt32BE(v >>> 0, 4); return b; }
function pick<T>(r: Prng, xs: readonly T[]): T { return xs[r.int(xs.length)]!; }
const set = (conn: number, at: number, ins: Buffer): Splice => ({ conn, at, del: ins.length, ins });

/** Interesting 32-bit values for a length or count field. */
function oddU32(r: Prng, cap?: number): number {
  const xs = [0, 1, 0xff, 0x100, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
  if (cap !== undefined) xs.push(cap, cap + 1, cap - 1, cap * 2);
  return pick(r, xs) >>> 0;
}

type Gen = (r: Prng, seed: Seed, s: Structure) => Mutation | null;

function connWeighted(r: Prng, seed: Seed): number {
  const total = seed.conns.reduce((a, c) => a + c.data.length, 0);
  let x = r.int(total);
  for (let i = 0; i < seed.conns.length; i++) { x -= seed.conns[i]!.data.length; if (x < 0) return i; }
  return 0;
}

/** A position biased towards record/packet headers (mutating page payloads is mostly benign). */
function interestingPos(r: Prng, seed: Seed, s: Structure): { conn: number; at: number } {
  const k = r.int(6);
  if (k === 0 && s.ramRecords.length) { const x = pick(r, s.ramRecords); return { conn: 0, at: x.at + r.int(Math.min(x.len, 9 + x.nameLen + 1)) }; }
  if (k === 1 && s.packets.length) { const x = pick(r, s.packets); return { conn: x.conn, at: x.at + r.int(MULTIFD_PACKET_HEADER_LEN) }; }
  if (k === 2 && s.sectionHeaders.length) { const x = pick(r, s.sectionHeaders); return { conn: 0, at: x.at + r.int(x.len) }; }
  if (k === 3 && s.coloMsgs.length + s.vmstateSize.length) { const x = pick(r, [...s.coloMsgs, ...s.vmstateSize]); return { conn: 0, at: x.at + r.int(x.len) }; }
  if (k === 4) return { conn: 0, at: r.int(Math.min(seed.conns[0]!.data.length, 4096)) };
  const conn = connWeighted(r, seed);
  return { conn, at: r.int(seed.conns[conn]!.data.length) };
}

const GENS: Array<[number, string, Gen]> = [
  // --- generic byte damage
  [10, 'flip', (r, seed, s) => {
    const { conn, at } = interestingPos(r, seed, s);
    const b = Buffer.from([seed.conns[conn]!.data[at]! ^ (1 << r.int(8))]);
    return { name: 'flip', splices: [set(conn, at, b)], expect: { kind: 'any' }, budget: 128 };
  }],
  [5, 'bytes', (r, seed, s) => {
    const { conn, at } = interestingPos(r, seed, s);
    const n = Math.min(1 + r.int(8), seed.conns[conn]!.data.length - at);
    const b = Buffer.alloc(n); r.fill(b);
    return { name: 'random-bytes', splices: [set(conn, at, b)], expect: { kind: 'any' }, budget: 128 };
  }],
  [6, 'truncate', (r, seed, s) => {
    const { conn, at } = r.chance(0.5) ? interestingPos(r, seed, s) : { conn: connWeighted(r, seed), at: 0 };
    const c = seed.conns[conn]!;
    const cut = at > 0 ? at : r.int(c.data.length);
    const end = r.chance(0.25) ? 'silent' : 'eof';
    // budget 1: a PAGE record cut in its payload leaves that page half written (QEMU too)
    return { name: `truncate-${end}`, splices: [], cut: { conn, at: cut, end }, expect: { kind: 'codes', codes: ['ERR_TRUNCATED', 'ERR_PEER', 'ERR_TIMEOUT', 'ERR_SYNC'], orOk: true }, budget: 1 };
  }],
  [3, 'insert', (r, seed, s) => {
    const { conn, at } = interestingPos(r, seed, s);
    const b = Buffer.alloc(1 + r.int(r.chance(0.8) ? 16 : 5000)); r.fill(b);
    return { name: 'insert-random', splices: [{ conn, at, del: 0, ins: b }], expect: { kind: 'any' }, budget: 128 + Math.ceil(b.length / 9) };
  }],
  [3, 'delete', (r, seed, s) => {
    const { conn, at } = interestingPos(r, seed, s);
    const n = Math.min(seed.conns[conn]!.data.length - at, 1 + r.int(r.chance(0.7) ? 16 : 20000));
    return { name: 'delete-range', splices: [{ conn, at, del: n, ins: Buffer.alloc(0) }], expect: { kind: 'any' }, budget: 128 + Math.ceil(n / 9) };
  }],
  [3, 'dup-range', (r, seed, s) => {
    const { conn, at } = interestingPos(r, seed, s);
    const d = seed.conns[conn]!.data;
    const n = Math.min(d.length - at, 1 + r.int(r.chance(0.7) ? 64 : 20000));
    return { name: 'duplicate-range', splices: [{ conn, at: at + n, del: 0, ins: Buffer.from(d.subarray(at, at + n)) }], expect: { kind: 'any' }, budget: 128 + Math.ceil(n / 9) };
  }],
  // --- main channel: header, configuration, MEM_SIZE, page records
  [2, 'file-magic', (r) => ({ name: 'file-magic', splices: [set(0, r.int(4), Buffer.from([r.int(256)]))], expect: { kind: 'codes', codes: ['ERR_BAD_MAGIC'], orOk: true }, budget: 0 })],
  [2, 'file-version', (r) => ({ name: 'file-version', splices: [set(0, 4, u32(pick(r, [0, 1, 2, 4, 0x100, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_BAD_VERSION'] }, budget: 0 })],
  [2, 'config-len', (r, _seed, s) => s.config ? { name: 'config-name-len', splices: [set(0, s.config.at, u32(pick(r, [0, 256, 0xffff, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 } : null],
  [2, 'memsize-total', (r, _seed, s) => {
    if (!s.memSize) return null;
    const v = pick(r, [FUZZ_LIMITS.maxRamBytes + P, 2 ** 52, 2 ** 40]);
    return { name: 'memsize-total-over-cap', splices: [set(0, s.memSize.word, u64(v + RAM_SAVE_FLAG_MEM_SIZE))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
  }],
  [3, 'memsize-used', (r, _seed, s) => {
    if (!s.memSize) return null;
    const e = pick(r, s.memSize.entries);
    const v = pick(r, [0, e.usedLength + 1, e.usedLength - 1, e.usedLength * 2, 2 ** 53 - P, 2 ** 60, FUZZ_LIMITS.maxRamBytes + P]);
    return { name: 'memsize-used-length', splices: [set(0, e.usedAt, u64(v))], expect: { kind: 'codes', codes: ['ERR_RANGE', 'ERR_LIMIT'] }, budget: 0 };
  }],
  [2, 'memsize-idlen', (r, _seed, s) => {
    if (!s.memSize) return null;
    const e = pick(r, s.memSize.entries);
    return { name: 'memsize-idstr-len', splices: [set(0, e.lenAt, Buffer.from([pick(r, [0, 255, e.name.length + 1, e.name.length - 1])]))], expect: { kind: 'any' }, budget: 0 };
  }],
  [2, 'memsize-rename', (r, _seed, s) => {
    if (!s.memSize) return null;
    const e = pick(r, s.memSize.entries);
    const name = Buffer.from(e.name, 'latin1');
    const i = r.int(name.length); name[i] = name[i]! ^ 0x21;
    return { name: 'memsize-unknown-block', splices: [set(0, e.nameAt, name)], expect: { kind: 'codes', codes: ['ERR_UNKNOWN_RAMBLOCK'] }, budget: 0 };
  }],
  [1, 'memsize-more-blocks', (r, _seed, s) => {
    if (!s.memSize) return null;
    const extra = Buffer.concat([Buffer.from([4]), Buffer.from('evil'), u64(P)]);
    const total = s.blocks.reduce((a, b) => a + b.usedLength, 0) + P;
    const last = s.memSize.entries[s.memSize.entries.length - 1]!;
    return {
      name: 'memsize-extra-block',
      splices: [{ conn: 0, at: last.usedAt + 8, del: 0, ins: extra }, set(0, s.memSize.word, u64(total + RAM_SAVE_FLAG_MEM_SIZE))],
      expect: { kind: 'codes', codes: [], orOk: true }, budget: 0, changesBlocks: true,
    };
  }],
  [4, 'page-addr', (r, _seed, s) => {
    if (!s.ramRecords.length) return null;
    const x = pick(r, s.ramRecords);
    const used = s.blocks.find((b) => b.idstr === x.block)!.usedLength;
    const k = r.int(4);
    const addr = [used, used + P, 2 ** 52, used - P][k]!;
    const word = u64(addr + x.flags);
    return { name: k === 3 ? 'page-addr-last-page' : 'page-addr-past-end', splices: [set(0, x.at, word)], expect: k === 3 ? { kind: 'any' } : { kind: 'codes', codes: ['ERR_RANGE'] }, budget: 2 };
  }],
  [2, 'page-addr-huge', (r, _seed, s) => {
    if (!s.ramRecords.length) return null;
    const x = pick(r, s.ramRecords);
    const b = Buffer.alloc(8); b.writeUInt32BE(0x00200000 + r.int(0xffdfffff), 0); b.writeUInt32BE((x.flags | (r.int(0x100000) << 12)) >>> 0, 4);
    return { name: 'page-addr-above-2^53', splices: [set(0, x.at, b)], expect: { kind: 'codes', codes: ['ERR_RANGE'] }, budget: 0 };
  }],
  [2, 'page-flags', (r, _seed, s) => {
    if (!s.ramRecords.length) return null;
    const x = pick(r, s.ramRecords);
    const f = pick(r, [RAM_SAVE_FLAG_XBZRLE, 0x80, 0x100, 0x400, 0x800, 0x01, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_ZERO]);
    const b = u32(((x.addr >>> 0) | f) >>> 0);
    return { name: 'page-flags', splices: [set(0, x.at + 4, b)], expect: { kind: 'codes', codes: ['ERR_UNSUPPORTED', 'ERR_UNKNOWN_SECTION'] }, budget: 0 };
  }],
  [3, 'page-idstr', (r, _seed, s) => {
    const named = s.ramRecords.filter((x) => x.named);
    if (!named.length) return null;
    const x = pick(r, named);
    if (r.chance(0.5)) {
      const name = Buffer.from(x.block, 'latin1'); const i = r.int(name.length); name[i] = name[i]! ^ 0x01;
      return { name: 'page-unknown-block', splices: [set(0, x.at + 9, name)], expect: { kind: 'codes', codes: ['ERR_UNKNOWN_RAMBLOCK'] }, budget: 0 };
    }
    return { name: 'page-idstr-len', splices: [set(0, x.at + 8, Buffer.from([pick(r, [0, 255, x.nameLen + 1, x.nameLen - 1])]))], expect: { kind: 'any' }, budget: 1 };
  }],
  [2, 'page-continue-first', (r, _seed, s) => {
    const named = s.ramRecords.filter((x) => x.named);
    if (!named.length) return null;
    const x = pick(r, named);
    // CONTINUE set on a record that names its block: the name bytes are read as the next record
    return { name: 'page-bogus-continue', splices: [set(0, x.at + 4, u32(((x.addr >>> 0) | x.flags | RAM_SAVE_FLAG_CONTINUE) >>> 0))], expect: { kind: 'any' }, budget: 2 };
  }],
  [2, 'zero-fill', (r, _seed, s) => {
    const zs = s.ramRecords.filter((x) => (x.flags & RAM_SAVE_FLAG_ZERO) !== 0);
    if (!zs.length) return null;
    const x = pick(r, zs);
    return { name: 'zero-page-fill-byte', splices: [set(0, x.at + x.len - 1, Buffer.from([1 + r.int(255)]))], expect: { kind: 'any' }, budget: 1 };
  }],
  [3, 'section-idlen', (r, _seed, s) => {
    if (!s.sectionHeaders.length) return null;
    const x = pick(r, s.sectionHeaders);
    return { name: 'section-idstr-len', splices: [set(0, x.at + 5, Buffer.from([pick(r, [0, 1, 255, 64, r.int(256)])]))], expect: { kind: 'any' }, budget: 0 };
  }],
  [2, 'section-type', (r, _seed, s) => {
    if (!s.sectionHeaders.length) return null;
    const x = pick(r, s.sectionHeaders);
    return { name: 'section-type', splices: [set(0, x.at, Buffer.from([pick(r, [0x09, 0x05, 0x7f, 0xff, 0x02, 0x06])]))], expect: { kind: 'any' }, budget: 0 };
  }],
  [2, 'vmdesc-len', (r, _seed, s) => {
    if (!s.vmdesc) return null;
    const v = pick(r, [FUZZ_LIMITS.maxVmdescBytes + 1, 0xffffffff, 0x7fffffff]);
    return { name: 'vmdesc-len-over-cap', splices: [set(0, s.vmdesc.at + 1, u32(v))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
  }],
  [1, 'vmdesc-len-small', (r, _seed, s) => s.vmdesc ? { name: 'vmdesc-len-wrong', splices: [set(0, s.vmdesc.at + 1, u32(r.int(64)))], expect: { kind: 'any' }, budget: 0 } : null],
  // --- COLO
  [4, 'vmstate-size', (r, _seed, s) => {
    if (!s.vmstateSize.length) return null;
    const x = pick(r, s.vmstateSize);
    const k = r.int(5);
    const v = [FUZZ_LIMITS.maxBlobBytes + 1, 2 ** 53 - 1, 0, -1, 1][k]!;
    if (v === -1) return { name: 'vmstate-size-hi-bits', splices: [set(0, x.at + 4, u32(0xffffffff))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
    return { name: `vmstate-size-${['over-cap', '2^53', 'zero', '', 'one'][k]}`, splices: [set(0, x.at + 4, u64(v))], expect: { kind: 'codes', codes: k === 2 || k === 4 ? ['ERR_COLO_PROTOCOL'] : ['ERR_LIMIT'] }, budget: 0 };
  }],
  [3, 'vmstate-size-off', (r, seed, s) => {
    if (!s.vmstateSize.length) return null;
    const x = pick(r, s.vmstateSize);
    const size = be64(seed.conns[0]!.data, x.at + 4);
    return { name: 'vmstate-size-off-by', splices: [set(0, x.at + 4, u64(size + pick(r, [1, -1, 4, 100, -100])))], expect: { kind: 'any' }, budget: 0 };
  }],
  [2, 'vmstate-size-msg', (r, _seed, s) => {
    if (!s.vmstateSize.length) return null;
    const x = pick(r, s.vmstateSize);
    return { name: 'vmstate-size-message', splices: [set(0, x.at, u32(pick(r, [0, 1, 3, 5, 7, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_COLO_PROTOCOL'] }, budget: 0 };
  }],
  [3, 'colo-msg', (r, _seed, s) => {
    if (!s.coloMsgs.length) return null;
    const x = pick(r, s.coloMsgs);
    return { name: 'colo-message', splices: [set(0, x.at, u32(pick(r, [0, 2, 4, 5, 6, 7, 0x100, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_COLO_PROTOCOL'] }, budget: 0 };
  }],
  // --- multifd: handshake
  [2, 'init-magic', (r, _seed, s) => {
    if (!s.inits.length) return null;
    const x = pick(r, s.inits);
    return { name: 'init-magic', splices: [set(x.conn, r.int(4), Buffer.from([r.int(256)]))], expect: { kind: 'codes', codes: ['ERR_BAD_MAGIC', 'ERR_TIMEOUT', 'ERR_SYNC', 'ERR_PEER'], orOk: true }, budget: 0 };
  }],
  [2, 'init-version', (r, _seed, s) => s.inits.length ? { name: 'init-version', splices: [set(pick(r, s.inits).conn, 4, u32(pick(r, [0, 2, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_BAD_VERSION'] }, budget: 0 } : null],
  [2, 'init-id', (r, seed, s) => {
    if (!s.inits.length) return null;
    const x = pick(r, s.inits);
    const own = seed.conns[x.conn]!.data[24]!;
    const ids = [seed.channels, 255, ...s.inits.map((i) => seed.conns[i.conn]!.data[24]!).filter((i) => i !== own)];
    return { name: 'init-id', splices: [set(x.conn, 24, Buffer.from([pick(r, ids)]))], expect: { kind: 'codes', codes: ['ERR_HANDSHAKE'] }, budget: 0 };
  }],
  [1, 'init-uuid', (r, _seed, s) => {
    if (!s.inits.length) return null;
    const b = Buffer.alloc(16); r.fill(b);
    return { name: 'init-uuid', splices: [set(pick(r, s.inits).conn, 8, b)], expect: { kind: 'benign' }, budget: 0 };
  }],
  // --- multifd: packet header fields
  [3, 'pkt-magic', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    return { name: 'packet-magic', splices: [set(x.conn, x.at + r.int(4), Buffer.from([r.int(256)]))], expect: { kind: 'codes', codes: ['ERR_BAD_MAGIC'], orOk: true }, budget: 0 };
  }],
  [2, 'pkt-version', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    return { name: 'packet-version', splices: [set(x.conn, x.at + 4, u32(pick(r, [0, 2, 3, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_BAD_VERSION'] }, budget: 0 };
  }],
  [3, 'pkt-pages-alloc', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    return { name: 'packet-pages-alloc-over-128', splices: [set(x.conn, x.at + 12, u32(pick(r, [129, 256, 0x10000, 0xffffffff])))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
  }],
  [3, 'pkt-normal', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    const v = pick(r, [x.pagesAlloc + 1, 0xffffffff, 129]);
    return { name: 'packet-normal-pages-over-alloc', splices: [set(x.conn, x.at + 16, u32(v))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
  }],
  [2, 'pkt-normal-less', (r, _seed, s) => {
    const xs = s.packets.filter((p) => p.normal > 0);
    if (!xs.length) return null;
    const x = pick(r, xs);
    return { name: 'packet-normal-pages-changed', splices: [set(x.conn, x.at + 16, u32(r.int(x.pagesAlloc + 1)))], expect: { kind: 'any' }, budget: 256 };
  }],
  [2, 'pkt-zero', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    const over = x.pagesAlloc - x.normal + 1 + r.int(1000);
    return { name: 'packet-zero-pages-over-alloc', splices: [set(x.conn, x.at + 32, u32(over))], expect: { kind: 'codes', codes: ['ERR_LIMIT'] }, budget: 0 };
  }],
  [2, 'pkt-flags', (r, _seed, s) => {
    const xs = s.packets.filter((p) => p.normal > 0);
    if (!xs.length) return null;
    const x = pick(r, xs);
    const k = r.int(3);
    const other = _seed.compression === 'zlib' ? MULTIFD_FLAG_ZSTD : MULTIFD_FLAG_ZLIB;
    const f = [x.flags | MULTIFD_FLAG_DEVICE_STATE, (x.flags & ~0x3e) | other, (x.flags & ~0x3e) | 0x08][k]!;
    return { name: ['packet-device-state-flag', 'packet-compression-zlib', 'packet-compression-qpl'][k]!, splices: [set(x.conn, x.at + 8, u32(f))], expect: { kind: 'codes', codes: [['ERR_UNSUPPORTED'], ['ERR_BAD_VERSION'], ['ERR_UNSUPPORTED']][k] as MigrationErrorCode[] }, budget: 0 };
  }],
  [3, 'pkt-ramblock', (r, _seed, s) => {
    const xs = s.packets.filter((p) => p.normal + p.zero > 0);
    if (!xs.length) return null;
    const x = pick(r, xs);
    const name = Buffer.alloc(256);
    if (r.chance(0.3)) name.fill(0x41); else name.write(pick(r, ['pc.ram.', 'pc.ra', 'evil', '']), 'latin1');
    return { name: 'packet-unknown-ramblock', splices: [set(x.conn, x.at + 64, name)], expect: { kind: 'codes', codes: ['ERR_UNKNOWN_RAMBLOCK'] }, budget: 0 };
  }],
  [4, 'pkt-offset', (r, _seed, s) => {
    const xs = s.packets.filter((p) => p.normal + p.zero > 0 && s.blocks.some((b) => b.idstr === p.ramblock));
    if (!xs.length) return null;
    const x = pick(r, xs);
    const used = s.blocks.find((b) => b.idstr === x.ramblock)!.usedLength;
    const k = r.int(6);
    const v = [used, used + P, used - 1, x.offsets[0]! + 1, 2 ** 53, used - P][k]!;
    const slot = r.int(x.normal + x.zero);
    return {
      name: ['packet-offset-at-end', 'packet-offset-past-end', 'packet-offset-straddles-end', 'packet-offset-unaligned', 'packet-offset-huge', 'packet-offset-last-page'][k]!,
      splices: [set(x.conn, x.at + 320 + 8 * slot, u64(v))],
      expect: k === 5 ? { kind: 'any' } : { kind: 'codes', codes: ['ERR_RANGE'] }, budget: 2,
    };
  }],
  // --- stale 7.2 fields: must be ignored
  [3, 'stale', (r, _seed, s) => {
    if (!s.packets.length) return null;
    // (next_packet_size of a compressed data packet is its payload length: not stale)
    const x = pick(r, s.packets);
    const k = r.int(4);
    if (k === 0 && (_seed.compression === 'none' || x.normal === 0)) return { name: 'stale-next-packet-size', splices: [set(x.conn, x.at + 20, u32(r.u32()))], expect: { kind: 'benign' }, budget: 0 };
    if (k === 1) {
      // QEMU ignores packet_num; we check it ties packets with pages or a SYNC to their barrier
      // round, so there a random number may be refused (ERR_SYNC). On 7.2's empty packet it is stale.
      const b = u64(r.u32() * 1024 + r.int(1024));
      const checked = x.normal + x.zero > 0 || (x.flags & MULTIFD_FLAG_SYNC) !== 0;
      return checked
        ? { name: 'packet-num', splices: [set(x.conn, x.at + 24, b)], expect: { kind: 'codes', codes: ['ERR_SYNC'], orOk: true }, budget: 0 }
        : { name: 'stale-packet-num', splices: [set(x.conn, x.at + 24, b)], expect: { kind: 'benign' }, budget: 0 };
    }
    if (k === 2 && x.normal + x.zero < 128) {
      const slot = x.normal + x.zero + r.int(128 - x.normal - x.zero);
      const b = Buffer.alloc(8); r.fill(b);
      return { name: 'stale-unused-offset', splices: [set(x.conn, x.at + 320 + 8 * slot, b)], expect: { kind: 'benign' }, budget: 0 };
    }
    if (x.normal + x.zero === 0) {
      const name = Buffer.alloc(256); r.fill(name, 0, r.int(256));
      return { name: 'stale-ramblock-empty-packet', splices: [set(x.conn, x.at + 64, name)], expect: { kind: 'benign' }, budget: 0 };
    }
    return null;
  }],
  // --- multifd: packets as units
  [4, 'pkt-dup', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    const d = _seed.conns[x.conn]!.data.subarray(x.at, x.at + x.len);
    const next = s.packets.filter((p) => p.conn === x.conn && p.at > x.at);
    const at = r.chance(0.5) || !next.length ? x.at + x.len : pick(r, next).at;
    return { name: 'packet-duplicate', splices: [{ conn: x.conn, at, del: 0, ins: Buffer.from(d) }], expect: { kind: 'any' }, budget: 128, addsSync: (x.flags & MULTIFD_FLAG_SYNC) !== 0 };
  }],
  [4, 'pkt-swap', (r, seed, s) => {
    const x = s.packets.length ? pick(r, s.packets) : undefined;
    if (!x) return null;
    const same = s.packets.filter((p) => p.conn === x.conn && p.at > x.at);
    if (!same.length) return null;
    const y = r.chance(0.5) ? same[0]! : pick(r, same);
    const d = seed.conns[x.conn]!.data;
    return {
      name: y === same[0] ? 'packet-swap-adjacent' : 'packet-reorder',
      splices: [{ conn: x.conn, at: y.at, del: y.len, ins: Buffer.from(d.subarray(x.at, x.at + x.len)) }, { conn: x.conn, at: x.at, del: x.len, ins: Buffer.from(d.subarray(y.at, y.at + y.len)) }],
      expect: { kind: 'any' }, budget: 256, syncMove: ((x.flags | y.flags) & MULTIFD_FLAG_SYNC) !== 0,
    };
  }],
  [2, 'pkt-drop', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    return { name: 'packet-drop', splices: [{ conn: x.conn, at: x.at, del: x.len, ins: Buffer.alloc(0) }], expect: { kind: 'any' }, budget: 128 };
  }],
  [2, 'pkt-move-channel', (r, seed, s) => {
    if (s.inits.length < 2 || !s.packets.length) return null;
    const x = pick(r, s.packets);
    const others = s.packets.filter((p) => p.conn !== x.conn);
    if (!others.length) return null;
    const y = pick(r, others);
    const d = seed.conns[x.conn]!.data;
    return {
      name: 'packet-other-channel',
      splices: [{ conn: y.conn, at: y.at, del: 0, ins: Buffer.from(d.subarray(x.at, x.at + x.len)) }, { conn: x.conn, at: x.at, del: x.len, ins: Buffer.alloc(0) }],
      expect: { kind: 'any' }, budget: 256, syncMove: (x.flags & MULTIFD_FLAG_SYNC) !== 0,
    };
  }],
  [2, 'pkt-sync', (r, _seed, s) => {
    if (!s.packets.length) return null;
    const x = pick(r, s.packets);
    return { name: 'packet-sync-flag-toggled', splices: [set(x.conn, x.at + 8, u32(x.flags ^ MULTIFD_FLAG_SYNC))], expect: { kind: 'any' }, budget: 0, addsSync: (x.flags & MULTIFD_FLAG_SYNC) === 0 };
  }],
];

const GEN_TOTAL = GENS.reduce((a, g) => a + g[0], 0);

export function makeMutation(r: Prng, seed: Seed): Mutation {
  const s = seed.struct!;
  for (;;) {
    let x = r.int(GEN_TOTAL);
    let g = GENS[0]!;
    for (const e of GENS) { x -= e[0]; if (x < 0) { g = e; break; } }
    const m = g[2](r, seed, s);
    if (m) return m;
  }
}

export function makeCase(id: number, rngSeed: number, seeds: Seed[]): FuzzCase {
  const r = new Prng(rngSeed);
  const total = seeds.reduce((a, s) => a + s.weight, 0);
  let x = r.float() * total;
  let seed = seeds[0]!;
  for (const s of seeds) { x -= s.weight; if (x < 0) { seed = s; break; } }
  const n = r.chance(0.75) ? 1 : r.chance(0.6) ? 2 : 3;
  const muts: Mutation[] = [];
  for (let i = 0; i < n; i++) muts.push(makeMutation(r, seed));
  const chunking = r.chance(0.7) ? 'big' : seed.conns.reduce((a, c) => a + c.data.length, 0) < 400_000 && r.chance(0.3) ? 'small' : 'random';
  return { id, seed, muts, chunking, multifdFirst: r.chance(0.15), rngSeed };
}

/** The streams of a case: splices applied back to front per connection (so offsets stay valid), then cuts. */
export function applyCase(c: FuzzCase): { conns: CaseConn[]; damage: { min: number; max: number } } {
  const seed = c.seed;
  const perConn = seed.conns.map(() => [] as Splice[]);
  const cuts = seed.conns.map(() => undefined as undefined | { at: number; end: 'eof' | 'silent' });
  let min = Infinity, max = -Infinity;
  const ckAt = (conn: number, at: number): number => {
    for (const [from, to, k] of seed.struct!.segments[conn]!) if (at >= from && at < to) return k;
    const segs = seed.struct!.segments[conn]!;
    return segs.length ? segs[segs.length - 1]![2] : 0;
  };
  for (const m of c.muts) {
    for (const sp of m.splices) { perConn[sp.conn]!.push(sp); const k = ckAt(sp.conn, sp.at); min = Math.min(min, k); max = Math.max(max, k); }
    if (m.cut) {
      const prev = cuts[m.cut.conn];
      if (!prev || m.cut.at < prev.at) cuts[m.cut.conn] = { at: m.cut.at, end: m.cut.end };
      const k = ckAt(m.cut.conn, m.cut.at); min = Math.min(min, k); max = Math.max(max, k);
    }
  }
  const conns = seed.conns.map((sc, i) => {
    const sps = perConn[i]!.sort((a, b) => b.at - a.at || b.del - a.del);
    let data = sc.data;
    let gates = sc.gates.map(([a, r]) => [a, r] as [number, number]);
    let cut = cuts[i]?.at ?? Infinity;
    if (sps.length) {
      const parts: Buffer[] = [];
      let tail = data.length;
      let lastAt = Infinity;
      for (const sp of sps) {
        if (sp.at + sp.del > lastAt) continue;          // overlapping splices: keep the later one
        const at = Math.min(sp.at, data.length), del = Math.min(sp.del, data.length - at);
        parts.push(data.subarray(at + del, tail), sp.ins);
        tail = at;
        lastAt = at;
        const delta = sp.ins.length - del;
        gates = gates.map(([a, r]) => [a > at ? Math.max(at, a + delta) : a, r] as [number, number]);
        if (cut !== Infinity && cut > at) cut = Math.max(at, cut + delta);
      }
      parts.push(data.subarray(0, tail));
      data = Buffer.concat(parts.reverse());
    }
    return { role: sc.role, data, gates, cut: cut === Infinity ? data.length : Math.min(cut, data.length), end: cuts[i]?.end ?? 'eof' } satisfies CaseConn;
  });
  return { conns, damage: { min: min === Infinity ? 0 : min, max: max === -Infinity ? 0 : max } };
}

// ------------------------------------------------------------------------------------------
// one case

export type Verdict = 'ok' | 'crash' | 'hang' | 'violation' | 'known';

export interface CaseReport {
  id: number;
  seed: string;
  muts: string[];
  verdict: Verdict;
  outcome: string;             // 'completed' | 'failed:ERR_X' | 'primary-lost:ERR_X' | 'no-migration' | 'hang'
  code: string | null;
  /** channel@streamOffset of the error. */
  where?: string;
  /** The error lacks its channel or its stream offset. */
  unplaced?: boolean;
  committed: number;
  detail?: string;
  ms: number;
  /** For reproduction: bench/fuzz.js --replay <rngSeed>. */
  rngSeed: number;
  /** For verdict 'known': which known receiver issue explains the finding. */
  known?: string;
}

/**
 * Findings explained by something other than a receiver bug are counted apart ('known').
 * Receiver bugs the fuzzer found are fixed (see test/unit/limits.test.ts, "fixed in ..."); a
 * finding like them again is a regression and is reported as such, not classified here.
 */
export const KNOWN_ISSUES = {
  overload: 'not a receiver issue: ERR_TIMEOUT while the shared event loop lagged by half a timeout or more (the host is overloaded)',
} as const;

// No open receiver issue is classified here: the last one ('syncAhead', a channel a barrier
// ahead after an extra SYNC) is fixed by the packet_num round checks in IncomingMigration.

function chunker(c: FuzzCase): (left: number) => number {
  const r = new Prng(c.rngSeed ^ 0x5bd1e995);
  const max = c.seed.maxChunk;
  if (c.chunking === 'big') return () => max;
  if (c.chunking === 'small') return () => 1 + r.int(r.chance(0.5) ? 16 : 1500);
  return () => 1 + r.int(r.chance(0.2) ? 64 : max);
}

function describeOutcome(o: Outcome | null): string {
  if (!o) return 'none';
  return o.kind === 'completed' ? 'completed' : `${o.kind}:${o.error?.code ?? '-'}`;
}

const INTERNAL = new Set(['TypeError', 'RangeError', 'AssertionError', 'ReferenceError', 'SyntaxError']);

/** Runs one case and checks every rule; never throws for a receiver misbehaviour (it reports it). */
export async function runCase(c: FuzzCase, pool: PagePool, opts: Partial<typeof DEFAULT_REPLAY> & { deadlineMs?: number } = {}): Promise<CaseReport> {
  const seed = c.seed, ref = seed.ref!;
  const { conns, damage } = applyCase(c);
  const io = opts.ioTimeoutMs ?? seed.ioTimeoutMs;
  const hb = opts.heartbeatTimeoutMs ?? seed.heartbeatTimeoutMs;
  const bytes = conns.reduce((a, x) => a + x.data.length, 0);
  const deadlineMs = opts.deadlineMs ?? 5000 + 4 * (io + hb) + Math.ceil(bytes / 20_000) + ref.ms * 4;
  const t0 = performance.now();
  lag.start();
  const r = await replay(conns, {
    pool, channels: seed.channels, compression: seed.compression, ioTimeoutMs: io, heartbeatTimeoutMs: hb, deadlineMs, eofGate: seed.eofGate,
    chunk: chunker(c), multifdFirst: c.multifdFirst,
  }).finally(() => lag.stop());
  const maxLag = lag.maxSince(t0);
  const base = { id: c.id, seed: seed.name, muts: c.muts.map((m) => m.name), committed: r.committed, ms: r.ms, rngSeed: c.rngSeed };
  if (r.hang) {
    const detail = `phase ${r.mig.phase}, committed ${r.committed}, max loop lag ${maxLag.toFixed(0)} ms, socket timeouts ${r.atEnd.map((a) => `${a.role}:${a.timeouts}`).join(' ')}`;
    return { ...base, verdict: 'hang', outcome: 'hang', code: null, detail };
  }
  if (r.noMigration) return { ...base, verdict: 'ok', outcome: 'no-migration', code: null };
  const o = r.outcome!;
  const err = o.kind === 'completed' ? undefined : o.error;
  const outcome = describeOutcome(o);
  const code = err?.code ?? null;
  const where = err ? `${err.channel ?? '(none)'}@${err.streamOffset ?? '(none)'}` : undefined;
  const unplaced = err !== undefined && (err.channel === undefined || err.streamOffset === undefined);
  const bad = (verdict: Verdict, detail: string): CaseReport => {
    const known = verdict === 'violation' && err?.code === 'ERR_TIMEOUT' && maxLag >= Math.min(io, hb) / 2 ? 'overload' : undefined;
    return { ...base, verdict: known ? 'known' : verdict, outcome, code, ...(where ? { where, unplaced } : {}), detail, ...(known ? { known } : {}) };
  };

  // exactly one typed error, from the wire, never an internal one
  if (r.ends !== 1) return bad('crash', `'end' emitted ${r.ends} times`);
  if (o.kind !== 'completed') {
    if (!(err instanceof MigrationError)) return bad('crash', `outcome error is not a MigrationError: ${String(err)}`);
    const cause = (err as { cause?: unknown }).cause;
    if (err.code === 'ERR_WORKER' || (cause instanceof Error && INTERNAL.has(cause.name))) {
      return bad('crash', `internal error: ${err.message}${cause instanceof Error ? ` (cause ${cause.name}: ${cause.message})` : ''}`);
    }
  }

  // the one-mutation expectations
  if (c.muts.length === 1) {
    const e = c.muts[0]!.expect;
    if (e.kind === 'benign' && (outcome !== `${ref.outcome.kind}${ref.outcome.code ? `:${ref.outcome.code}` : ''}` || r.committed !== ref.committed)) {
      return bad('violation', `expected the unmutated outcome ${ref.outcome.kind}:${ref.outcome.code} (checkpoint ${ref.committed}), got ${outcome} (checkpoint ${r.committed}): ${err?.message}`);
    }
    if (e.kind === 'codes') {
      const okDone = o.kind !== 'failed' && (e.orOk ?? false) && (code === null || code === ref.outcome.code);
      if (!okDone && (code === null || !e.codes.includes(code as MigrationErrorCode))) {
        return bad('violation', `expected ${e.codes.join('|')}${e.orOk ? ' or success' : ''}, got ${outcome}: ${err?.message ?? ''}`);
      }
    }
  }

  // memory: what the stream could have written, nothing else
  // A failed migration may leave the page record it stopped in half written (QEMU too).
  const budget = c.muts.some((m) => m.syncMove) ? Infinity : c.muts.reduce((a, m) => a + m.budget, 0) + (o.kind === 'completed' ? 0 : 1);
  const benign = c.muts.every((m) => m.expect.kind === 'benign');
  const sameBlocks = r.mig.blocks.blocks.length === ref.blockList.length && r.mig.blocks.blocks.every((b, i) => b.idstr === ref.blockList[i]!.idstr && b.usedLength === ref.blockList[i]!.usedLength);
  if (seed.colo) {
    // COLO: every checkpoint before the damage committed; if the session ended in the damaged
    // checkpoint, the committed image is the previous one exactly.
    const c0 = damage.min;
    if (c0 >= 1 && r.committed < c0 - 1) return bad('violation', `damage in checkpoint ${c0}, but only checkpoint ${r.committed} is committed`);
    if (r.committed > ref.committed) return bad('violation', `committed checkpoint ${r.committed} beyond the ${ref.committed} the stream holds`);
    if (r.committed >= 0) {
      const img = r.image;
      if (!img) return bad('violation', `no committed image for checkpoint ${r.committed}`);
      if (img.checkpoint !== r.committed) return bad('violation', `image of checkpoint ${img.checkpoint}, committedCheckpoint ${r.committed}`);
      const want = ref.images.get(r.committed)!;
      const exact = benign || (c0 >= 1 && r.committed === c0 - 1) || r.committed < c0;
      if (sameBlocks) {
        let n = 0;
        for (const b of img.blocks) n += diffPages(Buffer.from(imageBlockBytes(b)), want.blocks.get(b.idstr)!, false, budget + 1);
        if (exact && n > 0) return bad('violation', `committed checkpoint ${r.committed} differs from the reference in ${n} page(s)`);
        if (n > budget) return bad('violation', `committed checkpoint ${r.committed}: ${n} page(s) differ, more than the ${budget} the mutations can touch`);
      } else if (exact && !c.muts.some((m) => m.changesBlocks)) return bad('violation', 'block list of the committed image changed');
      if ((exact || r.committed > damage.max) && !img.deviceState.equals(want.device)) return bad('violation', `device state of checkpoint ${r.committed} differs from the reference`);
    }
  }
  // After a failure, page writes already handed to the pool may still be running (the outcome
  // does not wait for them: the image of a failed initial migration is worthless anyway). A
  // page read while a worker copies it looks torn, so a count over budget is taken again once
  // they are done.
  const guestDiff = async (allowZero: boolean): Promise<number> => {
    const count = () => r.mig.blocks.blocks.reduce((n, b) => n + diffPages(Buffer.from(b.denseCopy()), ref.images.get(0)!.blocks.get(b.idstr)!, allowZero, budget + 1), 0);
    const n = count();
    if (n <= budget || o.kind === 'completed' || seed.channels === 0) return n;
    await new Promise((res) => setTimeout(res, 200));
    return count();
  };
  if (seed.colo && r.committed < 0 && sameBlocks && seed.pagesOnce) {
    // COLO, failed in the initial migration: what is in guest memory is checkpoint 0 or untouched
    const n = await guestDiff(true);
    if (n > budget) return bad('violation', `initial migration: ${n} page(s) hold data the stream could not have put there (budget ${budget})`);
  } else if (!seed.colo && sameBlocks) {
    // precopy: every page is the final one or untouched (a paused source sends each page once)
    const want = ref.images.get(0)!;
    const done = o.kind === 'completed';
    if (done || seed.pagesOnce) {
      const n = await guestDiff(!done);
      if (benign && n > 0) return bad('violation', `${n} page(s) differ from the unmutated run`);
      if (n > budget) return bad('violation', `${n} page(s) hold data the stream could not have put there (budget ${budget})`);
    }
    if (benign && done && r.image && !r.image.deviceState.equals(want.device)) return bad('violation', 'device state differs from the unmutated run');
  }
  return { ...base, verdict: 'ok', outcome, code, ...(where ? { where, unplaced } : {}) };
}

// ------------------------------------------------------------------------------------------
// a campaign

export interface FuzzStats {
  cases: number;
  crashes: number;
  /** Hangs no known receiver issue explains. */
  hangs: number;
  /** Every case that missed its deadline. */
  hangsIncludingKnown: number;
  violations: number;
  outcomes: Record<string, number>;
  codes: Record<string, number>;
  mutations: Record<string, number>;
  noChannelOrOffset: Record<string, number>;
  findings: CaseReport[];
  /** Cases and mean milliseconds per seed. */
  perSeed: Record<string, { cases: number; meanMs: number }>;
  perOutcome: Record<string, { cases: number; meanMs: number }>;
  /** Findings explained by a known receiver issue, per issue. */
  known: Record<string, number>;
  knownExamples: CaseReport[];
  seconds: number;
  casesPerSecond: number;
  unhandled: string[];
  /** Event-loop delay over the campaign (ms): all cases share one loop. */
  loopDelay: { p50: number; p99: number; max: number };
}

export interface CampaignOptions {
  seeds: Seed[];
  pool: PagePool;
  cases: number;
  seconds: number;
  seed: number;
  jobs: number;
  onProgress?: (s: FuzzStats) => void;
  progressEveryMs?: number;
  /** Scales every seed's io and heartbeat timeouts (cases that end in a timeout cost that long). */
  timeoutScale?: number;
}

/** Loads every seed, records the synthetic ones, calibrates all of them. */
export async function buildCorpus(pool: PagePool, opts: { captures?: boolean; synthetic?: boolean; log?: (s: string) => void } = {}): Promise<Seed[]> {
  const seeds: Seed[] = [];
  if (opts.captures !== false) seeds.push(...loadCaptures(), ...loadCaptures(CAPTURES_QEMU10_DIR, '10.x'));
  if (opts.synthetic !== false) for (const spec of syntheticSpecs()) seeds.push(await recordSynthetic(spec, pool));
  for (const s of seeds) {
    s.ref = await calibrate(s, pool);
    s.struct = analyze(s);
    const st = s.struct;
    opts.log?.(`seed ${s.name}: ${s.conns.map((c) => `${c.role} ${c.data.length} B`).join(', ')}; ${s.ref.outcome.kind}${s.ref.outcome.code ? `:${s.ref.outcome.code}` : ''}, checkpoint ${s.ref.committed}; `
      + `${st.ramRecords.length} ram records, ${st.packets.length} packets, ${st.sectionHeaders.length} section headers, ${st.memSize?.entries.length ?? 0} MEM_SIZE entries, `
      + `${st.vmstateSize.length} VMSTATE_SIZE, ${st.coloMsgs.length} COLO messages, vmdesc ${st.vmdesc ? 'found' : 'none'}, config ${st.config ? 'found' : 'none'}; replay ${s.ref.ms.toFixed(0)} ms`);
  }
  return seeds;
}

export async function campaign(o: CampaignOptions): Promise<FuzzStats> {
  const st: FuzzStats = { cases: 0, crashes: 0, hangs: 0, hangsIncludingKnown: 0, violations: 0, outcomes: {}, codes: {}, mutations: {}, noChannelOrOffset: {}, findings: [], perSeed: {}, perOutcome: {}, known: {}, knownExamples: [], seconds: 0, casesPerSecond: 0, unhandled: [], loopDelay: { p50: 0, p99: 0, max: 0 } };
  const t0 = performance.now();
  const h = monitorEventLoopDelay({ resolution: 10 });
  h.enable();
  const until = t0 + o.seconds * 1000;
  const inflight = new Set<FuzzCase>();
  const onUnhandled = (e: unknown): void => {
    st.unhandled.push(`${e instanceof Error ? `${e.name}: ${e.message}` : String(e)} (cases in flight: ${[...inflight].map((c) => c.rngSeed).join(', ')})`);
    st.crashes++;
  };
  process.on('unhandledRejection', onUnhandled);
  process.on('uncaughtException', onUnhandled);
  let next = 0;
  let lastProgress = t0;
  const master = new Prng(o.seed);
  const seedsOfCases: number[] = [];
  const nextSeed = (): number => { const s = master.u32(); seedsOfCases.push(s); return s; };
  async function lane(): Promise<void> {
    while (next < o.cases && performance.now() < until) {
      const c = makeCase(next++, nextSeed(), o.seeds);
      inflight.add(c);
      let rep: CaseReport;
      try {
        const k = o.timeoutScale ?? 1;
        rep = await runCase(c, o.pool, { ioTimeoutMs: Math.round(c.seed.ioTimeoutMs * k), heartbeatTimeoutMs: Math.round(c.seed.heartbeatTimeoutMs * k) });
      } catch (e) {
        rep = { id: c.id, seed: c.seed.name, muts: c.muts.map((m) => m.name), verdict: 'crash', outcome: 'harness-error', code: null, committed: -2, detail: e instanceof Error ? e.stack ?? e.message : String(e), ms: 0, rngSeed: c.rngSeed };
      }
      inflight.delete(c);
      st.cases++;
      st.outcomes[rep.outcome] = (st.outcomes[rep.outcome] ?? 0) + 1;
      const po = st.perOutcome[rep.outcome] ??= { cases: 0, meanMs: 0 };
      po.meanMs = Math.round((po.meanMs * po.cases + rep.ms) / (po.cases + 1) * 10) / 10;
      po.cases++;
      const ps = st.perSeed[rep.seed] ??= { cases: 0, meanMs: 0 };
      ps.meanMs = Math.round((ps.meanMs * ps.cases + rep.ms) / (ps.cases + 1) * 10) / 10;
      ps.cases++;
      if (rep.code) st.codes[rep.code] = (st.codes[rep.code] ?? 0) + 1;
      if (rep.code && rep.unplaced) st.noChannelOrOffset[rep.code] = (st.noChannelOrOffset[rep.code] ?? 0) + 1;
      for (const m of rep.muts) st.mutations[m] = (st.mutations[m] ?? 0) + 1;
      if (rep.verdict === 'crash') st.crashes++;
      if (rep.verdict === 'hang') st.hangs++;
      if (rep.outcome === 'hang') st.hangsIncludingKnown++;
      if (rep.verdict === 'violation') st.violations++;
      if (rep.verdict === 'known') {
        st.known[rep.known!] = (st.known[rep.known!] ?? 0) + 1;
        if (st.knownExamples.filter((k) => k.known === rep.known).length < 3) st.knownExamples.push(rep);
      } else if (rep.verdict !== 'ok' && st.findings.length < 200) st.findings.push(rep);
      if (o.onProgress && performance.now() - lastProgress > (o.progressEveryMs ?? 10_000)) {
        lastProgress = performance.now();
        st.seconds = (lastProgress - t0) / 1000;
        st.casesPerSecond = st.cases / st.seconds;
        o.onProgress(st);
      }
    }
  }
  try {
    await Promise.all(Array.from({ length: o.jobs }, () => lane()));
  } finally {
    // late rejections of the last cases still count
    await new Promise((r) => setTimeout(r, 50));
    process.off('unhandledRejection', onUnhandled);
    process.off('uncaughtException', onUnhandled);
  }
  h.disable();
  st.loopDelay = { p50: h.percentile(50) / 1e6, p99: h.percentile(99) / 1e6, max: h.max / 1e6 };
  st.seconds = (performance.now() - t0) / 1000;
  st.casesPerSecond = st.cases / st.seconds;
  return st;
}

/** Re-runs one case by its rngSeed (from a report), for debugging. */
export async function replayCase(rngSeed: number, seeds: Seed[], pool: PagePool): Promise<{ report: CaseReport; c: FuzzCase }> {
  const c = makeCase(0, rngSeed, seeds);
  return { report: await runCase(c, pool), c };
}
