import { randomUUID } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { readFileSync } from 'node:fs';
import type { Duplex } from 'node:stream';

/**
 * What a channel needs from its connection: a net.Socket in production; any Duplex (an
 * in-memory pair) for fuzzing, where setNoDelay/setTimeout do not exist.
 */
export type Transport = Duplex & { setNoDelay?: (b: boolean) => unknown; setTimeout?: (ms: number, cb?: () => void) => unknown };
type Socket = Transport;
/** A channel's connection: a Transport, or a multifd socket read by its own thread. */
type Conn = Transport | ThreadedSocket;
import { performance } from 'node:perf_hooks';
import type { DecodeTask } from '../compression/decoder.js';
import { MigrationError, toMigrationError, wireError } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { WRITE_BOTH, WRITE_CACHE, WRITE_GUEST, type WriteMode, type WriteTask } from '../memory/page-writer.js';
import { RAMBlockList, type RAMBlock } from '../memory/ram-block.js';
import { chunkSlotBitsFor, Slab } from '../memory/slab.js';
import { adoptForDirectRead } from '../net/direct-read.js';
import { adoptForThreadedRead, type ThreadedSocket } from '../net/threaded-read.js';
import { QueueReader } from '../wire/queue-reader.js';
import { DecoderThread, PagePool } from '../pool/page-pool.js';
import { ByteQueue } from '../wire/byte-queue.js';
import { MIG_CMD_ENABLE_COLO, MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MIG_RP_MSG_PONG, MIG_RP_MSG_SHUT, TARGET_PAGE_SIZE } from '../wire/constants.js';
import { be32 } from '../wire/reader.js';
import { CheckpointStats } from './checkpoint-stats.js';
import { ColoIncoming, ioTurn, type ColoPhase } from './colo.js';
import type { CommittedImage } from './committed-image.js';
import { DEFAULT_LIMITS, type Limits } from './limits.js';
import type { CheckpointParticipant } from './participant.js';
import { MultiFDChannel, type ChannelSink } from './multifd-channel.js';
import { MultifdSync } from './multifd-sync.js';
import type { Compression, MultiFDInit } from './multifd-packet.js';
import { RamSectionParser, type RamSink } from './ram-section.js';
import { VmStateParser, type SectionHeader, type VmStateSink } from './vmstate-stream.js';

export interface IncomingOptions {
  /** multifd-channels of the source; undefined: learn it at the first barrier (spec §1.1). */
  multifdChannels?: number | undefined;
  compression?: Compression;
  /** Enter COLO mode even without ENABLE_COLO (spec §5.1). */
  colo?: boolean;
  /** Expect VMDESCRIPTION after the initial EOF (x86 pc/q35 always send it; spec §8.10). */
  expectVmdesc?: boolean;
  /** Page-writer threads (default: all cores). */
  threads?: number;
  limits?: Partial<Limits>;
  /** Refuse multifd channels whose handshake uuid differs (hex, 32 digits, dashes allowed). */
  expectUuid?: string | undefined;
  /** A peer silent this long in the middle of a record or checkpoint fails the migration. */
  ioTimeoutMs?: number;
  /**
   * COLO: no checkpoint for this long means the primary is gone (failover). 0 disables.
   * 'auto': HEARTBEAT_AUTO_FIRST_MS until two idle gaps were seen, then 3x the longest of the
   * last eight (at least HEARTBEAT_AUTO_MIN_MS): follows x-checkpoint-delay without a setting.
   */
  heartbeatTimeoutMs?: number | 'auto';
  log?: Logger;
  /** A page pool shared with other migrations (fuzzing, soak); not closed by close(). */
  pool?: PagePool;
  /** Staging slots (1 MiB each) per multifd channel: bounds memory per channel. */
  slotsPerChannel?: number;
  /** Committed with every checkpoint and told the ending (replicated disks, src/disk). */
  participants?: CheckpointParticipant[];
  /**
   * Cap on guest page memory (the slab), bytes: a checkpoint that would need more fails with
   * ERR_LIMIT and the committed one is kept (--max-memory).
   */
  maxMemoryBytes?: number;
}

export type Outcome =
  | { kind: 'completed' }                                     // precopy finished
  | { kind: 'primary-lost'; reason: string; error?: MigrationError }  // COLO ended by the peer
  | { kind: 'failed'; error: MigrationError };


/** VmHWM, VmRSS (/proc/self/status) and AnonHugePages (smaps_rollup), bytes. */
function procMemory(): { vmHWMBytes: number; vmRSSBytes: number; anonHugePagesBytes: number } {
  const kb = (k: string, text: string) => 1024 * Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(text)?.[1] ?? 0);
  let st = '', sm = '';
  try { st = readFileSync('/proc/self/status', 'utf8'); } catch { /* not Linux */ }
  try { sm = readFileSync('/proc/self/smaps_rollup', 'utf8'); } catch { /* not Linux */ }
  return { vmHWMBytes: kb('VmHWM', st), vmRSSBytes: kb('VmRSS', st), anonHugePagesBytes: kb('AnonHugePages', sm) };
}
export { HEARTBEAT_AUTO_FIRST_MS, HEARTBEAT_AUTO_MIN_MS } from './colo.js';
/** Longest wait for the multifd channels' EOF after a precopy migration's last byte. */
const DRAIN_GRACE_MS = 2000;

// 'settling': the stream's end was parsed, one I/O turn before the at-rest check;
// 'draining': precopy sent its last byte, waiting for the multifd channels' EOF;
// the COLO phases ('colo-idle' ... 'committing') are driven by colo.ts.
type Phase = 'savevm' | 'vmdesc' | 'settling' | 'draining' | ColoPhase | 'done';

/** Phases in which the main channel's silence is not the peer's fault: we are committing or waiting. */
const MAIN_WAITS_ON_US: ReadonlySet<Phase> = new Set<Phase>(['colo-idle', 'done', 'committing', 'colo-check', 'settling', 'draining']);

/** Phases in which a multifd packet with pages or a SYNC may arrive (COLO: after our CHECKPOINT_REPLY). */
const MULTIFD_OPEN: ReadonlySet<Phase> = new Set<Phase>(['savevm', 'colo-send']);

/**
 * One incoming migration (cf. MigrationIncomingState): owns the channels, the page pool and
 * guest memory, the phase and the main channel's pump; the barriers run in MultifdSync
 * (multifd-sync.ts), the COLO secondary's checkpoint state machine (spec §5.3) in ColoIncoming
 * (colo.ts). Errors from any part end here, in `#endWith`, once.
 */
export class IncomingMigration extends EventEmitter {
  readonly blocks = new RAMBlockList();
  readonly limits: Limits;
  readonly log: Logger;
  readonly pool: PagePool;
  readonly stats = new CheckpointStats();
  readonly channels: MultiFDChannel[] = [];
  readonly #byId = new Map<number, MultiFDChannel>();
  readonly #opts: IncomingOptions;
  readonly #mainQ = new ByteQueue();
  readonly #ram: RamSectionParser;
  readonly #vm: VmStateParser;
  #main: Socket | null = null;
  #mainEnded = false;
  #phase: Phase = 'savevm';
  #colo: boolean;
  #returnPath = false;
  #initialDone = false;
  #syncScheme: 'unknown' | 'per-section' | 'per-round' = 'unknown';
  #drainTimer: NodeJS.Timeout | null = null;
  #machine = '';
  #configRaw: Buffer | null = null;
  #deviceSections: Buffer[] = [];
  #committedBlob: Buffer | null = null;   // device state of the committed image (FULL sections, no EOF)
  #committed = -1;                        // checkpoint number of the committed image; 0 = initial migration
  #outcome: Outcome | null = null;
  #resolveDone!: (o: Outcome) => void;
  #startedAt = 0;
  #endedAt = 0;
  #sockets = new Set<Conn>();
  readonly #channelSock = new Map<MultiFDChannel, Conn>();
  readonly #overLimit = new Set<number>();   // indexes in `channels` past limits.maxChannels
  readonly #ownPool: boolean;
  /** Compressed channels: each has its own decoder thread and counts its packets (spec §2.10). */
  readonly #decoders = new Map<MultiFDChannel, { thread: DecoderThread; seq: number }>();
  readonly #streamKey = randomUUID();
  readonly #sync: MultifdSync;
  /** The checkpoint state machine of colo.c: COLO messages, commit, heartbeat, per-checkpoint figures. */
  readonly #coloIn: ColoIncoming;
  #decodersClosed: Promise<unknown> | null = null;
  readonly done: Promise<Outcome>;

  constructor(opts: IncomingOptions = {}) {
    super();
    const ch = opts.multifdChannels;
    if (ch !== undefined && (!Number.isInteger(ch) || ch < 0 || ch > 255)) throw new RangeError('options.multifdChannels must be an integer in 0..255');
    this.#opts = opts;
    this.#colo = opts.colo ?? false;
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    if (ch !== undefined && ch > this.limits.maxChannels) throw new RangeError(`options.multifdChannels above limits.maxChannels (${this.limits.maxChannels})`);
    this.log = opts.log ?? silentLogger;
    this.#sync = new MultifdSync({
      channels: this.channels,
      log: this.log,
      ioTimeoutMs: opts.ioTimeoutMs ?? 0,
      ended: () => this.#outcome !== null,
      ramOpen: () => MULTIFD_OPEN.has(this.#phase),
      phaseName: () => this.#phase,
      mainAt: () => this.#mainQ.consumed,
      fail: (err, peerLoss) => this.#endWith(err, peerLoss),
      // Every page write up to here has settled: slots of pages resent as zero can be reused.
      roundClosed: () => this.blocks.slab.releaseDeferred(),
    }, ch);
    this.#ownPool = opts.pool === undefined;
    this.pool = opts.pool ?? new PagePool(opts.threads !== undefined ? { threads: opts.threads } : {});
    this.#ram = new RamSectionParser(this.#ramSink, this.limits);
    this.#vm = new VmStateParser(this.#mainQ, this.#vmSink, this.#ram, this.limits);
    this.#vm.expectVmdesc = opts.expectVmdesc ?? true;
    this.#coloIn = new ColoIncoming({
      log: this.log,
      limits: this.limits,
      blocks: this.blocks,
      stats: this.stats,
      mainQ: this.#mainQ,
      get heartbeatTimeoutMs() { return opts.heartbeatTimeoutMs ?? 0; },
      ended: () => this.#outcome !== null,
      setPhase: (p) => { this.#phase = p; },
      send: (b) => { this.#main?.write(b); },
      pauseMain: () => { this.#main?.pause(); },
      resumeMain: () => { this.#resumeMain(); },
      pump: () => this.#pumpMain(),
      beginRecords: () => this.#vm.beginRecords(),
      checkAtRest: (what) => this.#sync.checkAtRest(what),
      committed: () => this.#committed,
      commitImage: (index, deviceState) => { this.#committedBlob = deviceState; this.#committed = index; },
      commitParticipants: (index) => this.#commitParticipants(index),
      counters: () => ({ main: this.#ram, channels: this.#sortedChannels() }),
      fail: (err, peerLoss) => this.#endWith(err, peerLoss),
      emitCheckpoint: (ev) => { this.emit('checkpoint', ev); },
    });
    this.done = new Promise((r) => { this.#resolveDone = r; });
  }

  // ---------------------------------------------------------------- connections

  /** A classified connection from the listener. `first` holds the bytes already read. */
  attachMain(sock: Socket, first: Buffer): boolean {
    if (this.#main || this.#outcome) return false;   // a second migration is refused, never merged
    this.#main = sock;
    this.#startedAt = performance.now();
    // A plain TCP socket reads into reused memory (QueueReader); TLS keeps the 'data' path.
    const reader = new QueueReader(this.#mainQ, () => this.#pumpMain(), () => this.#ram.alignHint);
    const direct = adoptForDirectRead(sock, reader);
    if (direct) {
      sock = direct.sock;
      this.#main = sock;
      first = direct.buffered.length > 0 ? Buffer.concat([first, ...direct.buffered]) : first;
    } else {
      sock.on('data', (c: Buffer) => { this.#mainQ.push(c); this.#pumpMain(); });
    }
    this.#track(sock, 'main');
    sock.on('end', () => { this.#mainEnded = true; this.#pumpMain(); });
    this.#mainQ.push(first);
    this.#pumpMain();
    // The listener hands the socket over paused; the first bytes may already have parked the
    // main channel (a barrier), in which case it stays paused until released.
    if (this.#vm.held === null && this.#phase !== 'committing') sock.resume();
    return true;
  }

  attachMultifd(sock: Socket, first: Buffer): boolean {
    if (this.#outcome) return false;
    const sync = this.#sync;
    if (sync.expected !== undefined && this.channels.length >= sync.expected) {
      if (sync.learned) {
        // The learned count was too small: a channel connected after the quiet window.
        this.#endWith(wireError('ERR_HANDSHAKE', `multifd: channel ${this.channels.length + 1} connected after the channel count was learned (${sync.expected}); pass --multifd-channels`, 'multifd/?', 0), false);
      }
      return false;
    }
    // Beyond --max-channels the connection is still parsed up to its handshake, so the
    // refusal is a typed error naming the channel rather than a silent drop.
    if (this.channels.length >= this.limits.maxChannels) this.#overLimit.add(this.channels.length);
    const ch = new MultiFDChannel(this.#channelSink, this.#opts.compression ?? 'none', this.limits, this.#opts.slotsPerChannel ?? 4);
    this.channels.push(ch);
    sync.lastAccept = performance.now();
    // A plain TCP socket is read by its own thread (QEMU's multifd_recv_thread), or on this
    // one; either way payloads go straight into their page slots or the staging slots.
    const direct = adoptForThreadedRead(sock, ch) ?? adoptForDirectRead(sock, ch);
    let conn: Conn = sock;
    if (direct) {
      ch.useDirectReads();
      conn = direct.sock;
      first = direct.buffered.length > 0 ? Buffer.concat([first, ...direct.buffered]) : first;
    }
    this.#channelSock.set(ch, conn);
    this.#track(conn, 'multifd');
    if (!direct) sock.on('data', (c: Buffer) => ch.push(c));
    conn.on('end', () => {
      ch.end();
      // In COLO the channels stay open for the whole session (spec §5.7): an EOF is the primary
      // going away. In precopy a channel may close once its last SYNC is in.
      if (!ch.failed && this.#coloIn.active) this.#peerEnded(ch.name);
      else if (this.#sync.waiting) this.#sync.check();
      else if (this.#phase === 'draining') this.#checkDrained(false);
    });
    ch.push(first);
    // Handed over paused: resume unless the first bytes already blocked the channel (its own
    // pause must not be undone, or the socket would buffer without bound).
    if (!ch.blocked && !ch.failed) conn.resume();
    return true;
  }

  /**
   * A connection that is neither main nor multifd. Before a migration has started it fails
   * the migration (QEMU 10.x: "unknown channel magic"); once one is active, only that
   * connection is refused, so a stranger cannot break a running COLO pair.
   */
  badConnection(err: MigrationError): void {
    if (this.#main === null && !this.#outcome) this.#endWith(err, false);
  }

  #track(sock: Conn, kind: string): void {
    this.#sockets.add(sock);
    sock.setNoDelay?.(true);
    const io = this.#opts.ioTimeoutMs ?? 0;
    // setTimeout(ms, cb) would register cb with once(): the first (idle, ignored) timeout
    // would use it up. Every timeout must be looked at.
    if (io > 0 && sock.setTimeout) { sock.setTimeout(io); sock.on('timeout', () => this.#ioTimeout(sock, kind)); }
    sock.on('error', (e) => this.#peerEnded(kind, e));
    sock.on('close', () => this.#sockets.delete(sock));
  }

  /**
   * Takes the main channel back after we held it (a barrier, a commit, the end of the initial
   * migration). Its idle timer ran while we held it: re-armed here, or a timeout queued during
   * the hold would blame the peer for our own wait.
   */
  #resumeMain(): void {
    const io = this.#opts.ioTimeoutMs ?? 0;
    if (io > 0) this.#main?.setTimeout?.(io);
    this.#main?.resume();
  }

  /** Socket timeout: only an error when the peer stopped in the middle of something. */
  #ioTimeout(sock: Conn, kind: string): void {
    if (this.#outcome) return;
    const ms = this.#opts.ioTimeoutMs ?? 0;
    if (sock === this.#main) {
      // Silence is the peer's fault only while we wait for its bytes: not between checkpoints
      // (the heartbeat covers that), not while we hold the main channel at a barrier (the
      // barrier has its own timer) or commit.
      const waitingOnUs = MAIN_WAITS_ON_US.has(this.#phase) || this.#vm.held !== null;
      // A socket's idle timer is re-armed only by its own activity: after an ignored timeout
      // with no bytes since, a later stall would never be reported. Re-arm it here.
      if (waitingOnUs) { sock.setTimeout?.(ms); return; }
      this.#endWith(wireError('ERR_TIMEOUT', `main: no data for ${ms} ms in phase ${this.#phase}`, 'main', this.#mainQ.consumed), true);
      return;
    }
    const ch = this.channels.find((c) => this.#channelSock.get(c) === sock);
    if (ch && ch.waitingForPeer && !ch.blocked) this.#endWith(wireError('ERR_TIMEOUT', `${ch.name}: no data for ${ms} ms inside a packet`, ch.name, ch.q.consumed), true);
    else sock.setTimeout?.(ms);
    void kind;
  }

  // ---------------------------------------------------------------- memory & modes

  #writeMode(): WriteMode { return this.#coloIn.active ? WRITE_CACHE : this.#colo ? WRITE_BOTH : WRITE_GUEST; }

  readonly #ramSink: RamSink = {
    onMemSize: (list) => {
      if (this.blocks.blocks.length > 0) throw wireError('ERR_UNKNOWN_SECTION', 'ram: second MEM_SIZE list', 'main', this.#mainQ.consumed);
      const pages = list.reduce((n, b) => n + b.usedLength / 4096, 0);
      this.blocks.slab = new Slab({
        chunkSlotBits: chunkSlotBitsFor(pages),
        ...(this.#opts.maxMemoryBytes !== undefined ? { maxBytes: this.#opts.maxMemoryBytes } : {}),
      });
      for (const { idstr, usedLength } of list) {
        const b = this.blocks.add(idstr, usedLength);
        if (this.#colo) b.enableColo();
      }
      this.log.info({ blocks: list.length, bytes: this.blocks.totalBytes }, 'RAMBlock list received');
    },
    findBlock: (idstr) => this.blocks.get(idstr),
    writeMode: () => this.#writeMode(),
  };

  #enableColo(): void {
    if (this.#colo) return;
    this.#colo = true;
    for (const b of this.blocks.blocks) b.enableColo();
  }

  // ---------------------------------------------------------------- main channel

  readonly #vmSink: VmStateSink = {
    onConfiguration: (machine, raw) => {
      this.#machine = machine;
      this.#configRaw = raw;
      this.log.info({ machine }, 'configuration');
    },
    onCommand: (cmd, payload) => {
      if (cmd === MIG_CMD_ENABLE_COLO) { this.log.info('ENABLE_COLO: COLO mode'); this.#enableColo(); }
      else if (cmd === MIG_CMD_OPEN_RETURN_PATH) this.#returnPath = true;
      else if (cmd === MIG_CMD_PING) {
        if (!this.#returnPath) throw wireError('ERR_UNKNOWN_SECTION', 'main: PING without a return path', 'main', this.#mainQ.consumed);
        this.#rpSend(MIG_RP_MSG_PONG, payload);
      }
      // MIG_CMD_SWITCHOVER_START: a no-op for a RAM-only receiver (spec §4.4)
    },
    onSection: (h: SectionHeader) => { this.emit('section', h); },
    onRamEos: () => {
      if (this.log.isLevelEnabled('debug')) this.log.debug({ t: performance.now() - (this.#coloIn.current?.tSend ?? 0) }, 'ram EOS');
      if (this.#syncScheme === 'unknown') this.#syncScheme = 'per-section';
      return this.#syncScheme === 'per-section' ? this.#sync.run() : undefined;
    },
    onRamFlush: () => {
      if (this.#syncScheme === 'per-section') throw wireError('ERR_SYNC', 'main: MULTIFD_FLUSH in a per-section stream', 'main', this.#mainQ.consumed);
      this.#syncScheme = 'per-round';
      return this.#sync.run();
    },
    onDeviceSection: (_h, raw) => { this.#deviceSections.push(raw); },
  };

  #rpSend(type: number, payload: Buffer): void {
    const h = Buffer.allocUnsafe(4);
    h.writeUInt16BE(type, 0);
    h.writeUInt16BE(payload.length, 2);
    this.#main?.write(Buffer.concat([h, payload]));
  }

  #pumping = false;
  #pumpMain(): void {
    if (this.#pumping || this.#outcome) return;
    this.#pumping = true;
    try {
      // The peer may close right after its last bytes while we still hold them (behind a
      // barrier): its EOF counts only once everything buffered has been parsed.
      if (this.#stepMain() === 'data' && this.#mainEnded) this.#peerEnded('main');
    } catch (e) {
      this.#endWith(toMigrationError(e, 'main', this.#mainQ.consumed), false);
    } finally {
      this.#pumping = false;
    }
  }

  /** Runs the main channel until it needs bytes ('data') or waits for a barrier or commit ('wait'). */
  #stepMain(): 'data' | 'wait' {
    const q = this.#mainQ;
    for (;;) {
      if (this.#outcome) return 'wait';
      switch (this.#phase) {
        case 'savevm': {
          const r = this.#vm.feed();
          if (r === 'blocked') return 'data';
          if (r === 'held') {
            this.#main?.pause();
            this.#vm.held!.then(() => { this.#resumeMain(); this.#pumpMain(); },
              (e: unknown) => this.#endWith(toMigrationError(e, 'main', q.consumed), false));
            return 'wait';
          }
          if (!this.#initialDone) {
            if (this.#vm.expectVmdesc) { this.#vm.beginVmdesc(); this.#phase = 'vmdesc'; } else return this.#settleInitial();
          } else this.#coloIn.ramDone();
          break;
        }
        case 'vmdesc': {
          const r = this.#vm.feed();
          if (r !== 'vmdesc') return 'data';
          return this.#settleInitial();
        }
        case 'colo-idle':
        case 'colo-send':
        case 'colo-size':
        case 'colo-blob': {
          const r = this.#coloIn.step(this.#phase);
          if (r !== 'next') return r;
          break;
        }
        case 'settling':
        case 'draining':
        case 'colo-check':
        case 'committing':
        case 'done':
          return 'wait';
      }
    }
  }

  /** The initial migration's last byte was parsed: one I/O turn, then #finishInitial. */
  #settleInitial(): 'wait' {
    this.#phase = 'settling';
    this.#main?.pause();
    void ioTurn().then(() => (this.#outcome ? undefined : this.#commitParticipants(0))).then(() => {
      if (this.#outcome) return;
      try { this.#finishInitial(); } catch (e) { this.#endWith(toMigrationError(e, 'main', this.#mainQ.consumed), false); return; }
      this.#resumeMain();
      this.#pumpMain();
    }, (e: unknown) => this.#endWith(toMigrationError(e, 'main', this.#mainQ.consumed), false));
    return 'wait';
  }

  /** End of the initial migration: all pages are in (the last barrier covered multifd). */
  #finishInitial(): void {
    this.#sync.checkAtRest('the initial migration');
    this.#initialDone = true;
    this.blocks.slab.releaseDeferred();
    this.#committedBlob = Buffer.concat(this.#deviceSections);
    this.#deviceSections = [];
    this.#committed = 0;
    const dt = performance.now() - this.#startedAt;
    const { bytes, pages } = this.totals;
    this.log.info({ bytes, pages, ms: Math.round(dt) }, 'initial migration received');
    if (this.#colo) { this.#coloIn.enter(); return; }
    if (this.#returnPath) this.#rpSend(MIG_RP_MSG_SHUT, be32(0));
    this.#endedAt = performance.now();
    if (this.channels.length === 0) { this.#phase = 'done'; this.#settle({ kind: 'completed' }); return; }
    // The source closes its multifd channels right after completing. Until they have, bytes
    // it sent before its last main-channel record may still be unread: a packet with pages
    // there (a channel that ran a barrier ahead) would be lost from a "complete" image. Wait
    // for every channel's EOF, bounded, and refuse such packets (MULTIFD_OPEN).
    this.#phase = 'draining';
    const grace = Math.min(this.#opts.ioTimeoutMs || DRAIN_GRACE_MS, DRAIN_GRACE_MS);
    this.#drainTimer = setTimeout(() => {
      this.#drainTimer = null;
      this.log.warn({ channels: this.channels.filter((c) => !c.exhausted).map((c) => c.name), ms: grace }, 'multifd channels still open after the end of the migration; completing with what was parsed');
      this.#checkDrained(true);
    }, grace);
    this.#checkDrained(false);
  }

  /** Precopy done: complete once every channel ended (or was parked / failed) with nothing beyond its last SYNC. */
  #checkDrained(force: boolean): void {
    if (this.#outcome || this.#phase !== 'draining') return;
    if (!force && !this.channels.every((c) => c.exhausted || c.failed || c.atSync)) return;
    if (this.#drainTimer) { clearTimeout(this.#drainTimer); this.#drainTimer = null; }
    try { this.#sync.checkAtRest('the migration'); } catch (e) { this.#endWith(toMigrationError(e, 'main', this.#mainQ.consumed), false); return; }
    this.#phase = 'done';
    this.#settle({ kind: 'completed' });
  }

  async #commitParticipants(index: number): Promise<void> {
    for (const p of this.#opts.participants ?? []) await p.commit(index);
  }

  /**
   * Slab figures for summary(): what the protected VM costs in page memory, and the process's
   * peak and current resident set and its transparent huge pages (Linux; 0 elsewhere).
   */
  memoryStats(): Record<string, number> {
    const slab = this.blocks.slab;
    return {
      slabBytes: slab.bytes, peakSlabBytes: slab.peakChunks * slab.chunkBytes, usedSlots: slab.usedSlots,
      committedSlots: this.blocks.blocks.reduce((n, b) => n + b.committedSlots, 0), chunkBytes: slab.chunkBytes,
      chunksAdded: slab.chunksAdded, chunksReleased: slab.chunksReleased, prefaultedBytes: slab.prefaultedSlots * TARGET_PAGE_SIZE,
      ...procMemory(),
    };
  }

  #sortedChannels(): MultiFDChannel[] { return [...this.channels].sort((a, b) => a.id - b.id); }

  /** The heartbeat timeout now in force (ms; 0: none). */
  get heartbeatMs(): number { return this.#coloIn.heartbeatMs; }

  // ---------------------------------------------------------------- multifd channels & barriers

  readonly #channelSink: ChannelSink = {
    onHandshake: (ch: MultiFDChannel, init: MultiFDInit) => {
      if (this.#overLimit.has(this.channels.indexOf(ch))) {
        throw wireError('ERR_LIMIT', `multifd: channel ${init.id} is connection ${this.channels.indexOf(ch) + 1}, above the cap of ${this.limits.maxChannels} channels`, ch.name, 24);
      }
      const max = this.#sync.expected ?? this.limits.maxChannels;
      if (init.id >= max) throw wireError('ERR_HANDSHAKE', `multifd: received channel id ${init.id}, expected below ${max}`, ch.name, 24);
      if (this.#byId.has(init.id)) throw wireError('ERR_HANDSHAKE', `multifd: received id '${init.id}' already setup`, ch.name, 24);
      const want = this.#opts.expectUuid?.replace(/-/g, '').toLowerCase();
      if (want !== undefined && init.uuid.toString('hex') !== want) {
        throw wireError('ERR_HANDSHAKE', `multifd: received uuid '${init.uuid.toString('hex')}' and expected uuid '${want}' for channel ${init.id}`, ch.name, 8);
      }
      this.#byId.set(init.id, ch);
      this.log.debug({ channel: ch.name }, 'multifd channel connected');
    },
    findBlock: (idstr) => this.blocks.get(idstr),
    writeMode: () => this.#writeMode(),
    // Until MEM_SIZE the slab is a placeholder that is replaced: reservations wait for the real one.
    reservationSlab: () => (this.blocks.blocks.length > 0 ? this.blocks.slab : undefined),
    submit: (ch, task: WriteTask, compressedBytes) => {
      const method = this.#opts.compression ?? 'none';
      return method === 'none' ? this.pool.write(task) : this.#decode(ch, task, method, compressedBytes);
    },
    onPacket: (ch, p, at) => this.#sync.checkRound(ch, p, at),
    onSynced: (ch) => {
      if (this.log.isLevelEnabled('debug')) this.log.debug({ channel: ch.name, t: performance.now() - (this.#coloIn.current?.tSend ?? 0) }, 'synced');
      if (this.#sync.waiting) queueMicrotask(() => this.#sync.check()); },
    onBlocked: (ch, blocked) => {
      const sock = this.#channelSock.get(ch)!;
      // The idle timer ran while we held the channel: re-armed on resume, as for the main channel.
      if (blocked) sock.pause(); else { const io = this.#opts.ioTimeoutMs ?? 0; if (io > 0) sock.setTimeout?.(io); sock.resume(); }
    },
    // A packet cut by the peer's EOF is the primary going away, not bad input.
    onError: (err, ch) => this.#endWith(err, ch.ended && err.code === 'ERR_TRUNCATED'),
  };

  /**
   * A compressed packet goes to its channel's decoder thread, never to the shared pool: the
   * payload continues the channel's one stream (spec §2.5). Called right after the payload
   * was copied into the slot, so it ends at `ch.q.consumed`.
   */
  #decode(ch: MultiFDChannel, task: WriteTask, method: 'zlib' | 'zstd', payloadLen: number): Promise<number> {
    if (this.#decodersClosed) return Promise.reject(new MigrationError('ERR_PEER', `${ch.name}: migration already ended`, ch.name));
    let d = this.#decoders.get(ch);
    if (d === undefined) {
      d = { thread: new DecoderThread(), seq: 0 };
      this.#decoders.set(ch, d);
    }
    const t: DecodeTask = { ...task, op: 'decode', key: `${this.#streamKey}/${ch.id}`, method, seq: d.seq++, channel: ch.name, payloadLen };
    return d.thread.decode(t, ch.q.consumed - payloadLen);
  }

  #closeDecoders(): Promise<unknown> {
    this.#decodersClosed ??= Promise.allSettled([...this.#decoders.values()].map((d) => d.thread.close()));
    return this.#decodersClosed;
  }

  // ---------------------------------------------------------------- endings

  /** A socket ended or errored. Clean for a channel only between packets. */
  #peerEnded(channel: string, err?: Error): void {
    if (this.#outcome) return;
    if (this.#phase === 'done') return;
    // After the last byte the source closes its sockets; errors there (ECONNRESET) change nothing.
    if (this.#phase === 'draining' && channel === 'main') return;
    const why = err ? `${channel}: ${err.message}` : `${channel}: connection closed`;
    const at = channel === 'main' ? this.#mainQ.consumed : this.channels.find((c) => c.name === channel)?.q.consumed;
    this.#endWith(new MigrationError(this.#phase === 'colo-idle' ? 'ERR_PEER' : 'ERR_TRUNCATED', why, channel, at, err ? { cause: err } : undefined), true);
  }

  /**
   * Every ending comes through here once. In COLO, after the initial migration, the
   * committed image survives: a dead peer is a failover, a protocol violation a failure.
   */
  #endWith(err: MigrationError, peerLoss: boolean): void {
    if (this.#outcome) return;
    if (this.#coloIn.active && this.#committed >= 0) {
      const cur = this.#coloIn.current;
      const inflight = this.#phase !== 'colo-idle' && this.#phase !== 'committing';
      if (inflight && cur) this.stats.discard(cur);
      // Its pending slots go back; nothing allocates after this, so a page write still on a
      // worker lands in a free slot that no table entry names.
      if (inflight) for (const b of this.blocks.blocks) b.discard();
      const reason = `${err.code}: ${err.message}`;
      // A checkpoint whose commit is running is complete: it finishes and is the one held.
      const held = this.#phase === 'committing' && cur ? cur.index : this.#committed;
      this.log[peerLoss ? 'warn' : 'error']({ err, checkpoint: held }, `COLO ended; ${inflight ? `checkpoint ${cur?.index} discarded; ` : ''}holding committed checkpoint ${held}${held !== this.#committed ? ' (its commit completes first)' : ''}`);
      this.#settle(peerLoss ? { kind: 'primary-lost', reason, error: err } : { kind: 'failed', error: err });
      return;
    }
    this.log.error({ err }, 'migration failed');
    this.#settle({ kind: 'failed', error: err });
  }

  #settle(o: Outcome): void {
    if (this.#outcome) return;
    this.#outcome = o;
    if (!this.#endedAt) this.#endedAt = performance.now();
    this.#coloIn.stop();
    if (this.#drainTimer) clearTimeout(this.#drainTimer);
    this.#sync.stop(o.kind === 'completed' ? new Error('closed') : (o as { error?: MigrationError }).error ?? new Error('closed'));
    for (const c of this.channels) this.#channelSock.get(c)?.destroy();
    if (o.kind !== 'completed') this.#main?.destroy();
    else this.#main?.end();
    // Decoder threads end with the migration (a completed one has no task left; after a
    // failure only the COLO cache can be written to, never the committed guest image).
    void this.#closeDecoders();
    this.emit('end', o);
    // The commit in flight (if any) finishes before the outcome is visible: the image a caller
    // reads afterwards is a complete checkpoint.
    // Participants settle on the committed checkpoint (pending disk writes dropped) before too.
    void (this.#coloIn.commitInFlight ?? Promise.resolve())
      .then(() => Promise.allSettled((this.#opts.participants ?? []).map((p) => p.end(this.#committed))))
      .then(() => this.#resolveDone(o));
  }

  /** Stop accepting and tear everything down. */
  async close(): Promise<void> {
    this.#settle({ kind: 'failed', error: new MigrationError('ERR_PEER', 'closed by the receiver') });
    for (const s of this.#sockets) s.destroy();
    await this.done;
    await this.#closeDecoders();
    if (this.#ownPool) await this.pool.close();
  }

  // ---------------------------------------------------------------- results

  get phase(): Phase { return this.#phase; }
  get isColo(): boolean { return this.#colo; }
  get committedCheckpoint(): number { return this.#committed; }
  get durationMs(): number { return (this.#endedAt || performance.now()) - this.#startedAt; }
  get syncScheme(): string { return this.#syncScheme; }
  get barriers(): number { return this.#sync.barriers; }

  /** The VM as of the last complete checkpoint (spec §5.6), or null before the initial migration ends. */
  async committedImage(): Promise<CommittedImage | null> {
    const commit = this.#coloIn.commitInFlight;
    if (commit) await commit;
    if (this.#committed < 0 || this.#committedBlob === null) return null;
    return {
      checkpoint: this.#committed,
      machineType: this.#machine,
      configuration: this.#configRaw,
      ramSectionId: this.#vm.ramSectionId,
      blocks: this.blocks.blocks.map((b: RAMBlock) => b.imageBlock()),
      deviceState: this.#committedBlob,
    };
  }

  /** Totals for --stats-json. */
  /** Page bytes, pages and zero pages received so far over every channel: cheap, for progress lines. */
  get totals(): { bytes: number; pages: number; zeroPages: number } {
    let bytes = this.#ram.bytes, pages = this.#ram.pages, zeroPages = this.#ram.zeroPages;
    for (const c of this.channels) { bytes += c.bytes; pages += c.pages; zeroPages += c.zeroPages; }
    return { bytes, pages, zeroPages };
  }

  summary(): Record<string, unknown> {
    const chans = this.#sortedChannels();
    const mainBytes = this.#ram.bytes;
    const { bytes, pages, zeroPages } = this.totals;
    const secs = this.durationMs / 1000;
    return {
      outcome: this.#outcome?.kind ?? 'running',
      machineType: this.#machine,
      colo: this.#colo,
      committedCheckpoint: this.#committed,
      syncScheme: this.#syncScheme,
      barriers: this.#sync.barriers,
      durationMs: Math.round(this.durationMs * 1000) / 1000,
      bytes,
      gbPerSec: secs > 0 ? bytes / secs / 1e9 : 0,
      pages,
      zeroPages,
      channels: [
        { channel: 'main', bytes: mainBytes, pages: this.#ram.pages, zeroPages: this.#ram.zeroPages },
        ...chans.map((c) => ({ channel: c.name, bytes: c.bytes, pages: c.pages, zeroPages: c.zeroPages, packets: c.packets, syncs: c.syncs, directPages: c.directPages, threadPackets: c.threadPackets })),
      ],
      blocks: this.blocks.blocks.map((b) => ({ idstr: b.idstr, usedLength: b.usedLength })),
      memory: this.memoryStats(),
      checkpoints: this.stats.summary(),
    };
  }
}
