// A synthetic QEMU migration source and COLO primary over TCP. It plays migration_thread() for
// the initial precopy migration and colo_do_checkpoint_transaction() for each checkpoint, with
// the bytes of a 7.2 or a 10.x source (spec §4.5, §5.3, §5.4), and can cut the session at an
// exact byte for fault injection.

import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { MigrationError } from '../errors.js';
import {
  COLO_MESSAGE_CHECKPOINT_READY,
  COLO_MESSAGE_CHECKPOINT_REPLY,
  COLO_MESSAGE_CHECKPOINT_REQUEST,
  COLO_MESSAGE_NAMES,
  COLO_MESSAGE_VMSTATE_LOADED,
  COLO_MESSAGE_VMSTATE_RECEIVED,
  COLO_MESSAGE_VMSTATE_SEND,
  MIG_CMD_SWITCHOVER_START,
} from '../wire/constants.js';
import { DeviceState } from './device-state.js';
import { Link, MainChannel, SourceKilled, Wire } from './link.js';
import { MemoryModel, type DirtySet, type MemoryModelOptions, type Workload } from './memory-model.js';
import { encodeMultiFDInit, NoCompEncoder, type MultiFDEncoder } from './multifd-builder.js';
import { ZlibEncoder, ZstdEncoder } from './multifd-compress.js';
import { Prng } from './prng.js';
import {
  QUIRKS_72_ALL,
  QUIRKS_72_NONE,
  RamSaver,
  type Layout,
  type Quirks72,
  type SyncScheme,
} from './ram-saver.js';

/** Where to cut the session: after `byteOffset` bytes of the precopy migration or of checkpoint N (0-based). */
export interface KillAt {
  checkpoint: number | 'precopy';
  /**
   * Bytes of that segment, counted over main and multifd channels in send order. A checkpoint
   * starts with its CHECKPOINT_REQUEST; the precopy segment with the first byte of any channel.
   */
  byteOffset: number;
}

/** Reported after each committed checkpoint (VMSTATE_LOADED received). */
export interface CheckpointInfo {
  index: number;
  /** Distinct pages sent in the checkpoint. */
  dirtyPages: number;
  /** Of those, pages sent as zero pages. */
  zeroPages: number;
  /** Bytes written for the checkpoint, all channels, REQUEST through the blob. */
  bytes: number;
  /** The guest writes of the interval before the checkpoint. */
  pages: DirtySet;
  blobLength: number;
  /**
   * The guest memory the checkpoint committed: valid until the next checkpoint starts (after
   * onCheckpoint resolves). `model.snapshot()` keeps a copy.
   */
  model: MemoryModel;
}

/** Options of SyntheticSource. */
export interface SyntheticSourceOptions {
  port: number;
  host?: string;
  /** Default '7.2'. */
  layout?: Layout;
  /** Multifd channels, 0 (multifd off, default) to 16. */
  channels?: number;
  /** Default 'per-section' for 7.2 (the only one it has), 'per-round' for 10.x. */
  syncScheme?: SyncScheme;
  /** 10.x only (zero-page-detection=multifd). Default true for 10.x, false for 7.2. */
  zeroPagesInMultifd?: boolean;
  /** Send ENABLE_COLO and act as COLO primary after the migration. Default false. */
  colo?: boolean;
  /** PART sections of the precopy migration. Default 2. */
  iterations?: number;
  /** Source UUID for MultiFDInit_t; default all zero. */
  uuid?: Uint8Array;
  /** multifd-compression: 'none' (default), 'zlib' or 'zstd' at level 1, one stream per channel (spec §2.5). */
  compression?: 'none' | 'zlib' | 'zstd';
  /** Per-channel payload encoder factory; overrides `compression`. */
  encoders?: (channelId: number) => MultiFDEncoder;
  /** Send VMDESCRIPTION after the EOF. Default true. */
  sendVmdesc?: boolean;
  /** 10.x: MIG_CMD_SWITCHOVER_START before completion and in every checkpoint. Default true for 10.x. */
  switchoverStart?: boolean;
  /** Default 'pc-i440fx-7.2' / 'pc-i440fx-10.0'. */
  machineType?: string;
  /** 7.2 quirks of spec §2.9: true (default), false, or per quirk. Ignored for 10.x. */
  quirks?: boolean | Partial<Quirks72>;
  /** Chance of each "sometimes" quirk when it can happen. Default 0.25. */
  quirkRate?: number;
  /** Seeds the model, the devices and the quirks unless those are given. Default 1. */
  seed?: number;
  model?: MemoryModel;
  memory?: MemoryModelOptions;
  devices?: DeviceState;
  /** Guest writes between PART sections and before completion. Default none. */
  precopyWorkload?: Workload;
  /** COLO checkpoints to run (colo only). Default 0. */
  checkpoints?: number;
  /** Guest writes before each checkpoint. Default 'idle'. */
  workload?: Workload;
  /** Pause before each checkpoint (x-checkpoint-delay). Default 0. */
  intervalMs?: number;
  killAt?: KillAt;
  onBeforeCheckpoint?: (index: number) => void | Promise<void>;
  onCheckpoint?: (info: CheckpointInfo) => void | Promise<void>;
  /** Section id of `ram`. Default 2 (as in the 7.2 captures). */
  ramSectionId?: number;
  /** Order in which multifd channel ids connect. Default 0..N-1. */
  connectOrder?: number[];
  /** Per-socket unsent bytes before the sender waits. Default 8 MiB. */
  maxBufferedBytes?: number;
  /** Main-channel staging before a flush (QEMUFile's buffer). Default 32 KiB. */
  mainFlushBytes?: number;
}

/** How run() ended. */
export interface SourceResult {
  /** True if killAt cut the session. */
  killed: boolean;
  /** Checkpoints committed. */
  checkpoints: number;
  /** Bytes written over the session, all channels. */
  bytesSent: number;
}

const LAYOUTS: readonly Layout[] = ['7.2', '10.x'];

/**
 * A QEMU-exact synthetic migration source / COLO primary.
 *
 * Events: 'connected' (), 'precopy' ({ bytes, pages, zeroPages }), 'checkpointStart'
 * ({ index, bytesBefore, mainBytesBefore }: session / main-channel bytes before its first byte), 'checkpoint' (CheckpointInfo), 'killed' ({ segment, byteOffset }).
 */
export class SyntheticSource extends EventEmitter {
  readonly model: MemoryModel;
  readonly devices: DeviceState;
  readonly #o: Required<Pick<SyntheticSourceOptions, 'host' | 'port' | 'layout' | 'channels' | 'syncScheme'
    | 'zeroPagesInMultifd' | 'colo' | 'iterations' | 'sendVmdesc' | 'switchoverStart' | 'machineType' | 'quirkRate'
    | 'checkpoints' | 'workload' | 'intervalMs' | 'ramSectionId' | 'maxBufferedBytes' | 'mainFlushBytes'>>;
  readonly #opts: SyntheticSourceOptions;
  readonly #quirks: Quirks72;
  readonly #connectOrder: number[];
  readonly #wire = new Wire();
  readonly #main: MainChannel;
  #reader: ColoReader | undefined;
  #committed = 0;
  #segment: number | 'precopy' = 'precopy';

  constructor(opts: SyntheticSourceOptions) {
    super();
    const layout = opts.layout ?? '7.2';
    if (!LAYOUTS.includes(layout)) throw new RangeError(`options.layout must be '7.2' or '10.x'`);
    if (!Number.isInteger(opts.port) || opts.port < 1 || opts.port > 65535) {
      throw new RangeError('options.port must be an integer in 1..65535');
    }
    const channels = opts.channels ?? 0;
    if (!Number.isInteger(channels) || channels < 0 || channels > 16) {
      throw new RangeError('options.channels must be an integer in 0..16');
    }
    const syncScheme = opts.syncScheme ?? (layout === '7.2' ? 'per-section' : 'per-round');
    if (syncScheme !== 'per-section' && syncScheme !== 'per-round') {
      throw new RangeError(`options.syncScheme must be 'per-section' or 'per-round'`);
    }
    if (layout === '7.2' && syncScheme === 'per-round') {
      throw new RangeError('options.syncScheme per-round needs layout 10.x: a 7.2 source syncs at every EOS');
    }
    const zeroPagesInMultifd = opts.zeroPagesInMultifd ?? layout === '10.x';
    if (layout === '7.2' && zeroPagesInMultifd) {
      throw new RangeError('options.zeroPagesInMultifd needs layout 10.x: 7.2 packets have no zero_pages');
    }
    const switchoverStart = opts.switchoverStart ?? layout === '10.x';
    if (layout === '7.2' && switchoverStart) {
      throw new RangeError('options.switchoverStart needs layout 10.x: 7.2 has no MIG_CMD_SWITCHOVER_START');
    }
    const iterations = opts.iterations ?? 2;
    if (!Number.isInteger(iterations) || iterations < 0) throw new RangeError('options.iterations must be an integer >= 0');
    if (!['none', 'zlib', 'zstd'].includes(opts.compression ?? 'none')) throw new RangeError(`options.compression must be 'none', 'zlib' or 'zstd'`);
    const quirkRate = opts.quirkRate ?? 0.25;
    if (!(quirkRate >= 0 && quirkRate <= 1)) throw new RangeError('options.quirkRate must be in 0..1');
    const colo = opts.colo ?? false;
    const checkpoints = opts.checkpoints ?? 0;
    if (!Number.isInteger(checkpoints) || checkpoints < 0) throw new RangeError('options.checkpoints must be an integer >= 0');
    if (checkpoints > 0 && !colo) throw new RangeError('options.checkpoints needs options.colo');
    if (opts.uuid !== undefined && opts.uuid.length !== 16) throw new RangeError('options.uuid must be 16 bytes');
    const k = opts.killAt;
    if (k !== undefined) {
      if (!Number.isInteger(k.byteOffset) || k.byteOffset < 0) throw new RangeError('options.killAt.byteOffset must be an integer >= 0');
      if (k.checkpoint !== 'precopy' && !(Number.isInteger(k.checkpoint) && k.checkpoint >= 0)) {
        throw new RangeError(`options.killAt.checkpoint must be 'precopy' or an integer >= 0`);
      }
    }
    const order = opts.connectOrder ?? Array.from({ length: channels }, (_, i) => i);
    if (order.length !== channels || [...order].sort((a, b) => a - b).some((v, i) => v !== i)) {
      throw new RangeError('options.connectOrder must be a permutation of the channel ids');
    }
    const seed = opts.seed ?? 1;
    this.#opts = opts;
    this.#connectOrder = order;
    this.#quirks = layout === '10.x' ? { ...QUIRKS_72_NONE }
      : opts.quirks === false ? { ...QUIRKS_72_NONE }
      : opts.quirks === true || opts.quirks === undefined ? { ...QUIRKS_72_ALL }
      : { ...QUIRKS_72_ALL, ...opts.quirks };
    this.#o = {
      host: opts.host ?? '127.0.0.1', port: opts.port, layout, channels, syncScheme, zeroPagesInMultifd, colo,
      iterations, sendVmdesc: opts.sendVmdesc ?? true, switchoverStart,
      machineType: opts.machineType ?? (layout === '7.2' ? 'pc-i440fx-7.2' : 'pc-i440fx-10.0'),
      quirkRate, checkpoints, workload: opts.workload ?? 'idle', intervalMs: opts.intervalMs ?? 0,
      ramSectionId: opts.ramSectionId ?? 2, maxBufferedBytes: opts.maxBufferedBytes ?? 8 * 1024 * 1024,
      mainFlushBytes: opts.mainFlushBytes ?? 32 * 1024,
    };
    this.model = opts.model ?? new MemoryModel({ seed, ...opts.memory });
    this.devices = opts.devices ?? new DeviceState({ seed: seed + 1 });
    this.#main = new MainChannel(this.#wire, this.#o.mainFlushBytes);
  }

  /** Bytes written so far, all channels. */
  get bytesSent(): number {
    return this.#wire.total;
  }

  /** Bytes written so far per link: [main, multifd id 0, id 1, ...]. */
  linkBytes(): number[] {
    const out = new Array<number>(this.#o.channels + 1).fill(0);
    const links = this.#wire.links;
    if (links.length > 0) out[0] = links[0]!.bytes;
    // links[1..] are in connect order; report them by channel id.
    for (let i = 0; i < this.#connectOrder.length; i++) out[1 + this.#connectOrder[i]!] = links[1 + i]?.bytes ?? 0;
    return out;
  }

  /**
   * Connect, migrate, and (colo) run the checkpoints. Resolves `{ killed: true }` when killAt
   * fired; rejects with a MigrationError when the peer misbehaves or goes away.
   */
  async run(): Promise<SourceResult> {
    try {
      this.#wire.beginSegment(this.#cutFor('precopy'));
      const ram = await this.#connect();
      await this.#precopy(ram);
      if (this.#o.colo) await this.#coloPrimary(ram);
      await this.#finish();
      return { killed: false, checkpoints: this.#committed, bytesSent: this.#wire.total };
    } catch (err) {
      if (err instanceof SourceKilled || this.#wire.killed) {
        await this.#wire.afterKill();
        this.emit('killed', { segment: this.#segment, byteOffset: this.#wire.segmentBytes });
        return { killed: true, checkpoints: this.#committed, bytesSent: this.#wire.total };
      }
      this.#wire.destroyAll();
      throw err;
    }
  }

  /** Abort: destroy every socket. */
  close(): void {
    this.#wire.destroyAll();
  }

  #cutFor(segment: number | 'precopy'): { byteOffset: number } | undefined {
    const k = this.#opts.killAt;
    return k !== undefined && k.checkpoint === segment ? { byteOffset: k.byteOffset } : undefined;
  }

  // The main connection first, then the multifd ones, each starting with its MultiFDInit_t.
  async #connect(): Promise<RamSaver> {
    const o = this.#o, wire = this.#wire;
    wire.links.push(new Link(await connect(o.host, o.port, 'main'), 'main', o.maxBufferedBytes));
    this.#reader = new ColoReader(wire.links[0]!);
    const linkOf: number[] = [];
    for (const id of this.#connectOrder) {
      const label = `multifd/${id}`;
      const link = new Link(await connect(o.host, o.port, label), label, o.maxBufferedBytes);
      link.socket.resume();               // nothing comes back on a multifd channel; notice EOF anyway
      linkOf[id] = wire.links.length;
      wire.links.push(link);
      wire.send(linkOf[id]!, encodeMultiFDInit({ uuid: this.#opts.uuid, id }));
    }
    this.emit('connected');
    const seed = this.#opts.seed ?? 1;
    return new RamSaver(wire, this.#main, this.model, {
      layout: o.layout, syncScheme: o.syncScheme, sectionId: o.ramSectionId,
      multifd: o.channels === 0 ? undefined : {
        links: linkOf,
        encoders: linkOf.map((_, id) => this.#opts.encoders?.(id) ?? defaultEncoder(this.#opts.compression ?? 'none')),
        quirks: this.#quirks, quirkRate: o.quirkRate, prng: new Prng(seed + 2),
        zeroPagesInMultifd: o.zeroPagesInMultifd,
      },
    });
  }

  // migration_thread(): header, setup, iterations, completion, device state, EOF, vmdesc.
  async #precopy(ram: RamSaver): Promise<void> {
    const o = this.#o, b = this.#main.builder, pw = this.#opts.precopyWorkload;
    b.fileHeader().configuration(o.machineType);
    if (o.colo) b.enableColo();
    ram.markAll();
    await ram.setup();
    const budget = Math.ceil(this.model.totalPages / Math.max(1, o.iterations));
    for (let k = 0; k < o.iterations; k++) {
      if (k > 0 && pw !== undefined) ram.mark(this.model.dirty(pw));
      await ram.part(budget);
    }
    if (pw !== undefined && o.iterations > 0) ram.mark(this.model.dirty(pw));
    if (o.switchoverStart) b.command(MIG_CMD_SWITCHOVER_START);
    await ram.complete();
    this.devices.writeFullSections(b).eof();
    if (o.sendVmdesc) b.vmdescription(this.devices.vmdescription());
    await this.#main.flush();
    this.emit('precopy', { bytes: this.#wire.segmentBytes, pages: ram.stats.pages, zeroPages: ram.stats.zeroPages });
  }

  // colo_process_checkpoint(): wait for the secondary, then one transaction per checkpoint.
  async #coloPrimary(ram: RamSaver): Promise<void> {
    const o = this.#o, reader = this.#reader!, b = this.#main.builder;
    await reader.expect(COLO_MESSAGE_CHECKPOINT_READY);
    for (let i = 0; i < o.checkpoints; i++) {
      await this.#opts.onBeforeCheckpoint?.(i);
      if (o.intervalMs > 0) await sleep(o.intervalMs);
      const pages = this.model.dirty(o.workload);
      ram.mark(pages);
      const blob = this.devices.nextColoBlob();
      this.#segment = i;
      this.#wire.beginSegment(this.#cutFor(i));
      ram.resetStats();
      this.emit('checkpointStart', { index: i, bytesBefore: this.#wire.total, mainBytesBefore: this.#wire.links[0]!.bytes });

      b.coloMessage(COLO_MESSAGE_CHECKPOINT_REQUEST);
      await this.#main.flush();
      await reader.expect(COLO_MESSAGE_CHECKPOINT_REPLY);
      b.coloMessage(COLO_MESSAGE_VMSTATE_SEND);
      if (o.switchoverStart) b.command(MIG_CMD_SWITCHOVER_START);
      // qemu_savevm_live_state(): the END sections and an EOF; then the buffered device state.
      await ram.complete();
      b.eof().vmstateSize(blob.length).raw(blob);
      await this.#main.flush();
      await reader.expect(COLO_MESSAGE_VMSTATE_RECEIVED);
      await reader.expect(COLO_MESSAGE_VMSTATE_LOADED);

      this.#committed++;
      const info: CheckpointInfo = {
        index: i, dirtyPages: ram.stats.pages, zeroPages: ram.stats.zeroPages, bytes: this.#wire.segmentBytes,
        pages, blobLength: blob.length, model: this.model,
      };
      this.emit('checkpoint', info);
      await this.#opts.onCheckpoint?.(info);
    }
  }

  // The migration (or COLO session) is over: close every connection once its bytes are out.
  async #finish(): Promise<void> {
    await Promise.all(this.#wire.links.map((l) => new Promise<void>((resolve) => {
      if (l.socket.destroyed) { resolve(); return; }
      l.socket.end(() => resolve());
      l.socket.once('close', () => resolve());
    })));
  }
}

function connect(host: string, port: number, label: string): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port });
    const onError = (err: Error): void => {
      reject(new MigrationError('ERR_PEER', `${label}: connect to ${host}:${port} failed: ${err.message}`, label, undefined, { cause: err }));
    };
    s.once('error', onError);
    s.once('connect', () => { s.off('error', onError); resolve(s); });
  });
}

/** COLO messages from the secondary: raw be32 values on the main connection (spec §5.2). */
class ColoReader {
  readonly #values: number[] = [];
  #partial = Buffer.alloc(0);
  #waiter: { resolve: (v: number) => void; reject: (e: Error) => void } | undefined;
  #failed: Error | undefined;

  constructor(link: Link) {
    link.socket.on('data', (chunk: Buffer) => this.#push(chunk));
    void link.whenFailed().then((err) => {
      this.#failed = err;
      const w = this.#waiter;
      this.#waiter = undefined;
      w?.reject(err);
    });
  }

  /** Next message, which must be `want`. */
  async expect(want: number): Promise<void> {
    const got = await this.#next();
    if (got !== want) {
      throw new MigrationError('ERR_COLO_PROTOCOL',
        `colo: received ${messageName(got)}, expected ${messageName(want)}`, 'main');
    }
  }

  #next(): Promise<number> {
    const v = this.#values.shift();
    if (v !== undefined) return Promise.resolve(v);
    if (this.#failed !== undefined) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => { this.#waiter = { resolve, reject }; });
  }

  #push(chunk: Buffer): void {
    let buf = this.#partial.length > 0 ? Buffer.concat([this.#partial, chunk]) : chunk;
    for (; buf.length >= 4; buf = buf.subarray(4)) this.#values.push(buf.readUInt32BE(0));
    this.#partial = Buffer.from(buf);
    const w = this.#waiter;
    const v = w === undefined ? undefined : this.#values.shift();
    if (w !== undefined && v !== undefined) { this.#waiter = undefined; w.resolve(v); }
  }
}

function messageName(v: number): string {
  return COLO_MESSAGE_NAMES[v] ?? `invalid message ${v}`;
}

// A channel's encoder for multifd-compression at its default level (multifd-zlib-level and
// multifd-zstd-level are 1).
function defaultEncoder(method: 'none' | 'zlib' | 'zstd'): MultiFDEncoder {
  return method === 'zlib' ? new ZlibEncoder() : method === 'zstd' ? new ZstdEncoder() : new NoCompEncoder();
}
