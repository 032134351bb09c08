// The `ram` live handler of the synthetic source: which page goes next, where it travels and
// where the barriers fall, following ram.c's save side (ram_find_and_save_block,
// find_dirty_block, ram_save_target_page, ram_save_setup/iterate/complete) and multifd.c's send
// side (multifd_queue_page, multifd_send_pages, multifd_send_sync_main, the channel thread's
// packet fill), for a 7.2 source and a 10.x one. Spec §2, §3, §4.6.

import {
  MULTIFD_FLAG_SYNC,
  MULTIFD_PACKET_HEADER_LEN,
  MULTIFD_PACKET_SIZE,
  MULTIFD_PAGES_PER_PACKET,
  RAM_SECTION_VERSION,
  TARGET_PAGE_SIZE,
} from '../wire/constants.js';
import type { MainChannel, Wire } from './link.js';
import type { DirtySet, GuestBlock, MemoryModel } from './memory-model.js';
import { MultiFDPacketImage, NoCompEncoder, type MultiFDEncoder } from './multifd-builder.js';
import type { Prng } from './prng.js';

/** Which QEMU's save side to imitate. */
export type Layout = '7.2' | '10.x';

/** Where multifd barriers fall (spec §3.2). */
export type SyncScheme = 'per-section' | 'per-round';

/** The 7.2 multifd sender behaviours of spec §2.9, each switchable for tests. */
export interface Quirks72 {
  /** SYNC packets carry pages_alloc 128. */
  syncPagesAlloc: boolean;
  /** Sometimes the partial packet pending at a sync rides in the SYNC packet, and an empty packet with the same packet_num follows. */
  syncWithPages: boolean;
  /** next_packet_size and ramblock keep the previous data packet's values in packets without pages. */
  staleFields: boolean;
  /** Unused offset slots keep offsets of earlier packets. */
  staleOffsets: boolean;
  /** Sometimes the last page of a full packet is sent again as the first page of the next packet. */
  resendLastPage: boolean;
}

/** All 7.2 quirks on. */
export const QUIRKS_72_ALL: Readonly<Quirks72> = {
  syncPagesAlloc: true, syncWithPages: true, staleFields: true, staleOffsets: true, resendLastPage: true,
};

/** All 7.2 quirks off: a 7.2 layout that behaves like a tidy sender. */
export const QUIRKS_72_NONE: Readonly<Quirks72> = {
  syncPagesAlloc: false, syncWithPages: false, staleFields: false, staleOffsets: false, resendLastPage: false,
};

/** Counters of one segment (the precopy migration or one checkpoint). */
export interface RamStats {
  /** Distinct dirty pages saved. */
  pages: number;
  /** Of those, pages sent as zero pages (ZERO records or multifd zero_pages entries). */
  zeroPages: number;
  /** Multifd packets written, SYNC packets included. */
  packets: number;
  /** Barriers: SYNC rounds over all channels. */
  syncs: number;
}

/** Multifd side of the source; undefined in RamSaverOptions when multifd is off. */
export interface MultiFDSendOptions {
  /** Wire link index of channel id k, for k = 0..N-1. */
  links: number[];
  encoders: MultiFDEncoder[];
  quirks: Quirks72;
  /** Chance of each "sometimes" quirk when its turn comes. */
  quirkRate: number;
  prng: Prng;
  /** 10.x zero-page-detection=multifd: zero pages go into packets, not on the main channel. */
  zeroPagesInMultifd: boolean;
}

/** Options of RamSaver. */
export interface RamSaverOptions {
  layout: Layout;
  syncScheme: SyncScheme;
  sectionId: number;
  multifd: MultiFDSendOptions | undefined;
}

interface ChannelState {
  id: number;
  link: number;
  image: MultiFDPacketImage;
  encoder: MultiFDEncoder;
  nocomp: boolean;
  pool: Buffer[];
}

const PACKET_BUF_LEN = MULTIFD_PACKET_HEADER_LEN + MULTIFD_PACKET_SIZE;
const NO_OFFSETS = new Float64Array(0);

/**
 * The multifd send state: one pending packet being filled (multifd_send_state->pages), the
 * global packet counter, round-robin channel choice, and each channel's reused packet buffer.
 */
export class MultiFDSender {
  readonly #wire: Wire;
  readonly #model: MemoryModel;
  readonly #layout: Layout;
  readonly #o: MultiFDSendOptions;
  readonly #channels: ChannelState[];
  readonly #stats: RamStats;
  #packetNum = 0;                       // multifd_send_state->packet_num
  #next = 0;                            // next_channel
  #block = -1;                          // pending pages' block
  readonly #offsets = new Float64Array(MULTIFD_PAGES_PER_PACKET);
  #count = 0;
  // 7.2 resend quirk: the block and last offset of the previous packet when it was full.
  #fullBlock = -1;
  #fullLast = 0;

  constructor(wire: Wire, model: MemoryModel, layout: Layout, o: MultiFDSendOptions, stats: RamStats) {
    this.#wire = wire;
    this.#model = model;
    this.#layout = layout;
    this.#o = o;
    this.#stats = stats;
    const q = o.quirks;
    this.#channels = o.links.map((link, id) => ({
      id, link,
      image: new MultiFDPacketImage(layout === '7.2'
        ? { clearEachFill: false, staleFields: q.staleFields, staleOffsets: q.staleOffsets }
        : { clearEachFill: true }),
      encoder: o.encoders[id]!,
      nocomp: o.encoders[id] instanceof NoCompEncoder,
      pool: [],
    }));
  }

  /** Channel count. */
  get channels(): number {
    return this.#channels.length;
  }

  /**
   * multifd_queue_page(): add a page to the pending packet; a block change or a full packet
   * sends it. A promise means: the channel is backed up, wait before queueing more.
   */
  queuePage(block: number, offset: number): Promise<void> | undefined {
    let wait: Promise<void> | undefined;
    if (this.#count > 0 && block !== this.#block) wait = this.#sendPending();
    if (this.#count === 0) {
      this.#block = block;
      if (this.#fullBlock === block && this.#o.quirks.resendLastPage && this.#o.prng.chance(this.#o.quirkRate)) {
        this.#offsets[this.#count++] = this.#fullLast;
      }
      this.#fullBlock = -1;
    }
    this.#offsets[this.#count++] = offset;
    if (this.#count === MULTIFD_PAGES_PER_PACKET) wait = this.#sendPending() ?? wait;
    return wait;
  }

  /**
   * multifd_send_sync_main(): send the pending pages, then one SYNC packet per channel, and
   * resolve once every channel's SYNC reached the kernel. Only then may the caller write the
   * main-channel marker (EOS or MULTIFD_FLUSH) that pairs with it.
   */
  async sync(): Promise<void> {
    const o = this.#o, wire = this.#wire;
    let merged = -1;
    if (this.#count > 0) {
      if (this.#layout === '7.2' && o.quirks.syncWithPages && o.prng.chance(o.quirkRate)) {
        // The data job and the sync request reach the channel thread together: it sends one
        // packet with both, under the sync's packet_num, then loops once more on the job count.
        merged = this.#next;
        this.#next = (this.#next + 1) % this.#channels.length;
        this.#packetNum++;               // the data job's number, overwritten by the sync's
      } else {
        const w = this.#sendPending();
        if (w !== undefined) await w;
      }
    }
    for (const ch of this.#channels) {
      const num = this.#packetNum++;
      if (ch.id === merged) {
        this.#sendData(ch, MULTIFD_FLAG_SYNC, num);
        this.#count = 0;
        this.#sendEmpty(ch, 0, num);
      } else {
        this.#sendEmpty(ch, MULTIFD_FLAG_SYNC, num);
      }
    }
    this.#fullBlock = -1;
    this.#stats.syncs++;
    await Promise.all(this.#channels.map((ch) => wire.links[ch.link]!.flushed()));
  }

  // multifd_send_pages(): hand the pending packet to the next channel in turn.
  #sendPending(): Promise<void> | undefined {
    const ch = this.#channels[this.#next]!;
    this.#next = (this.#next + 1) % this.#channels.length;
    const full = this.#sendData(ch, 0, this.#packetNum++);
    if (this.#layout === '7.2' && this.#count === MULTIFD_PAGES_PER_PACKET) {
      this.#fullBlock = this.#block;
      this.#fullLast = this.#offsets[MULTIFD_PAGES_PER_PACKET - 1]!;
    }
    this.#count = 0;
    return full ? this.#wire.links[ch.link]!.writable() : undefined;
  }

  // The channel thread's fill and write of a packet that carries the pending pages.
  #sendData(ch: ChannelState, extraFlags: number, packetNum: number): boolean {
    const blk = this.#model.blocks[this.#block]!;
    const offs = this.#offsets, count = this.#count;
    let normal = count;
    if (this.#o.zeroPagesInMultifd) normal = partitionZeroPages(blk, offs, count);
    const zero = count - normal;
    this.#stats.zeroPages += zero;
    this.#stats.packets++;
    // 7.2 adds the method bits only when there is a payload; 9.0+ on every data packet.
    const flags = extraFlags | (normal > 0 || this.#layout === '10.x' ? ch.encoder.methodFlag : 0);
    if (ch.nocomp) {
      const header = ch.image.fill({
        flags, pagesAlloc: MULTIFD_PAGES_PER_PACKET, normalPages: normal, zeroPages: zero,
        nextPacketSize: normal > 0 || this.#layout === '10.x' ? normal * TARGET_PAGE_SIZE : undefined,
        packetNum, ramblock: blk.idstr, offsets: offs, count,
      });
      const buf = ch.pool.pop() ?? Buffer.allocUnsafeSlow(PACKET_BUF_LEN);
      header.copy(buf, 0);
      for (let k = 0, at = MULTIFD_PACKET_HEADER_LEN; k < normal; k++, at += TARGET_PAGE_SIZE) {
        blk.host.copy(buf, at, offs[k]!, offs[k]! + TARGET_PAGE_SIZE);
      }
      return this.#wire.send(ch.link, buf.subarray(0, MULTIFD_PACKET_HEADER_LEN + normal * TARGET_PAGE_SIZE), ch.pool, buf);
    }
    const pages: Buffer[] = [];
    for (let k = 0; k < normal; k++) pages.push(blk.host.subarray(offs[k]!, offs[k]! + TARGET_PAGE_SIZE));
    const payload = normal > 0 ? ch.encoder.encode(pages) : Buffer.alloc(0);
    const header = ch.image.fill({
      flags, pagesAlloc: MULTIFD_PAGES_PER_PACKET, normalPages: normal, zeroPages: zero,
      nextPacketSize: normal > 0 || this.#layout === '10.x' ? payload.length : undefined,
      packetNum, ramblock: blk.idstr, offsets: offs, count,
    });
    return this.#wire.send(ch.link, Buffer.concat([header, payload]));
  }

  // A packet without pages: a SYNC packet, or 7.2's empty packet after a SYNC that carried pages.
  #sendEmpty(ch: ChannelState, flags: number, packetNum: number): void {
    const is72 = this.#layout === '7.2';
    const header = ch.image.fill({
      flags,
      pagesAlloc: is72 && this.#o.quirks.syncPagesAlloc ? MULTIFD_PAGES_PER_PACKET : 0,
      normalPages: 0, zeroPages: 0,
      nextPacketSize: is72 ? undefined : 0,
      packetNum, ramblock: undefined, offsets: NO_OFFSETS, count: 0,
    });
    this.#stats.packets++;
    this.#wire.send(ch.link, Buffer.from(header));
  }
}

/**
 * multifd_send_zero_page_detect(): walk from both ends, swapping each zero page found on the
 * left with the rightmost unchecked slot, so normal pages end up first. Returns normal_pages.
 * The resulting order is QEMU's, not the queue order.
 */
function partitionZeroPages(blk: GuestBlock, offs: Float64Array, count: number): number {
  let i = 0, j = count - 1;
  while (i <= j) {
    if (!blk.isZeroPage(offs[i]! / TARGET_PAGE_SIZE)) { i++; continue; }
    const t = offs[i]!; offs[i] = offs[j]!; offs[j] = t;
    j--;
  }
  return i;
}

/**
 * The `ram` section on the main channel: the dirty bitmap, the scan position that survives
 * sections and checkpoints (rs->last_seen_block, rs->last_page), and the START/PART/END bodies.
 */
export class RamSaver {
  /** Counters of the current segment; reset by resetStats(). */
  stats: RamStats = { pages: 0, zeroPages: 0, packets: 0, syncs: 0 };
  readonly #model: MemoryModel;
  readonly #main: MainChannel;
  readonly #o: RamSaverOptions;
  readonly #mf: MultiFDSender | undefined;
  readonly #dirty: Uint8Array[];         // RAMBlock->bmap, one byte per page
  #lastBlock = 0;
  #lastPage = 0;

  constructor(wire: Wire, main: MainChannel, model: MemoryModel, o: RamSaverOptions) {
    this.#model = model;
    this.#main = main;
    this.#o = o;
    this.#dirty = model.blocks.map((b) => new Uint8Array(b.pages));
    this.#mf = o.multifd === undefined ? undefined : new MultiFDSender(wire, model, o.layout, o.multifd, this.stats);
  }

  /** Start counting a new segment. */
  resetStats(): void {
    const s = this.stats;
    s.pages = s.zeroPages = s.packets = s.syncs = 0;
  }

  /** Setup marks every page dirty (ram_list_init_bitmaps). */
  markAll(): void {
    for (const d of this.#dirty) d.fill(1);
  }

  /** migration_bitmap_sync(): fold the guest's writes into the bitmap. */
  mark(set: DirtySet): void {
    for (let b = 0; b < set.blocks.length; b++) {
      const d = this.#dirty[b]!, pages = set.blocks[b]!;
      for (let k = 0; k < pages.length; k++) d[pages[k]!] = 1;
    }
  }

  /** Dirty pages not yet sent. */
  get pendingPages(): number {
    let n = 0;
    for (const d of this.#dirty) for (let p = d.indexOf(1); p !== -1; p = d.indexOf(1, p + 1)) n++;
    return n;
  }

  /** ram_save_setup(): START header, MEM_SIZE list, the first barrier, EOS, footer. */
  async setup(): Promise<void> {
    const b = this.#main.builder;
    b.sectionStart({ sectionId: this.#o.sectionId, idstr: 'ram', instanceId: 0, versionId: RAM_SECTION_VERSION });
    b.ramMemSize(this.#model.ramBlocks());
    if (this.#mf !== undefined) await this.#barrier();
    await this.#closeSection();
  }

  /** ram_save_iterate(): a PART section with up to `budget` pages. */
  async part(budget: number): Promise<void> {
    this.#main.builder.sectionPart(this.#o.sectionId);
    await this.#savePages(budget);
    if (this.#mf !== undefined && this.#o.syncScheme === 'per-section') await this.#barrier();
    await this.#closeSection();
  }

  /** ram_save_complete(): an END section with every remaining dirty page. Leaves the main stage unflushed. */
  async complete(): Promise<void> {
    this.#main.builder.sectionEnd(this.#o.sectionId);
    await this.#savePages(Infinity);
    if (this.#mf !== undefined && this.#o.syncScheme === 'per-section') await this.#barrier();
    this.#main.builder.ramEos().footer(this.#o.sectionId);
  }

  async #closeSection(): Promise<void> {
    this.#main.builder.ramEos().footer(this.#o.sectionId);
    await this.#main.flush();
  }

  // multifd_send_sync_main() + the marker: EOS follows in the caller for per-section; per-round
  // writes MULTIFD_FLUSH here. The marker is flushed at once, since a receiver holds its
  // channels at the barrier until it reads it.
  async #barrier(): Promise<void> {
    await this.#mf!.sync();
    if (this.#o.syncScheme === 'per-round') {
      this.#main.builder.ramMultifdFlush();
      await this.#main.flush();
    }
  }

  // Repeated ram_find_and_save_block() until `budget` pages or nothing dirty is left. One call
  // starts at the last position; passing the end of the block list is a round (and, per-round,
  // a barrier); meeting the start position again after a round means all clean.
  async #savePages(budget: number): Promise<void> {
    const blocks = this.#model.blocks, n = blocks.length;
    const perRound = this.#mf !== undefined && this.#o.syncScheme === 'per-round';
    for (let saved = 0; saved < budget; saved++) {
      const startB = this.#lastBlock, startP = this.#lastPage;
      let b = startB, p = startP, round = false, found = false;
      for (;;) {
        const d = this.#dirty[b]!;
        p = p < d.length ? d.indexOf(1, p) : -1;
        if (p === -1) p = d.length;
        if (round && b === startB && p >= startP) break;
        if (p < d.length) { found = true; break; }
        p = 0;
        if (++b === n) {
          if (perRound) await this.#barrier();
          b = 0;
          round = true;
        }
      }
      this.#lastBlock = b;
      this.#lastPage = p;
      if (!found) return;
      this.#dirty[b]![p] = 0;
      this.#lastPage = p + 1;
      const w = this.#savePage(b, p);
      if (w !== undefined) await w;
    }
  }

  // ram_save_target_page(): zero pages on the main channel unless multifd detects them; other
  // pages on the main channel without multifd, else into the pending multifd packet.
  #savePage(b: number, page: number): Promise<void> | undefined {
    const blk = this.#model.blocks[b]!, offset = page * TARGET_PAGE_SIZE;
    this.stats.pages++;
    const mf = this.#mf;
    if (mf !== undefined && this.#o.multifd!.zeroPagesInMultifd) return mf.queuePage(b, offset);
    if (blk.isZeroPage(page)) {
      this.stats.zeroPages++;
      this.#main.builder.ramZero(blk.idstr, offset);
      return this.#main.maybeFlush();
    }
    if (mf !== undefined) return mf.queuePage(b, offset);
    this.#main.builder.ramPageFrom(blk.idstr, offset, blk.host, offset);
    return this.#main.maybeFlush();
  }
}
