import { wireError, hex } from '../errors.js';
import type { RAMBlock } from '../memory/ram-block.js';
import { WRITE_GUEST, type WriteMode } from '../memory/page-writer.js';
import type { ByteQueue } from '../wire/byte-queue.js';
import {
  RAM_SAVE_FLAG_COMPRESS_PAGE, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_EOS, RAM_SAVE_FLAG_FULL,
  RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_MEM_SIZE, RAM_SAVE_FLAG_MULTIFD_FLUSH, RAM_SAVE_FLAG_PAGE,
  RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_ZERO, TARGET_PAGE_SIZE,
} from '../wire/constants.js';
import type { Limits } from './limits.js';

/** What the RAM parser needs from its owner: the block list and where pages go now. */
export interface RamSink {
  /** MEM_SIZE announced the block list (START section only). */
  onMemSize(blocks: { idstr: string; usedLength: number }[]): void;
  findBlock(idstr: string): RAMBlock | undefined;
  /** WRITE_GUEST / WRITE_BOTH / WRITE_CACHE, spec §5.6. */
  writeMode(): WriteMode;
  /**
   * Decode only (`inspect`): offsets are checked against the block, page bytes are skipped.
   * A decoder must not allocate the guest's RAM to read a capture.
   */
  readonly discardPages?: boolean;
}

const RamState = { Record: 0, IdstrLen: 1, Idstr: 2, Page: 3, ZeroFill: 4, MemSizeName: 5, MemSizeLen: 6 } as const;
type RamState = (typeof RamState)[keyof typeof RamState];


export type RamFeedResult = 'blocked' | 'eos' | 'flush';

/**
 * RAM_SAVE_FLAG_* records of a `ram` section body (mirrors ram_load_precopy()).
 * One instance lives for the whole session: the CONTINUE "current block" survives sections
 * and COLO checkpoints (spec §4.6.4). Pages are copied straight from the socket chunks into
 * their page slot on this thread; there is no Buffer per page. A zero page takes no slot.
 */
export class RamSectionParser {
  #state: RamState = RamState.Record;
  #flags = 0;
  #addr = 0;           // byte offset in #block of the current page
  #pageLeft = 0;       // bytes of the current PAGE still to copy
  #nameLen = 0;
  #block: RAMBlock | undefined;    // last block named: what RAM_SAVE_FLAG_CONTINUE refers to
  #memTotal = 0;                   // MEM_SIZE: bytes announced
  #memSeen = 0;                    // MEM_SIZE: bytes listed so far
  #memName = '';
  #memList: { idstr: string; usedLength: number }[] = [];
  #mode: WriteMode = WRITE_GUEST;
  #target: Uint8Array | null = null;   // where the current PAGE's bytes are copied
  #targetAt = 0;
  #memSizeAllowed = false;
  /** Counters for stats; reset by the owner between checkpoints. */
  pages = 0;
  zeroPages = 0;
  bytes = 0;

  constructor(private readonly sink: RamSink, private readonly limits: Limits, private readonly channel = 'main') {}

  /** A START section may carry MEM_SIZE; PART/END may not. */
  beginSection(isStart: boolean): void { this.#memSizeAllowed = isStart; }

  feed(q: ByteQueue): RamFeedResult {
    for (;;) {
      switch (this.#state) {
        case RamState.Record: {
          if (q.length < 8) return 'blocked';
          const at = q.consumed;
          // be64 "addr | flags"; flags sit below the target page size. Read in place: no
          // Buffer per record on the per-page path.
          const hi = q.peekU32(0), lo = q.peekU32(4);
          q.skip(8);
          if (hi > 0x1f_ffff) throw wireError('ERR_RANGE', `ram: record address 0x${hex(hi)}${hex(lo)} above 2^53`, this.channel, at);
          this.#flags = lo & (TARGET_PAGE_SIZE - 1);
          this.#addr = hi * 2 ** 32 + (lo - this.#flags);
          const flags = this.#flags & ~RAM_SAVE_FLAG_CONTINUE;
          if (flags === RAM_SAVE_FLAG_EOS) return 'eos';
          if (flags === RAM_SAVE_FLAG_MULTIFD_FLUSH) return 'flush';
          if (flags === RAM_SAVE_FLAG_MEM_SIZE) { this.#startMemSize(at); break; }
          if (flags !== RAM_SAVE_FLAG_ZERO && flags !== RAM_SAVE_FLAG_PAGE) this.#rejectFlags(flags, at);
          if (this.#flags & RAM_SAVE_FLAG_CONTINUE) {
            if (!this.#block) throw wireError('ERR_UNKNOWN_RAMBLOCK', 'ram: CONTINUE with no previous block', this.channel, at);
            this.#beginPage(at);
          } else {
            this.#state = RamState.IdstrLen;
          }
          break;
        }
        case RamState.IdstrLen: {
          if (q.length < 1) return 'blocked';
          this.#nameLen = q.peekByte(0);
          q.skip(1);
          this.#state = RamState.Idstr;
          break;
        }
        case RamState.Idstr: {
          if (q.length < this.#nameLen) return 'blocked';
          const at = q.consumed;
          const name = q.take(this.#nameLen).toString('latin1');
          const block = this.sink.findBlock(name);
          if (!block) throw wireError('ERR_UNKNOWN_RAMBLOCK', `ram: can't find block "${name}"`, this.channel, at);
          this.#block = block;
          this.#beginPage(at);
          break;
        }
        case RamState.Page: {
          const n = Math.min(this.#pageLeft, q.length);
          if (n === 0) return 'blocked';
          if (this.#target) q.copyInto(this.#target, this.#targetAt + TARGET_PAGE_SIZE - this.#pageLeft, n);
          else q.skip(n);
          if ((this.#pageLeft -= n) > 0) return 'blocked';
          this.#finishPage(false);
          break;
        }
        case RamState.ZeroFill: {
          if (q.length < 1) return 'blocked';
          // peek + skip, not take(1): a Buffer per zero page made the record cost 71 ns
          // instead of 35, and QEMU 7.2 sends a loaded checkpoint's ~2,000 zero pages on the
          // main channel in one flush at the very end of the transfer, on its critical path.
          const fill = q.peekByte(0);
          q.skip(1);
          // 7.2 fills the page with the byte; newer QEMU rejects fill != 0 (spec §4.6.3).
          // We follow 7.2, the version we interoperate with.
          this.#fillPage(fill);
          this.#finishPage(true);
          break;
        }
        case RamState.MemSizeName: {
          if (q.length < 1) return 'blocked';
          const len = q.peekByte(0);
          if (q.length < 1 + len + 8) return 'blocked';
          const at = q.consumed;
          q.take(1);
          this.#memName = q.take(len).toString('latin1');
          const b = q.take(8);
          const hi = b.readUInt32BE(0), lo = b.readUInt32BE(4);
          const used = hi * 2 ** 32 + lo;
          if (len === 0) throw wireError('ERR_UNKNOWN_RAMBLOCK', 'ram: MEM_SIZE block with an empty name', this.channel, at);
          if (hi > 0x1f_ffff || used === 0 || used % TARGET_PAGE_SIZE !== 0 || this.#memSeen + used > this.#memTotal) {
            throw wireError('ERR_RANGE', `ram: block "${this.#memName}" used_length ${used} is not a page multiple within the announced total ${this.#memTotal}`, this.channel, at);
          }
          if (this.#memList.some((m) => m.idstr === this.#memName)) throw wireError('ERR_UNKNOWN_RAMBLOCK', `ram: block "${this.#memName}" listed twice`, this.channel, at);
          if (this.#memList.length + 1 > this.limits.maxBlocks) throw wireError('ERR_LIMIT', `ram: more than ${this.limits.maxBlocks} blocks`, this.channel, at);
          this.#memList.push({ idstr: this.#memName, usedLength: used });
          this.#memSeen += used;
          if (this.#memSeen === this.#memTotal) {
            this.sink.onMemSize(this.#memList);
            this.#memList = [];
            this.#state = RamState.Record;
          }
          break;
        }
        default:
          throw new Error(`ram parser in state ${this.#state}`);
      }
    }
  }

  #startMemSize(at: number): void {
    if (!this.#memSizeAllowed) throw wireError('ERR_UNKNOWN_SECTION', 'ram: MEM_SIZE outside the START section', this.channel, at);
    this.#memSizeAllowed = false;
    if (this.#addr > this.limits.maxRamBytes) throw wireError('ERR_LIMIT', `ram: MEM_SIZE total ${this.#addr} above the cap ${this.limits.maxRamBytes}`, this.channel, at);
    if (this.#addr === 0) throw wireError('ERR_RANGE', 'ram: MEM_SIZE total is 0', this.channel, at);
    this.#memTotal = this.#addr;
    this.#memSeen = 0;
    this.#memList = [];
    this.#state = RamState.MemSizeName;
  }

  #rejectFlags(flags: number, at: number): never {
    const what = flags === RAM_SAVE_FLAG_XBZRLE ? 'XBZRLE (capability xbzrle)'
      : flags === RAM_SAVE_FLAG_COMPRESS_PAGE ? 'COMPRESS_PAGE (legacy capability compress)'
      : flags === RAM_SAVE_FLAG_HOOK ? 'HOOK (RDMA)'
      : flags === RAM_SAVE_FLAG_FULL ? 'FULL (obsolete)' : null;
    if (what) throw wireError('ERR_UNSUPPORTED', `ram: record type ${what} is not supported`, this.channel, at);
    throw wireError('ERR_UNKNOWN_SECTION', `ram: unknown record flags 0x${flags.toString(16)}`, this.channel, at);
  }

  /** Checks the offset against the block (no write may land outside a RAMBlock) and picks the target. */
  #beginPage(at: number): void {
    const block = this.#block!;
    if (this.#addr + TARGET_PAGE_SIZE > block.usedLength) {
      throw wireError('ERR_RANGE', `ram: illegal RAM offset 0x${this.#addr.toString(16)} in block "${block.idstr}" of 0x${block.usedLength.toString(16)} bytes`, this.channel, at);
    }
    this.#mode = this.sink.writeMode();
    this.#target = null;
    if ((this.#flags & ~RAM_SAVE_FLAG_CONTINUE) === RAM_SAVE_FLAG_ZERO) {
      this.#state = RamState.ZeroFill;
    } else {
      if (!this.sink.discardPages) {
        const slot = block.slotFor(this.#addr / TARGET_PAGE_SIZE, this.#mode);
        this.#target = block.slab.view(slot);
        this.#targetAt = block.slab.offset(slot);
      }
      this.#pageLeft = TARGET_PAGE_SIZE;
      this.#state = RamState.Page;
    }
  }

  #fillPage(fill: number): void {
    if (this.sink.discardPages) return;
    const block = this.#block!;
    const page = this.#addr / TARGET_PAGE_SIZE;
    if (fill === 0) { block.zeroPage(page, this.#mode); return; }
    // 7.2 only: a page of one non-zero byte needs a slot like any data page.
    const slot = block.slotFor(page, this.#mode);
    block.slab.view(slot).fill(fill, block.slab.offset(slot), block.slab.offset(slot) + TARGET_PAGE_SIZE);
  }

  #finishPage(zero: boolean): void {
    if (zero) this.zeroPages++; else { this.pages++; this.bytes += TARGET_PAGE_SIZE; }
    this.#target = null;
    this.#state = RamState.Record;
  }

  /**
   * Where the next stream byte should sit modulo 8 for the page bytes after it to be 8-byte
   * aligned (src/wire/queue-reader.ts): inside a page, its offset in the page; between
   * records, 0 (a CONTINUE record's 8-byte header, then the page). Records that carry a block
   * name or a zero page shift it; the next read realigns.
   */
  get alignHint(): number {
    return this.#state === RamState.Page ? (TARGET_PAGE_SIZE - this.#pageLeft) & 7 : 0;
  }

  /** True when the parser sits between records (EOF here is clean). */
  get idle(): boolean { return this.#state === RamState.Record; }
}
