import { performance } from 'node:perf_hooks';
import { wireError, type MigrationError } from '../errors.js';
import type { Logger } from '../log.js';
import { MULTIFD_FLAG_SYNC } from '../wire/constants.js';
import type { MultiFDChannel } from './multifd-channel.js';
import type { MultiFDPacket } from './multifd-packet.js';

/**
 * QEMU 7.2 connected a channel 470 ms after the main channel's first EOS: without a
 * configured count, the channels that connected count once none arrived for this long.
 */
const AUTO_QUIET_MS = 1500;

/** What the barrier needs from the migration it belongs to. */
export interface SyncHost {
  readonly channels: MultiFDChannel[];
  readonly log: Logger;
  readonly ioTimeoutMs: number;
  /** The migration has an outcome: nothing to wait for any more. */
  ended(): boolean;
  /** A RAM transfer is open (precopy, or a checkpoint after CHECKPOINT_REPLY). */
  ramOpen(): boolean;
  phaseName(): string;
  /** Stream offset of the main channel, for errors. */
  mainAt(): number;
  fail(err: MigrationError, peerLoss: boolean): void;
  /** Every page write of the round has settled. */
  roundClosed(): void;
}

interface Barrier { resolve: () => void; reject: (e: unknown) => void }

/**
 * multifd.c's synchronisation on the receive side: multifd_recv_sync_main() (the main
 * channel waits until every channel wrote all pages up to its SYNC, then releases them),
 * the channel count when it is learned rather than configured, and the packet_num rounds
 * that catch a packet left over from an earlier barrier.
 */
export class MultifdSync {
  /** Channel count: configured, or learned at the first barrier. */
  expected: number | undefined;
  learned = false;
  barriers = 0;
  lastAccept = 0;
  #barrier: Barrier | null = null;
  #firstBarrierAt = 0;
  /** Highest packet_num of the rounds the barriers closed (-1: none). */
  #roundFloor = -1;
  /** Highest packet_num parsed in the open round. */
  #roundMax = -1;
  #settleTimer: NodeJS.Timeout | null = null;

  constructor(private readonly host: SyncHost, expected: number | undefined) { this.expected = expected; }

  get waiting(): boolean { return this.#barrier !== null; }

  /** Resolves once every channel is synced and released; undefined without multifd. */
  run(): Promise<void> | undefined {
    if (this.expected === 0) return undefined;
    const h = this.host;
    if (this.barriers === 0) this.#firstBarrierAt = performance.now();
    this.barriers++;
    // The primary writes the main channel's EOS (or FLUSH) only after every channel's SYNC,
    // so under load the barrier usually finds them all parked already: closed here, with no
    // promise, timer or pause of the main channel between the RAM part's last bytes and its end.
    if (this.#closable()) { this.#close(); return undefined; }
    const io = h.ioTimeoutMs;
    return new Promise<void>((resolve, reject) => {
      // A channel that stays silent without closing would hold the barrier for ever (QEMU 7.2
      // hangs exactly so): after --io-timeout the barrier fails, naming the missing channels.
      // The timer measures silence, not the barrier's length: a long iteration whose channels
      // keep delivering must not fail. It restarts whenever a channel made progress.
      const progress = () => h.channels.reduce((n, c) => n + c.q.consumed + c.packets, h.channels.length);
      let seen = progress();
      let timer: NodeJS.Timeout | null = null;
      const arm = () => {
        timer = setTimeout(() => {
          // Learning the channel count waits for a quiet window first: a barrier with no
          // channel at all makes no progress by design until that window has passed.
          if (this.expected === undefined) {
            // The settle timer may not have run yet on a busy event loop: learn now if the
            // window has passed (this may release the barrier and clear this timer's successor).
            this.check();
            if (this.#barrier === null || h.ended()) return;
            if (this.expected === undefined && performance.now() - Math.max(this.lastAccept, this.#firstBarrierAt) < AUTO_QUIET_MS + io) { arm(); return; }
          }
          const now = progress();
          if (now !== seen) { seen = now; arm(); return; }
          const missing = h.channels.filter((c) => !c.synced).map((c) => c.name);
          const absent = (this.expected ?? 0) - h.channels.length;
          h.fail(wireError('ERR_TIMEOUT', `main: multifd barrier ${this.barriers} waited ${io} ms without progress for ${[...missing, ...(absent > 0 ? [`${absent} unconnected channel(s)`] : [])].join(', ')}`, 'main', h.mainAt()), true);
        }, io);
      };
      if (io > 0) arm();
      this.#barrier = {
        resolve: () => { if (timer) clearTimeout(timer); resolve(); },
        reject: (e) => { if (timer) clearTimeout(timer); reject(e); },
      };
      this.check();
    });
  }

  /** Re-evaluates the barrier in progress (a channel synced, connected or ended). */
  check(): void {
    const b = this.#barrier;
    const h = this.host;
    if (!b || h.ended()) return;
    if (this.expected === undefined) {
      // Channel count not configured (QEMU never sends it, spec §1.1): at the first barrier,
      // take the channels that connected once none has arrived for AUTO_QUIET_MS and all of
      // them sit at their SYNC. --multifd-channels avoids the wait.
      const quiet = performance.now() - Math.max(this.lastAccept, this.#firstBarrierAt) >= AUTO_QUIET_MS;
      if (quiet && h.channels.every((c) => c.synced)) {
        this.expected = h.channels.length;
        this.learned = true;
        h.log.info({ channels: this.expected }, 'multifd channel count learned at the first barrier');
      } else {
        if (!this.#settleTimer) this.#settleTimer = setTimeout(() => { this.#settleTimer = null; this.check(); }, 25);
        return;
      }
    }
    const gone = h.channels.find((c) => c.exhausted && !c.atSync);
    if (gone) { h.fail(wireError('ERR_SYNC', `${gone.name}: connection closed before its SYNC packet for this barrier`, gone.name, gone.q.consumed), true); return; }
    if (!this.#allParked()) return;
    const late = this.#roundSpread();
    if (late) { h.fail(late, false); return; }
    this.#barrier = null;
    this.#close();
    b.resolve();
  }

  /** Every expected channel has connected and sits at this barrier's SYNC, its writes done. */
  #allParked(): boolean {
    const h = this.host;
    return this.expected !== undefined && h.channels.length >= this.expected && h.channels.every((c) => c.synced);
  }

  /**
   * The barrier can close as it opens: every channel parked (so none closed before its SYNC)
   * and the round consistent. Anything else takes the waiting path, which reports it.
   */
  #closable(): boolean {
    return !this.host.ended() && this.#allParked() && this.#roundSpread() === null;
  }

  /** The round is complete: its packet numbers close, deferred slots free up, the channels go on. */
  #close(): void {
    this.#roundFloor = this.#roundMax;
    this.host.roundClosed();
    for (const c of this.host.channels) c.release();
  }

  /** The migration ended: a barrier in progress fails with its reason, timers stop. */
  stop(reason: unknown): void {
    if (this.#settleTimer) clearTimeout(this.#settleTimer);
    this.#settleTimer = null;
    if (this.#barrier) { this.#barrier.reject(reason); this.#barrier = null; }
  }

  /**
   * QEMU ignores packet_num, but every sender numbers packets from one counter, and a barrier
   * round's packets are all numbered after the previous round's (7.2 assigns numbers on the
   * migration thread, SYNCs last; 9.0+ at fill time, but a round starts only after every
   * channel's SYNC was filled). A packet with pages or a SYNC numbered at or below the closed
   * rounds' highest is left over from an earlier round: a duplicated packet, or the rest of
   * a channel that reached a false SYNC early. Pages or SYNCs outside a RAM transfer have no
   * barrier to belong to at all. (An empty packet without SYNC is 7.2 repeating its SYNC's
   * number after a SYNC that carried pages: harmless, so not checked.)
   */
  checkRound(ch: MultiFDChannel, p: MultiFDPacket, at: number): void {
    const sync = (p.flags & MULTIFD_FLAG_SYNC) !== 0;
    const pages = p.normalPages + p.zeroPages;
    if (pages === 0 && !sync) return;
    const what = `packet ${p.packetNum} (${pages} pages${sync ? ', SYNC' : ''})`;
    if (!this.host.ramOpen()) {
      throw wireError('ERR_SYNC', `${ch.name}: ${what} outside a RAM transfer (phase ${this.host.phaseName()})`, ch.name, at);
    }
    if (p.packetNum <= this.#roundFloor) {
      throw wireError('ERR_SYNC', `${ch.name}: ${what} belongs to a closed round: barrier ${this.barriers} closed at packet ${this.#roundFloor}`, ch.name, at);
    }
    if (p.packetNum > this.#roundMax) this.#roundMax = p.packetNum;
  }

  /**
   * At the end of the RAM part every channel must sit just after the SYNC of the last barrier.
   * A channel parked at another SYNC, or with pages dispatched since, sent more syncs than the
   * main channel has barriers (a flipped SYNC bit, a duplicated packet): its pages would be
   * lost or land in the next checkpoint, so the stream is refused.
   */
  checkAtRest(where: string): void {
    if (this.expected === 0) return;
    const bad = this.host.channels.find((c) => c.atSync || c.pagesSinceRelease > 0);
    if (bad) throw wireError('ERR_SYNC', `${bad.name}: ${bad.atSync ? 'a SYNC packet' : `${bad.pagesSinceRelease} pages`} beyond the last barrier at the end of ${where}`, bad.name, bad.q.consumed);
  }

  /**
   * At a barrier: from the first SYNC a sender fills to the last, at most the other channels'
   * SYNCs and one pending data packet per channel are filled (7.2: the SYNCs are consecutive),
   * so the round cannot reach beyond min(SYNC) + 2C - 1. A SYNC numbered further back is not
   * this round's: a flipped flag, or a channel that lost its SYNC and ran into the next round.
   */
  #roundSpread(): MigrationError | null {
    const chans = this.host.channels;
    const c = chans.length;
    // A count learned as 0 (a migration without multifd): no round to check.
    if (c === 0) return null;
    let first = chans[0]!;
    for (const ch of chans) if (ch.syncNum < first.syncNum) first = ch;
    if (this.#roundMax <= first.syncNum + 2 * c - 1) return null;
    return wireError('ERR_SYNC', `${first.name}: SYNC packet ${first.syncNum} at barrier ${this.barriers}, but the round reaches packet ${this.#roundMax} (at most ${2 * c - 1} apart with ${c} channels): a SYNC from another round`, first.name, first.q.consumed);
  }
}
