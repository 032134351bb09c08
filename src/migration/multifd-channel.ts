import { MigrationError, wireError } from '../errors.js';
import { SLOT_BYTES, SLOT_INDEX_BYTES, SLOT_PAYLOAD_BYTES, type WriteMode, type WriteTask } from '../memory/page-writer.js';
import type { RAMBlock } from '../memory/ram-block.js';
import { chunksFor, slotRunLength, type Slab } from '../memory/slab.js';
import { RES_PARTS } from '../net/socket-reader.js';
import type { PacketReader, Reservation } from '../net/threaded-read.js';
import { ByteQueue } from '../wire/byte-queue.js';
import {
  MULTIFD_FLAG_SYNC, MULTIFD_INIT_LEN, MULTIFD_PACKET_COMMON_HEADER_LEN, MULTIFD_PACKET_HEADER_LEN, MULTIFD_PAGES_PER_PACKET, TARGET_PAGE_SIZE,
} from '../wire/constants.js';
import type { Limits } from './limits.js';
import { checkPacketCommon, decodeMultiFDInit, decodeMultiFDPacket, type Compression, type MultiFDInit, type MultiFDPacket } from './multifd-packet.js';

export interface ChannelSink {
  /** Handshake decoded: check id range, duplicates, uuid; throw a MigrationError to refuse. */
  onHandshake(ch: MultiFDChannel, init: MultiFDInit): void;
  findBlock(idstr: string): RAMBlock | undefined;
  writeMode(): WriteMode;
  /** Decode only (`inspect`): offsets are checked, no slot is allocated, pages are counted. */
  readonly discardPages?: boolean;
  /** Runs a packet's page writes; compression methods route it to the channel's own decoder. */
  submit(ch: MultiFDChannel, task: WriteTask, compressedBytes: number): Promise<number>;
  /**
   * A packet header was decoded (before its pages are looked at): the place to check that the
   * packet belongs to the current barrier round. Throw a MigrationError to refuse it.
   */
  onPacket?(ch: MultiFDChannel, p: MultiFDPacket, at: number): void;
  /** Every page up to and including this channel's SYNC packet is written (spec §3.1 "arrived"). */
  onSynced(ch: MultiFDChannel): void;
  /** The channel cannot take more bytes now (no staging slot, or parked at SYNC). */
  onBlocked(ch: MultiFDChannel, blocked: boolean): void;
  /** The channel failed (after its peer closed, if `ch.ended`). */
  onError(err: MigrationError, ch: MultiFDChannel): void;
  /** The slab page slots come from, once the RAMBlock list is known (reader threads reserve runs in it). */
  reservationSlab?(): Slab | undefined;
}

/** A payload area reserved for a reader thread: runs of page slots, or a staging slot. */
interface ChannelReservation extends Reservation {
  /** The RESERVED_PAGES slots, in the order the payload fills them (empty: a staging slot). */
  slots: Uint32Array | null;
  /** The staging slot's offset (-1: runs). */
  staging: number;
  slab: Slab | null;
}

/** A reservation covers the largest packet QEMU sends (MULTIFD_PAGES_PER_PACKET). */
const RESERVED_PAGES = MULTIFD_PAGES_PER_PACKET;

const EMPTY = new Uint8Array(0);
/** A read that is not a header or a direct payload: Node's own read size. */
const SIDE_READ_BYTES = 64 * 1024;
/** QEMU's page_count is at most 128 (MULTIFD_PAGES_PER_PACKET); room for a 1 MiB packet. */
const MAX_PACKET_PAGES = SLOT_PAYLOAD_BYTES / TARGET_PAGE_SIZE;
/**
 * A payload is read straight into its page slots when they form at most this many runs per
 * 8 pages (each run is one read: a run of one page would be a syscall per page). The slab
 * hands out ascending slots, so a packet is usually one or two runs.
 */
const DIRECT_PAGES_PER_RUN = 8;

/** `COLO_DIRECT_PAGES=0`: every payload through a staging slot and a page writer (to compare). */
const directPagesDefault = (): boolean => process.env.COLO_DIRECT_PAGES !== '0';

const St = { Init: 0, Header: 1, WaitSlot: 2, Payload: 3, AtSync: 4, Failed: 5, Ended: 6, Direct: 7 } as const;
type St = (typeof St)[keyof typeof St];

/**
 * One multifd connection (the receive side of multifd_recv_thread): MultiFDInit_t, then
 * packets. Parsing stays on the main thread. A payload whose page slots are consecutive
 * runs is read by the kernel straight into them (what QEMU's readv into guest pages does):
 * no copy in user space at all. Otherwise (scattered slots, compressed streams, sockets
 * without direct reads) it lands in a SharedArrayBuffer staging slot and a page writer
 * (or the channel's decoder thread) copies it to its slots.
 * After a SYNC packet the channel parks until the main channel's barrier releases it.
 */
export class MultiFDChannel implements PacketReader {
  id = -1;
  name = 'multifd/?';
  readonly q = new ByteQueue();
  readonly staging: SharedArrayBuffer;
  readonly #slotIndex: Uint32Array;
  readonly #slotBytes: Uint8Array;
  readonly #free: number[] = [];
  #state: St = St.Init;
  #pkt: MultiFDPacket | null = null;
  #pktAt = 0;
  #block: RAMBlock | undefined;
  #slot = -1;
  #payloadLeft = 0;
  #inflight = 0;
  #syncPending = false;
  #blocked = false;
  #ended = false;
  /** Counters: packets, pages, zero pages, payload bytes (wire), for stats. */
  packets = 0;
  pages = 0;
  zeroPages = 0;
  bytes = 0;
  syncs = 0;
  /** Pages dispatched since the last barrier released this channel (0 at a checkpoint's end). */
  pagesSinceRelease = 0;
  /** packet_num of the SYNC packet this channel last parked at (-1: none yet). */
  syncNum = -1;
  /** Pages read by the kernel straight into their slots (no staging, no page writer). */
  directPages = 0;
  /** Packets its reader thread read whole (packet mode, src/net/threaded-read.ts). */
  threadPackets = 0;

  /** Slots of the current packet's normal pages, before it is known where its payload goes. */
  readonly #placed = new Uint32Array(MAX_PACKET_PAGES);
  #isPlaced = false;
  /** Direct payload: runs of consecutive slots, the one being filled, and bytes into it. */
  readonly #runView: Uint8Array[] = [];
  readonly #runAt = new Float64Array(MAX_PACKET_PAGES);
  readonly #runLen = new Float64Array(MAX_PACKET_PAGES);
  #runs = 0;
  #run = 0;
  #runOff = 0;
  /** The socket reads where readTarget() says (set by the owner once it adopted the socket). */
  #directReads = false;
  readonly #directPages: boolean;

  constructor(private readonly sink: ChannelSink, private readonly compression: Compression,
              private readonly limits: Limits, slots = 4, directPages = directPagesDefault()) {
    this.#directPages = directPages;
    this.staging = new SharedArrayBuffer(slots * SLOT_BYTES);
    this.#slotIndex = new Uint32Array(this.staging);
    this.#slotBytes = new Uint8Array(this.staging);
    for (let s = slots - 1; s >= 0; s--) this.#free.push(s * SLOT_BYTES);
  }

  get failed(): boolean { return this.#state === St.Failed; }
  /** Parked at a SYNC packet, waiting for the main channel's barrier. */
  get atSync(): boolean { return this.#state === St.AtSync; }
  /** SYNC seen and every write before it done. */
  get synced(): boolean { return this.#state === St.AtSync && this.#inflight === 0; }
  get ended(): boolean { return this.#ended; }
  /** Between packets with nothing in flight: a clean place for the peer to stop. */
  get quiescent(): boolean { return (this.#state === St.Header || this.#state === St.AtSync) && this.q.length === 0 && this.#inflight === 0; }

  /**
   * Inside a handshake or packet and short of its bytes: only then does silence mean the
   * peer stalled. Parked at a SYNC or waiting for a staging slot, the channel waits on us.
   */
  get waitingForPeer(): boolean {
    return this.#state === St.Init || (this.#state === St.Header && this.q.length > 0) || this.#state === St.Payload || this.#state === St.Direct ||
      (this.#state === St.Header && (this.midPacket?.() ?? false));
  }

  /** The socket should stay paused (no slot, or parked at SYNC). */
  get blocked(): boolean { return this.#blocked; }

  push(chunk: Buffer): void {
    if (this.#state === St.Failed) return;
    this.q.push(chunk);
    this.#pump();
  }

  // ---- direct reads (src/net/direct-read.ts): the socket reads where the parser says

  #readBuf: Uint8Array = EMPTY;
  #readDirect = false;
  #readExact = false;
  /** Payload bytes that a socket read put straight into their page slots or a staging slot. */
  directBytes = 0;
  /** Socket reads on the main thread (direct-read path), for the checkpoint log line. */
  reads = 0;

  /** The socket was adopted for direct reads: payloads may go straight into page slots. */
  useDirectReads(): void { this.#directReads = true; }

  /**
   * A packet's payload goes straight into its page slots (St.Direct) or its staging slot, once the queue is empty (bytes
   * must not overtake queued ones). Anything else (handshake, header, or payload while the
   * channel waits for a slot or holds queued bytes) is read into a small buffer sized to
   * what the parser still needs, so a header read never runs into the payload.
   */
  readTarget(): Uint8Array {
    if (this.#state === St.Direct && this.q.length === 0 && this.#run < this.#runs) {
      const at = this.#runAt[this.#run]! + this.#runOff;
      this.#readDirect = true;
      this.#readExact = true;
      this.#readBuf = this.#runView[this.#run]!.subarray(at, at + this.#runLen[this.#run]! - this.#runOff);
      return this.#readBuf;
    }
    const p = this.#pkt;
    if (this.#state === St.Payload && p && this.q.length === 0 && this.#payloadLeft > 0) {
      const at = this.#slot + SLOT_INDEX_BYTES + p.payloadLen - this.#payloadLeft;
      this.#readDirect = true;
      this.#readExact = true;
      this.#readBuf = this.#slotBytes.subarray(at, at + this.#payloadLeft);
      return this.#readBuf;
    }
    let need = 0;
    if (this.#state === St.Init) need = MULTIFD_INIT_LEN - this.q.length;
    else if (this.#state === St.Header) need = MULTIFD_PACKET_HEADER_LEN - this.q.length;
    this.#readDirect = false;
    // Not exact: a device-state packet (10.0+) is refused after its first 12 bytes, as QEMU does.
    this.#readExact = false;
    this.#readBuf = Buffer.allocUnsafe(need > 0 ? need : SIDE_READ_BYTES);
    return this.#readBuf;
  }

  /** The last target is a payload run or slot: nothing in it is usable until it is full. */
  readExact(): boolean { return this.#readExact; }

  onDirectRead(n: number): void {
    this.reads++;
    if (this.#state === St.Failed) return;
    if (!this.#readDirect) { this.push(Buffer.from(this.#readBuf.buffer, this.#readBuf.byteOffset, n)); return; }
    this.q.consumedElsewhere(n);
    if (this.#state === St.Direct) this.#advanceRun(n);
    else this.#payloadLeft -= n;
    this.directBytes += n;
    this.#pump();
  }

  /** The barrier released this channel: continue with the packets after its SYNC. */
  release(): void {
    if (this.#state !== St.AtSync) return;
    this.#syncPending = false;
    this.pagesSinceRelease = 0;
    this.#state = St.Header;
    this.#pump();
  }

  /**
   * Socket EOF. Bytes still queued (the channel may be parked at a SYNC) are parsed first;
   * the EOF is clean only if they end at a packet boundary (spec §2.1).
   */
  end(): void {
    this.#ended = true;
    this.#pump();
  }

  /** Ended, and everything it sent has been parsed. */
  get exhausted(): boolean { return this.#ended && this.q.length === 0 && (this.#state === St.Header || this.#state === St.AtSync || this.#state === St.Ended); }

  fail(err: MigrationError): void { this.#fail(err); }

  #fail(err: MigrationError): void {
    if (this.#state === St.Failed) return;
    this.#state = St.Failed;
    this.q.clear();
    this.sink.onError(err, this);
  }

  #setBlocked(b: boolean): void {
    if (b !== this.#blocked) { this.#blocked = b; this.sink.onBlocked(this, b); }
  }

  #pump(): void {
    try {
      this.#step();
      if (this.#ended && this.#state !== St.AtSync && this.#state !== St.Failed && this.#state !== St.WaitSlot && !(this.#state === St.Header && this.q.length === 0)) {
        throw wireError('ERR_TRUNCATED', `${this.name}: connection closed inside ${this.#state === St.Init ? 'the handshake' : 'a packet'}`, this.name, this.q.consumed);
      }
    } catch (e) {
      this.#fail(e instanceof MigrationError ? e : wireError('ERR_WORKER', `${this.name}: ${String(e)}`, this.name, this.q.consumed));
    }
  }

  #step(): void {
    const q = this.q;
    for (;;) {
      switch (this.#state) {
        case St.Init: {
          if (q.length < MULTIFD_INIT_LEN) return this.#setBlocked(false);
          const at = q.consumed;
          const init = decodeMultiFDInit(q.take(MULTIFD_INIT_LEN), this.name, at);
          this.id = init.id;
          this.name = `multifd/${init.id}`;
          this.sink.onHandshake(this, init);
          this.#state = St.Header;
          break;
        }
        case St.Header: {
          // 10.0+ reads the 12-byte common header first and fails early on a device-state
          // packet; checking it before waiting for all 1344 bytes gives the same error here.
          if (q.length >= MULTIFD_PACKET_COMMON_HEADER_LEN && q.length < MULTIFD_PACKET_HEADER_LEN) {
            checkPacketCommon(q.peek(MULTIFD_PACKET_COMMON_HEADER_LEN), this.name, q.consumed);
          }
          if (q.length < MULTIFD_PACKET_HEADER_LEN) return this.#setBlocked(false);
          this.#pktAt = q.consumed;
          const { p, block } = this.#decodeHeader(q.take(MULTIFD_PACKET_HEADER_LEN));
          if (block) {
            this.#block = block;
            this.#state = this.#tryDirect(p, block) ? St.Direct : St.WaitSlot;
          } else {
            this.#afterPacket();
          }
          break;
        }
        case St.WaitSlot: {
          const p = this.#pkt!;
          // An uncompressed packet of zero pages only has nothing for a worker: the table
          // entries are the whole write. (A compressed one still continues its stream.)
          if (p.normalPages === 0 && p.payloadLen === 0 && this.compression === 'none') {
            this.#placePages(p, this.#block!, this.#placed, 0);
            this.#afterPacket();
            break;
          }
          const slot = this.#free.pop();
          if (slot === undefined) return this.#setBlocked(true);
          this.#slot = slot;
          if (this.#isPlaced) this.#slotIndex.set(this.#placed.subarray(0, p.normalPages), slot / 4);
          else this.#placePages(p, this.#block!, this.#slotIndex, slot / 4);
          this.#isPlaced = false;
          this.#payloadLeft = p.payloadLen;
          this.#state = St.Payload;
          break;
        }
        case St.Payload: {
          const p = this.#pkt!;
          const n = Math.min(this.#payloadLeft, q.length);
          if (n > 0) {
            q.copyInto(this.#slotBytes, this.#slot + SLOT_INDEX_BYTES + p.payloadLen - this.#payloadLeft, n);
            this.#payloadLeft -= n;
          }
          if (this.#payloadLeft > 0) return this.#setBlocked(false);
          this.#dispatch(p, this.#block!, this.#slot);
          this.#afterPacket();
          break;
        }
        case St.Direct: {
          // Bytes queued before the payload began (a read that ran past the header) are
          // copied here; the rest arrives by direct reads into the runs.
          while (q.length > 0 && this.#run < this.#runs) {
            const r = this.#run;
            const n = Math.min(this.#runLen[r]! - this.#runOff, q.length);
            q.copyInto(this.#runView[r]!, this.#runAt[r]! + this.#runOff, n);
            this.#advanceRun(n);
          }
          if (this.#run < this.#runs) return this.#setBlocked(false);
          this.directPages += this.#pkt!.normalPages;
          this.#runView.length = 0;
          this.#afterPacket();
          break;
        }
        case St.AtSync:
          return this.#setBlocked(true);
        case St.Failed:
        case St.Ended:
          return;
      }
    }
  }

  /** Decodes and checks a packet header at #pktAt; the block when the packet carries pages. */
  #decodeHeader(b: Buffer): { p: MultiFDPacket; block: RAMBlock | undefined } {
    // A compressed payload is copied into one staging slot: a cap above the slot size
    // (limits are user options) would let it spill into the next slot's packet.
    const maxPayload = Math.min(this.limits.maxPacketPayload, SLOT_PAYLOAD_BYTES);
    const p = decodeMultiFDPacket(b, this.name, this.#pktAt, this.compression, maxPayload);
    this.#pkt = p;
    this.packets++;
    this.sink.onPacket?.(this, p, this.#pktAt);
    const n = p.normalPages + p.zeroPages;
    if (n === 0) return { p, block: undefined };
    const block = this.sink.findBlock(p.ramblock);
    if (!block) throw wireError('ERR_UNKNOWN_RAMBLOCK', `${this.name}: unknown ram block ${p.ramblock}`, this.name, this.#pktAt + 64);
    for (let k = 0; k < n; k++) {
      const off = p.offsets[k]!;
      // QEMU checks only offset <= used_length - P; an unaligned offset would make a
      // page straddle two pages of ours, so it is refused too.
      if (off + TARGET_PAGE_SIZE > block.usedLength || off % TARGET_PAGE_SIZE !== 0) {
        throw wireError('ERR_RANGE', `${this.name}: offset too long 0x${off.toString(16)} (max 0x${(block.usedLength - TARGET_PAGE_SIZE).toString(16)}) in block ${block.idstr}`, this.name, this.#pktAt + 320 + 8 * k);
      }
    }
    return { p, block };
  }

  // ---- packet mode: a reader thread reads whole packets (src/net/threaded-read.ts)

  /** Set by the reader's socket: the reader is inside a packet (the peer owes bytes). */
  midPacket?: () => boolean;
  /** Set by the reader's socket: a staging slot came back, reservations may be made again. */
  onReservable?: () => void;

  packetsReady(): boolean {
    return this.#directReads && this.#directPages && this.compression === 'none' && !this.sink.discardPages &&
      this.#state === St.Header && this.q.length === 0 && !this.#ended;
  }

  /**
   * RESERVED_PAGES free slots in at most RES_PARTS parts, or a staging slot: before the
   * RAMBlock list is known, when the free slots are too scattered, or when --max-memory
   * refuses the chunk a slot would need.
   */
  reserve(): ChannelReservation | null {
    const slab = this.sink.reservationSlab?.();
    if (slab) {
      // As #placePages takes slots: runs of free slots, longest first down to
      // DIRECT_PAGES_PER_RUN, then single slots, which fill the holes commits leave (memory
      // already mapped; without them the slab would grow with fragmentation). Consecutive
      // singles join into one part; each part is one read for the reader thread.
      const slots = new Uint32Array(RESERVED_PAGES);
      const parts: Reservation['parts'] = [];
      let n = 0, last = -2, runs = true;
      try {
        while (n < RESERVED_PAGES && parts.length <= RES_PARTS) {
          let first = runs ? slab.takeRun(RESERVED_PAGES - n, DIRECT_PAGES_PER_RUN) : -1, len = 1;
          if (first >= 0) len = slab.runLength;
          else { runs = false; first = slab.alloc(); }
          if (first === last + 1 && (first >>> slab.chunkSlotBits) === (last >>> slab.chunkSlotBits)) {
            parts[parts.length - 1]!.bytes += len * TARGET_PAGE_SIZE;
          } else if (parts.length < RES_PARTS) {
            parts.push({ sab: slab.chunks[first >>> slab.chunkSlotBits]!, offset: slab.offset(first), bytes: len * TARGET_PAGE_SIZE });
          } else {
            for (let k = 0; k < len; k++) slab.free(first + k);
            break;
          }
          for (let k = 0; k < len; k++) slots[n++] = first + k;
          last = first + len - 1;
        }
      } catch {
        // --max-memory: the packet takes a staging slot; placing its pages reports ERR_LIMIT.
      }
      if (n === RESERVED_PAGES) return { parts, slots, staging: -1, slab };
      for (let k = 0; k < n; k++) slab.free(slots[k]!);
    }
    const st = this.#free.pop();
    if (st === undefined) return null;
    return { parts: [{ sab: this.staging, offset: st + SLOT_INDEX_BYTES, bytes: SLOT_PAYLOAD_BYTES }], slots: null, staging: st, slab: null };
  }

  unreserve(r: Reservation): void {
    const res = r as ChannelReservation;
    if (res.slab && res.slots) for (const s of res.slots) res.slab.free(s);
    else this.#free.push(res.staging);
  }

  /**
   * One whole packet from the reader thread: checked and placed as if parsed here. Pages in a
   * reserved run are already in their slots: the tables take them (RAMBlock.adoptSlot); a
   * staging slot goes to a page writer as usual.
   */
  onReaderPacket(header: Buffer, payloadBytes: number, r: Reservation | null): void {
    if (this.#state === St.Failed) { if (r) this.unreserve(r); return; }
    const res = r as ChannelReservation | null;
    this.threadPackets++;
    try {
      this.#pktAt = this.q.consumed;
      this.q.consumedElsewhere(MULTIFD_PACKET_HEADER_LEN);
      let p: MultiFDPacket, block: RAMBlock | undefined;
      try {
        ({ p, block } = this.#decodeHeader(header));
        if (p.payloadLen !== payloadBytes) throw wireError('ERR_WORKER', `${this.name}: reader thread read ${payloadBytes} payload bytes for a packet of ${p.payloadLen}`, this.name, this.#pktAt);
      } catch (e) {
        if (res) this.unreserve(res);
        throw e;
      }
      this.q.consumedElsewhere(payloadBytes);
      if (block && res && res.slab && res.slots) {
        const mode = this.sink.writeMode();
        for (let k = 0; k < p.normalPages; k++) block.adoptSlot(p.offsets[k]! / TARGET_PAGE_SIZE, mode, res.slots[k]!);
        for (let k = p.normalPages; k < RESERVED_PAGES; k++) res.slab.free(res.slots[k]!);
        this.#placeZeroPages(p, block, mode);
        this.directPages += p.normalPages;
      } else if (block && res) {
        this.#placePages(p, block, this.#slotIndex, res.staging / 4);
        this.#dispatch(p, block, res.staging);
      } else if (block) {
        this.#placePages(p, block, this.#slotIndex, 0);
      } else if (res) {
        this.unreserve(res);
      }
      this.directBytes += payloadBytes;
      this.#afterPacket();
      this.#pump();
    } catch (e) {
      this.#fail(e instanceof MigrationError ? e : wireError('ERR_WORKER', `${this.name}: ${String(e)}`, this.name, this.q.consumed));
    }
  }

  /** The reader could not size a header: decoded here, it fails with the peer's error. */
  onReaderBadHeader(header: Buffer): void { this.push(header); }

  /** EOF from the reader thread `into` bytes of a packet (0: at a packet boundary). */
  onReaderEnd(into: number): void {
    if (into === 0 || this.#state === St.Failed) return;
    this.#ended = true;
    this.#fail(wireError('ERR_TRUNCATED', `${this.name}: connection closed inside a packet`, this.name, this.q.consumed + into));
  }

  /**
   * Destination slots for the normal pages (into the staging slot's index area, for the
   * worker), table entries for the zero pages. Allocation is integer work on this thread, so
   * workers never contend for it; ERR_LIMIT (--max-memory) surfaces here as a channel error.
   */
  #placePages(p: MultiFDPacket, block: RAMBlock, into: Uint32Array, idx: number): void {
    const mode = this.sink.writeMode();
    if (this.sink.discardPages) {
      // no table to fill: a decoder must not allocate the guest's RAM to read a capture
    } else {
      // Runs of free slots (the longest there are, down to 8 pages), so the payload can be
      // read straight into them; single slots (filling holes) when there are none.
      const n = p.normalPages, slab = block.slab;
      const runs = this.#directReads && this.#directPages && this.compression === 'none';
      for (let k = 0; k < n;) {
        let next = runs ? slab.takeRun(n - k, DIRECT_PAGES_PER_RUN) : -1;
        if (next < 0) {
          for (; k < n; k++) into[idx + k] = block.slotFor(p.offsets[k]! / TARGET_PAGE_SIZE, mode);
          break;
        }
        const end = next + slab.runLength;
        for (; k < n && next < end; k++) {
          const s = block.slotFor(p.offsets[k]! / TARGET_PAGE_SIZE, mode, next);
          into[idx + k] = s;
          if (s === next) next++;
        }
        // Pages that already had a slot in this checkpoint left part of the run unused.
        for (; next < end; next++) slab.free(next);
      }
    }
    if (!this.sink.discardPages) this.#placeZeroPages(p, block, mode);
    else this.#count(p);
  }

  /** Zero pages take table entries only; then the packet's pages are counted. */
  #placeZeroPages(p: MultiFDPacket, block: RAMBlock, mode: WriteMode): void {
    for (let k = p.normalPages; k < p.normalPages + p.zeroPages; k++) block.zeroPage(p.offsets[k]! / TARGET_PAGE_SIZE, mode);
    this.#count(p);
  }

  #count(p: MultiFDPacket): void {
    this.pages += p.normalPages;
    this.zeroPages += p.zeroPages;
    this.pagesSinceRelease += p.normalPages + p.zeroPages;
    this.bytes += p.payloadLen;
  }

  /**
   * Places the packet's pages, and when their slots are few runs of consecutive slots, sets
   * the payload to be read straight into them. Placing first is safe either way: slotFor is
   * idempotent within a checkpoint, and a packet that falls back keeps its slots.
   */
  #tryDirect(p: MultiFDPacket, block: RAMBlock): boolean {
    this.#isPlaced = false;
    if (!this.#directReads || !this.#directPages || this.compression !== 'none' || this.sink.discardPages || p.normalPages === 0) return false;
    const slots = this.#placed;
    this.#placePages(p, block, slots, 0);
    this.#isPlaced = true;
    const slab = block.slab;
    const maxRuns = Math.max(2, Math.floor(p.normalPages / DIRECT_PAGES_PER_RUN));
    let runs = 0;
    for (let k = 0; k < p.normalPages;) {
      const first = slots[k]!;
      const n = slotRunLength(slots, k, p.normalPages, slab.chunkSlotBits);
      if (runs === maxRuns) { this.#runView.length = 0; return false; }
      this.#runView[runs] = slab.view(first);
      this.#runAt[runs] = slab.offset(first);
      this.#runLen[runs] = n * TARGET_PAGE_SIZE;
      runs++;
      k += n;
    }
    this.#runs = runs;
    this.#run = 0;
    this.#runOff = 0;
    this.#isPlaced = false;
    return true;
  }

  #advanceRun(n: number): void {
    this.#runOff += n;
    if (this.#runOff === this.#runLen[this.#run]) { this.#run++; this.#runOff = 0; }
  }

  #dispatch(p: MultiFDPacket, block: RAMBlock, slot: number): void {
    const task: WriteTask = {
      op: 'write',
      mem: this.sink.discardPages ? { chunkSlotBits: 0, ids: [], chunks: [] } : chunksFor(block.slab, this.#slotIndex.subarray(slot / 4, slot / 4 + p.normalPages), p.normalPages),
      staging: this.staging, slotOffset: slot, normalPages: p.normalPages,
    };
    this.#inflight++;
    this.sink.submit(this, task, this.compression === 'none' ? 0 : p.payloadLen).then(
      () => {
        this.#inflight--;
        this.#free.push(slot);
        this.onReservable?.();
        if (this.#state === St.Failed) return;
        if (this.#state === St.AtSync) { if (this.#inflight === 0) this.sink.onSynced(this); return; }
        this.#pump();
      },
      (e: unknown) => {
        this.#inflight--;
        this.#fail(e instanceof MigrationError ? e : new MigrationError('ERR_WORKER', `${this.name}: page writer failed: ${String(e)}`, this.name, this.#pktAt, { cause: e }));
      },
    );
  }

  /** Pages of a SYNC packet are processed before it counts as a sync point (spec §2.9). */
  #afterPacket(): void {
    const p = this.#pkt!;
    this.#pkt = null;
    if (p.flags & MULTIFD_FLAG_SYNC) {
      this.syncs++;
      this.syncNum = p.packetNum;
      this.#syncPending = true;
      this.#state = St.AtSync;
      if (this.#inflight === 0) this.sink.onSynced(this);
    } else {
      this.#state = St.Header;
    }
  }
}
