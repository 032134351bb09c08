import { performance } from 'node:perf_hooks';
import { toMigrationError, wireError, type MigrationError } from '../errors.js';
import type { Logger } from '../log.js';
import type { RAMBlockList } from '../memory/ram-block.js';
import type { ByteQueue } from '../wire/byte-queue.js';
import {
  COLO_MESSAGE_CHECKPOINT_READY, COLO_MESSAGE_CHECKPOINT_REPLY, COLO_MESSAGE_CHECKPOINT_REQUEST, COLO_MESSAGE_NAMES,
  COLO_MESSAGE_VMSTATE_LOADED, COLO_MESSAGE_VMSTATE_RECEIVED, COLO_MESSAGE_VMSTATE_SEND, COLO_MESSAGE_VMSTATE_SIZE,
  COLO_MESSAGE__MAX, TARGET_PAGE_SIZE, QEMU_VM_EOF,
} from '../wire/constants.js';
import { be32 } from '../wire/reader.js';
import type { CheckpointRecord, CheckpointStats } from './checkpoint-stats.js';
import type { Limits } from './limits.js';
import { gcMsBetween, watchGc } from '../ops/gc-time.js';

/** QEMU's default x-checkpoint-delay is 20 s: until the interval is known, wait longer than that. */
export const HEARTBEAT_AUTO_FIRST_MS = 30_000;
export const HEARTBEAT_AUTO_MIN_MS = 1000;

/**
 * Two setImmediate hops put one poll phase in between: bytes a peer wrote before the main
 * channel's last record but that libuv has not read yet are parsed before we decide.
 */
export const ioTurn = (): Promise<void> => new Promise((r) => setImmediate(() => setImmediate(r)));

/**
 * The migration phases this module drives. 'colo-check': a checkpoint was received, one I/O
 * turn before the at-rest check and commit; 'committing': the commit runs.
 */
export type ColoPhase = 'colo-idle' | 'colo-send' | 'colo-size' | 'colo-blob' | 'colo-check' | 'committing';

/** Page counters of one channel, cumulative since the migration began. */
export interface ChannelCounts {
  readonly pages: number; readonly zeroPages: number; readonly bytes: number;
  /** Multifd: pages the kernel read straight into their slots, and socket reads. */
  readonly directPages?: number; readonly reads?: number;
}

/** The event a commit emits (checkpoint 0 is the initial migration). */
export type CheckpointEvent = { index: number; initial: true } | { index: number; initial: false; record: CheckpointRecord };

/** What the checkpoint state machine needs from the incoming migration it belongs to. */
export interface ColoHost {
  readonly log: Logger;
  readonly limits: Limits;
  readonly blocks: RAMBlockList;
  readonly stats: CheckpointStats;
  /** The main channel's bytes: COLO messages and the device-state blob are read from it. */
  readonly mainQ: ByteQueue;
  readonly heartbeatTimeoutMs: number | 'auto';
  /** The migration has an outcome: nothing to arm or commit any more. */
  ended(): boolean;
  setPhase(p: ColoPhase | 'savevm'): void;
  /** Writes on the main socket (the COLO replies go back on it). */
  send(b: Buffer): void;
  pauseMain(): void;
  resumeMain(): void;
  /** Runs the main channel again after a wait. */
  pump(): void;
  /** The checkpoint's RAM part follows VMSTATE_SEND: a savevm record stream up to QEMU_VM_EOF. */
  beginRecords(): void;
  /** multifd at rest (every channel at its last SYNC, nothing beyond): throws otherwise. */
  checkAtRest(what: string): void;
  /** Number of the committed checkpoint (0: the initial migration). */
  committed(): number;
  /** The checkpoint's RAM is committed: its device state (FULL sections, no EOF) becomes the image's. */
  commitImage(index: number, deviceState: Buffer): void;
  commitParticipants(index: number): Promise<void>;
  /** The main channel, then each multifd channel by id. */
  counters(): { main: ChannelCounts; channels: ChannelCounts[] };
  fail(err: MigrationError, peerLoss: boolean): void;
  emitCheckpoint(ev: CheckpointEvent): void;
}

/**
 * The secondary's side of colo.c (colo_process_incoming_thread, colo_wait_handle_message,
 * colo_incoming_process_checkpoint): the checkpoint transaction on the main channel (spec §5.3),
 * the commit through the page table and the participants, the heartbeat, and each
 * checkpoint's figures. The IncomingMigration owns the phase, the sockets and the endings.
 */
export class ColoIncoming {
  /** In COLO state (migration_incoming_in_colo_state): pages go to pending slots with dirty bits. */
  active = false;
  #blob: Buffer | null = null;
  #blobAt = 0;
  #cur: CheckpointRecord | null = null;
  #elu: ReturnType<typeof performance.eventLoopUtilization> | null = null;
  /** getrusage() at VMSTATE_SEND: the whole process (main thread and workers). */
  #ru: NodeJS.ResourceUsage | null = null;
  #commit: Promise<void> | null = null;
  #heartbeat: NodeJS.Timeout | null = null;

  constructor(private readonly host: ColoHost) {}

  /** The checkpoint in progress, or the last one. */
  get current(): CheckpointRecord | null { return this.#cur; }
  /** The at-rest check and commit of a received checkpoint, until it settles. */
  get commitInFlight(): Promise<void> | null { return this.#commit; }

  /** End of the initial migration in COLO mode: enter COLO state, CHECKPOINT_READY. */
  enter(): void {
    // COLO state: from now on pages land in the cache only, with dirty bits (spec §5.6 rule 3).
    this.active = true;
    watchGc((p) => this.host.log.info({ gcMs: Math.round(p.ms * 1000) / 1000, kind: p.kind, checkpoint: this.#cur?.index ?? 0 }, 'long GC pause on the main thread'));
    this.host.setPhase('colo-idle');
    this.#reply(COLO_MESSAGE_CHECKPOINT_READY);
    this.#armHeartbeat();
    // A guest already under load checkpoints at once: the floor is mapped before the first
    // CHECKPOINT_REQUEST (x-checkpoint-delay away), not only after the first commit.
    this.#prefault(0);
    this.host.emitCheckpoint({ index: 0, initial: true });
  }

  /** The migration ended: no heartbeat any more. */
  stop(): void {
    if (this.#heartbeat) clearTimeout(this.#heartbeat);
  }

  /** The checkpoint's RAM part reached QEMU_VM_EOF with every channel synced: VMSTATE_SIZE is next. */
  ramDone(): void {
    this.#cur!.tRamDone = performance.now();
    if (this.#elu) this.#cur!.transferBusyMs = performance.eventLoopUtilization(this.#elu).active;
    if (this.#ru) {
      const a = this.#ru, b = process.resourceUsage();
      this.#cur!.transferCpu = {
        userMs: (b.userCPUTime - a.userCPUTime) / 1000, sysMs: (b.systemCPUTime - a.systemCPUTime) / 1000,
        minorFaults: b.minorPageFault - a.minorPageFault, involuntarySwitches: b.involuntaryContextSwitches - a.involuntaryContextSwitches,
      };
    }
    this.host.setPhase('colo-size');
  }

  /**
   * One COLO step of the main channel in `phase`: 'next' after a message was consumed (the
   * phase moved on), 'data' when more bytes are needed, 'wait' while the commit runs.
   */
  step(phase: 'colo-idle' | 'colo-send' | 'colo-size' | 'colo-blob'): 'next' | 'data' | 'wait' {
    const h = this.host, q = h.mainQ;
    switch (phase) {
      case 'colo-idle': {            // be32 COLO_MESSAGE_CHECKPOINT_REQUEST (colo_send_message)
        if (q.length < 4) return 'data';
        const at = q.consumed;
        const msg = q.take(4).readUInt32BE(0);
        this.#expectMsg(msg, COLO_MESSAGE_CHECKPOINT_REQUEST, at);
        this.#noteRequest();
        this.#cur = h.stats.begin(h.committed() + 1, performance.now());
        this.#snapshotCounters();
        this.#reply(COLO_MESSAGE_CHECKPOINT_REPLY);
        h.setPhase('colo-send');
        return 'next';
      }
      case 'colo-send': {            // be32 COLO_MESSAGE_VMSTATE_SEND, then the RAM part
        if (q.length < 4) return 'data';
        const at = q.consumed;
        this.#expectMsg(q.take(4).readUInt32BE(0), COLO_MESSAGE_VMSTATE_SEND, at);
        this.#cur!.tSend = performance.now();
        this.#elu = performance.eventLoopUtilization();
        this.#ru = process.resourceUsage();
        h.beginRecords();
        h.setPhase('savevm');
        return 'next';
      }
      case 'colo-size': {            // be32 COLO_MESSAGE_VMSTATE_SIZE, be64 size (colo_send_message_value)
        if (q.length < 12) return 'data';
        const at = q.consumed;
        const b = q.take(12);
        this.#expectMsg(b.readUInt32BE(0), COLO_MESSAGE_VMSTATE_SIZE, at);
        const hi = b.readUInt32BE(4), lo = b.readUInt32BE(8);
        const size = hi * 2 ** 32 + lo;
        if (hi > 0x1f_ffff || size > h.limits.maxBlobBytes) throw wireError('ERR_LIMIT', `main: VMSTATE_SIZE ${size} above the cap ${h.limits.maxBlobBytes}`, 'main', at + 4);
        if (size < 1) throw wireError('ERR_COLO_PROTOCOL', 'main: empty device-state blob', 'main', at + 4);
        this.#blob = Buffer.allocUnsafe(size);
        this.#blobAt = 0;
        h.setPhase('colo-blob');
        return 'next';
      }
      case 'colo-blob': {            // the device-state blob (qemu_save_device_state into a buffer)
        const blob = this.#blob!;
        const n = Math.min(q.length, blob.length - this.#blobAt);
        if (n > 0) { q.copyInto(blob, this.#blobAt, n); this.#blobAt += n; }
        if (this.#blobAt < blob.length) return 'data';
        // The blob is one FULL section per device then QEMU_VM_EOF (spec §5.5).
        if (blob[blob.length - 1] !== QEMU_VM_EOF) throw wireError('ERR_COLO_PROTOCOL', 'main: device-state blob does not end with QEMU_VM_EOF', 'main', q.consumed - 1);
        const cur = this.#cur!;
        // checked now, before VMSTATE_RECEIVED goes out, and once more after an I/O turn
        h.checkAtRest(`checkpoint ${cur.index}`);
        cur.tBlob = performance.now();
        cur.blobBytes = blob.length;
        this.#reply(COLO_MESSAGE_VMSTATE_RECEIVED);
        h.setPhase('colo-check');
        h.pauseMain();
        this.#commit = ioTurn().then(() => {
          if (h.ended()) return;
          // Still part of this checkpoint: an error here discards it (see IncomingMigration#endWith).
          h.checkAtRest(`checkpoint ${cur.index}`);
          h.setPhase('committing');
          return this.#commitCheckpoint(blob);
        }).then(
          () => { this.#commit = null; h.resumeMain(); h.pump(); },
          // ERR_PEER from a participant: its peer (the primary's NBD client) is gone.
          (e: unknown) => { this.#commit = null; const err = toMigrationError(e, 'main', q.consumed); h.fail(err, err.code === 'ERR_PEER'); },
        );
        return 'wait';
      }
    }
  }

  #reply(msg: number): void {
    this.host.log.debug({ checkpoint: this.#cur?.index }, `send ${COLO_MESSAGE_NAMES[msg]}`);
    this.host.send(be32(msg));
  }

  #expectMsg(got: number, want: number, at: number): void {
    if (got === want) return;
    const name = got < COLO_MESSAGE__MAX ? COLO_MESSAGE_NAMES[got] : `invalid message ${got}`;
    throw wireError('ERR_COLO_PROTOCOL', `main: received ${name}, expected ${COLO_MESSAGE_NAMES[want]}`, 'main', at);
  }

  /**
   * colo_flush_ram_cache() + the device-state swap: every dirty page's committed entry swings
   * to the slot the checkpoint wrote (no page copy), then the blob becomes the committed one,
   * then VMSTATE_LOADED. Runs in one turn of this thread, so no reader sees half of it.
   */
  async #commitCheckpoint(blob: Buffer): Promise<void> {
    const h = this.host, cur = this.#cur!;
    // Participants first: one that refuses (a disk that missed writes) leaves RAM untouched.
    await h.commitParticipants(cur.index);
    cur.tFlushStart = performance.now();
    let flushed = 0;
    for (const b of h.blocks.blocks) flushed += b.commit();
    const slab = h.blocks.slab;
    slab.releaseDeferred();
    cur.flushedPages = flushed;
    cur.tFlushEnd = performance.now();
    this.#dirty.note(flushed);
    h.commitImage(cur.index, blob.subarray(0, blob.length - 1));
    this.#blob = null;
    this.#reply(COLO_MESSAGE_VMSTATE_LOADED);
    cur.tLoaded = performance.now();
    this.#collectCounters(cur);
    h.stats.finish(cur);
    h.setPhase('colo-idle');
    this.#armHeartbeat();
    // After the reply: giving chunks back is not on the primary's clock.
    const trimmed = slab.trim(this.#reserveSlots());
    if (trimmed > 0) h.log.debug({ chunks: trimmed, bytes: slab.bytes }, 'slab chunks returned');
    this.#prefault(cur.index);
    h.log.info(h.stats.logLine(cur), 'checkpoint');
    h.emitCheckpoint({ index: cur.index, initial: false, record: cur });
  }

  // ---------------------------------------------------------------- per-checkpoint counters

  #counterBase = { main: { pages: 0, zeroPages: 0, bytes: 0 } as ChannelCounts, ch: [] as ChannelCounts[], fresh: 0 };
  #snapshotCounters(): void {
    const { main, channels } = this.host.counters();
    this.#counterBase = {
      fresh: this.host.blocks.slab.freshSlots,
      main: { pages: main.pages, zeroPages: main.zeroPages, bytes: main.bytes },
      ch: channels.map((c) => ({ pages: c.pages, zeroPages: c.zeroPages, bytes: c.bytes, directPages: c.directPages ?? 0, reads: c.reads ?? 0 })),
    };
  }

  #collectCounters(cur: CheckpointRecord): void {
    const base = this.#counterBase;
    const { main, channels } = this.host.counters();
    cur.pages = main.pages - base.main.pages;
    cur.zeroPages = main.zeroPages - base.main.zeroPages;
    cur.channelBytes = [main.bytes - base.main.bytes];
    cur.freshPages = this.host.blocks.slab.freshSlots - base.fresh;
    cur.gcMs = Math.round(gcMsBetween(cur.tRequest, cur.tLoaded) * 1000) / 1000;
    let direct = 0, reads = 0;
    channels.forEach((c, i) => {
      const b = base.ch[i] ?? { pages: 0, zeroPages: 0, bytes: 0 };
      cur.pages += c.pages - b.pages;
      cur.zeroPages += c.zeroPages - b.zeroPages;
      cur.channelBytes.push(c.bytes - b.bytes);
      direct += (c.directPages ?? 0) - (b.directPages ?? 0);
      reads += (c.reads ?? 0) - (b.reads ?? 0);
    });
    if (channels.length > 0) { cur.directPages = direct; cur.reads = reads; }
  }

  /**
   * Maps free slots before the next checkpoint needs them (Slab.prefaultStep),
   * in 2 MiB slices on later turns of the event loop, so a CHECKPOINT_REQUEST arriving
   * meanwhile waits for one slice at most; a checkpoint that began stops it.
   */
  #prefault(index: number): void {
    // The next checkpoint takes a new slot per dirty page (the old ones are freed only at its
    // commit): DirtyHistory.mapAhead(). The 2x reserve trim keeps is there to avoid giving
    // chunks back and forth; mapping all of it cost ~80 MiB of VmHWM.
    const h = this.host, slab = h.blocks.slab;
    const reserve = Math.max(this.#dirty.mapAhead(), mapAheadFloor(h.blocks.totalBytes / TARGET_PAGE_SIZE, slab.chunkSlots));
    const step = (): void => {
      if (h.ended() || this.#cur !== null && this.#cur.index !== index) return;
      if (slab.prefaultStep(reserve)) setImmediate(step);
    };
    setImmediate(step);
  }

  /** Dirty pages of past checkpoints: what the slab maps ahead and keeps free. */
  readonly #dirty = new DirtyHistory();
  /** Free slots kept after a commit (DirtyHistory.keepFree), at least one chunk. */
  #reserveSlots(): number {
    return this.#dirty.keepFree(this.host.blocks.slab.chunkSlots);
  }

  // ---------------------------------------------------------------- heartbeat

  /** Idle gaps (commit -> next CHECKPOINT_REQUEST), the last eight, for the 'auto' heartbeat. */
  readonly #gaps: number[] = [];
  #armedAt = 0;

  /** The heartbeat timeout now in force (ms; 0: none). */
  get heartbeatMs(): number {
    const o = this.host.heartbeatTimeoutMs;
    if (o !== 'auto') return o;
    if (this.#gaps.length < 2) return HEARTBEAT_AUTO_FIRST_MS;
    return Math.max(HEARTBEAT_AUTO_MIN_MS, Math.ceil(3 * Math.max(...this.#gaps)));
  }

  #noteRequest(): void {
    if (this.#armedAt === 0) return;
    this.#gaps.push(performance.now() - this.#armedAt);
    if (this.#gaps.length > 8) this.#gaps.shift();
    this.#armedAt = 0;
  }

  #armHeartbeat(): void {
    const ms = this.heartbeatMs;
    this.#armedAt = performance.now();
    if (this.#heartbeat) clearTimeout(this.#heartbeat);
    this.#heartbeat = null;
    if (ms <= 0 || this.host.ended()) return;
    this.#heartbeat = setTimeout(() => {
      this.host.fail(wireError('ERR_TIMEOUT', `main: no checkpoint for ${ms} ms (heartbeat timeout)`, 'main', this.host.mainQ.consumed), true);
    }, ms);
    this.#heartbeat.unref();
  }
}

/**
 * Free slots to map before the next checkpoint, from the dirty-page counts of the recent ones
 * (oldest first): 1.25 x the largest, or, when the last one stepped clearly above them (a
 * workload starting), as if it grows once more by the same step. Real QEMU upload runs
 * ramp in two steps (~260 -> ~5,900 -> ~11,300 pages): the second step faulted 200-2,500
 * fresh slots on the primary's clock (27-137 ms checkpoints against ~20 ms). Steady load
 * maps no more than before; only a ramp maps ahead of it.
 */
export function slotsToMapAhead(recent: readonly number[]): number {
  if (recent.length === 0) return 0;
  const last = recent[recent.length - 1]!;
  // The first checkpoint after the migration is no step: it holds whatever the migration's end left.
  if (recent.length === 1) return Math.ceil(1.25 * last);
  let before = 0;
  for (let i = 0; i < recent.length - 1; i++) if (recent[i]! > before) before = recent[i]!;
  return Math.ceil(1.25 * Math.max(stepExpectation(last, before), last, before));
}

/**
 * Free slots kept mapped however quiet the guest is: an eighth of its pages, at most one slab
 * chunk (the free chunk trim keeps anyway, 32 MiB). From idle (~250 pages a checkpoint) the
 * first loaded checkpoint of a real upload took 155-330 ms, 4,700-5,700 of its ~6,000 pages
 * faulting fresh slots at ~40 us each on the primary's clock (session 9's bench cells, ckpt
 * 6), where the next ones took ~12-17 ms; QEMU's secondary, with all of guest RAM and its
 * cache mapped up front, never pays it. Mapping the floor costs at most 32 MiB of resident
 * memory while idle, once, in 2 MiB slices between checkpoints.
 */
export function mapAheadFloor(guestPages: number, chunkSlots: number): number {
  return Math.min(chunkSlots, Math.floor(guestPages / 8));
}

/**
 * Only a clear step counts (three times the recent ones; a real ramp's first step is ~20x):
 * mapped memory stays mapped until its chunk is wholly free, so every extrapolated step raises
 * the resident set for good. At 1.5x the soak's lognormal sizes fired it often enough for RSS
 * to creep (271.6 -> 325.4 MiB over 10,000 checkpoints, against 245 -> 275 without).
 */
const STEP_RATIO = 3;

/**
 * Dirty pages to expect after `last` when it stepped up from `before` (the largest of the
 * recent checkpoints before it): one more step of the same size. 0 when it is no step.
 */
function stepExpectation(last: number, before: number): number {
  return last >= STEP_RATIO * before ? 2 * last - before : 0;
}

/**
 * Dirty-page counts of past checkpoints (each commit's), for the slab: how many free slots to
 * map before the next checkpoint (mapAhead) and how many to keep when giving chunks back
 * (keepFree).
 */
export class DirtyHistory {
  /** Checkpoints whose counts set what is mapped ahead. */
  static readonly RECENT = 16;
  /**
   * Checkpoints whose largest count trim still keeps room for (~2.5 min at a 600 ms interval):
   * slots of a kept chunk stay mapped, so load that resumes after a pause finds them. With the
   * 16 recent ones alone, ~10 s of idle would leave two chunks (64 MiB) free, and a larger
   * checkpoint would fault the rest in on the primary's clock: on this machine ~40 us per fresh
   * 4 KiB page against ~2 us per page otherwise (measured: the first loaded checkpoint of a
   * bench cell, ~5,000 fresh slots, 120-270 ms against ~20 ms).
   */
  static readonly KEEP = 256;
  readonly #ring = new Uint32Array(DirtyHistory.KEEP);
  #count = 0;
  /**
   * A step up (slotsToMapAhead's rule, judged when it is noted) keeps its one-more-step
   * expectation while it is among the RECENT checkpoints, not for the next one only: a real
   * upload's second step came 4-6 checkpoints after the first (5,925 -> 6,502 -> 6,496 -> 210
   * -> 212 -> 5,698 -> 11,351 pages) and faulted 2,375-3,977 fresh slots, 116 ms each.
   */
  #stepExpect = 0;
  #stepUntil = -1;

  note(pages: number): void {
    const before = this.last(DirtyHistory.RECENT - 1);
    const step = before.length > 0 ? stepExpectation(pages, Math.max(...before)) : 0;
    if (step > 0) { this.#stepExpect = step; this.#stepUntil = this.#count + DirtyHistory.RECENT; }
    this.#ring[this.#count % DirtyHistory.KEEP] = Math.min(pages, 0xffff_ffff);
    this.#count++;
  }

  /** The last `n` counts, oldest first. */
  last(n: number): number[] {
    const k = Math.min(n, this.#count, DirtyHistory.KEEP), out: number[] = [];
    for (let i = this.#count - k; i < this.#count; i++) out.push(this.#ring[i % DirtyHistory.KEEP]!);
    return out;
  }

  /** Free slots to map before the next checkpoint: slotsToMapAhead() of the recent counts, or a recent step's. */
  mapAhead(): number {
    const m = slotsToMapAhead(this.last(DirtyHistory.RECENT));
    return this.#count <= this.#stepUntil ? Math.max(m, Math.ceil(1.25 * this.#stepExpect)) : m;
  }

  /**
   * Free slots trim keeps: twice the largest recent checkpoint (a chunk is not given back and
   * mapped again as sizes wobble), what is mapped ahead, 1.25 x the largest of the last KEEP,
   * and at least `minSlots`.
   */
  keepFree(minSlots: number): number {
    let recent = 0, kept = 0;
    const all = this.last(DirtyHistory.KEEP);
    for (let i = 0; i < all.length; i++) {
      if (all[i]! > kept) kept = all[i]!;
      if (i >= all.length - DirtyHistory.RECENT && all[i]! > recent) recent = all[i]!;
    }
    return Math.max(minSlots, 2 * recent, this.mapAhead(), Math.ceil(1.25 * kept));
  }
}
