// One replicated disk: PATH holds the committed checkpoint's disk; the primary's writes since
// the last commit are held apart (an epoch) until the checkpoint they belong to commits.
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { MigrationError } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';

/** Granularity of the pending map: guest filesystems write in 4 KiB blocks. */
export const DISK_BLOCK = 4096;
/** Pending data lives in slabs of this size (one allocation per 256 blocks, not per block). */
const SLAB = 1 << 20;
/** IOV_MAX on Linux: the most buffers one writev may carry. */
const IOV_MAX = 1024;
const ZERO_BLOCK = Buffer.alloc(DISK_BLOCK);
/** pwritev calls in flight while applying an epoch (libuv's pool has 4 threads by default). */
const APPLY_PARALLEL = 4;

/** A pending block: bytes in memory, a slot in the epoch's spill file, or zeroes (null). */
type Entry = Buffer | number | null;

/** Writes of one checkpoint interval, block-granular. */
class Epoch {
  readonly blocks = new Map<number, Entry>();
  memBytes = 0;
  spillSlots = 0;
  /** Bytes the primary wrote (WRITE/WRITE_ZEROES/TRIM lengths), for stats. */
  wrote = 0;
  /** Why this epoch cannot be committed: writes missed (no client for a while) or failed. */
  gap: string | null = null;
  failed: string | null = null;
  #slab: Buffer | null = null;
  #slabAt = SLAB;

  constructor(readonly index: number, readonly spill: { fd: number; path: string }) {}

  /** A 4 KiB buffer from the current slab (memory accounting is per slab). */
  alloc(): Buffer {
    if (this.#slabAt === SLAB) { this.#slab = Buffer.allocUnsafe(SLAB); this.#slabAt = 0; this.memBytes += SLAB; }
    const b = this.#slab!.subarray(this.#slabAt, this.#slabAt + DISK_BLOCK);
    this.#slabAt += DISK_BLOCK;
    return b;
  }

  /** Memory taken if the next block is allocated. */
  get nextAllocBytes(): number { return this.#slabAt === SLAB ? this.memBytes + SLAB : this.memBytes; }
}

export interface PendingDiskOptions {
  name: string;
  path: string;
  /** Pending bytes kept in memory per epoch before spilling to a file beside PATH (default 256 MiB). */
  maxPendingBytes?: number;
  /**
   * 'async' (default): the commit seals the epoch and PATH is written right after, while the
   * VM runs; `end()` and the next commit wait for it. 'sync': the commit returns once the
   * epoch is written to PATH and fdatasync'ed (durable inside the checkpoint pause).
   */
  commitMode?: 'async' | 'sync';
  /** Directory for the spill files (default: PATH's directory). */
  spillDir?: string;
  log?: Logger;
}

export interface DiskCommitRecord {
  checkpoint: number;
  /** Bytes the primary wrote in this checkpoint interval, and distinct 4 KiB blocks. */
  bytes: number;
  blocks: number;
  spilledBlocks: number;
  /** Time in the checkpoint pause: waiting for the previous apply + sealing (+ the apply in 'sync'). */
  commitMs: number;
  /** Writing this epoch's blocks to PATH (pwritev) and fdatasync. */
  applyMs?: number;
  syncMs?: number;
}

/**
 * PATH is a raw image; its size is the export size. Reads see PATH overlaid with the epoch
 * being applied and the pending one. `commit(k)` turns the pending epoch into checkpoint k's
 * (nothing of a later checkpoint can be in it: the primary stops its VM and drains block I/O
 * before it sends the checkpoint), `discard()` drops it. PATH itself only ever receives whole
 * committed epochs, so once `settle()` resolves it equals the last committed checkpoint's disk.
 */
export class PendingDisk {
  readonly name: string;
  readonly path: string;
  readonly size: number;
  readonly log: Logger;
  readonly maxPending: number;
  readonly mode: 'async' | 'sync';
  readonly records: DiskCommitRecord[] = [];
  committed = -1;
  #fh: FileHandle;
  #pending: Epoch;
  #applying: Epoch | null = null;
  #applyDone: Promise<void> = Promise.resolve();
  #applyError: Error | null = null;
  readonly #spills: { fd: number; path: string }[];
  #closed = false;
  /** An NBD client is attached now; one has been attached before. */
  #attached = false;
  #everAttached = false;

  private constructor(o: PendingDiskOptions, fh: FileHandle, size: number, spills: { fd: number; path: string }[]) {
    this.name = o.name;
    this.path = o.path;
    this.size = size;
    this.log = (o.log ?? silentLogger).child({ disk: o.name });
    this.maxPending = o.maxPendingBytes ?? 256 << 20;
    this.mode = o.commitMode ?? 'async';
    this.#fh = fh;
    this.#spills = spills;
    this.#pending = new Epoch(0, spills[0]!);
  }

  static async open(o: PendingDiskOptions): Promise<PendingDisk> {
    const fh = await open(o.path, 'r+');
    try {
      const st = await fh.stat();
      if (!st.isFile() && !st.isBlockDevice()) throw new RangeError(`--disk ${o.name}: ${o.path} is not a file or block device`);
      // a block device's stat size is 0: ask the kernel (util-linux)
      const size = st.isFile() ? st.size : Number(execFileSync('blockdev', ['--getsize64', o.path], { encoding: 'utf8' }).trim());
      if (size <= 0) throw new RangeError(`--disk ${o.name}: ${o.path} is empty (the export size is PATH's size)`);
      // Two spill files: the pending epoch may spill while the previous one is still being applied.
      const base = join(o.spillDir ?? dirname(o.path), `.${basename(o.path)}.colo-pending`);
      const spills = [0, 1].map((i) => ({ path: `${base}.${i}`, fd: fs.openSync(`${base}.${i}`, 'w+', 0o600) }));
      return new PendingDisk(o, fh, size, spills);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  // ---------------------------------------------------------------- client bookkeeping

  /**
   * An NBD client bound to this export. A client that comes (back) after another one means
   * the primary wrote without us for a while: the epoch it lands in cannot be committed.
   */
  attach(): void {
    if (this.#everAttached) this.#pending.gap ??= 'the NBD client reconnected: writes in between were not received';
    this.#attached = true;
    this.#everAttached = true;
  }

  /** The client left (DISC or a dead socket): the primary's writes from now on are not received. */
  detach(why: string): void {
    this.#attached = false;
    this.#pending.gap ??= `the NBD client went away (${why})`;
  }

  get attached(): boolean { return this.#attached; }

  /** A write we answered with an error: the primary's quorum carried on without us. */
  fail(why: string): void { this.#pending.failed ??= why; }

  // ---------------------------------------------------------------- data path (NBD server)

  inRange(offset: number, length: number): boolean {
    return Number.isSafeInteger(offset) && offset >= 0 && length >= 0 && offset + length <= this.size;
  }

  /** The current content of block b (pending, else being applied, else PATH) into dst. */
  #readBlock(b: number, dst: Buffer): void {
    const e = this.#pending.blocks.has(b) ? this.#pending : this.#applying?.blocks.has(b) ? this.#applying : null;
    if (e) { this.#entryInto(e, e.blocks.get(b)!, dst); return; }
    const at = b * DISK_BLOCK;
    const n = Math.min(DISK_BLOCK, this.size - at);
    const got = fs.readSync(this.#fh.fd, dst, 0, n, at);
    if (got < DISK_BLOCK) dst.fill(0, got);
  }

  #entryInto(e: Epoch, v: Entry, dst: Buffer): void {
    if (v === null) dst.fill(0);
    else if (typeof v === 'number') fs.readSync(e.spill.fd, dst, 0, DISK_BLOCK, v * DISK_BLOCK);
    else v.copy(dst);
  }

  /** Stores a full block's new content in the pending epoch (memory, or the spill file past the cap). */
  #store(b: number, src: Buffer): void {
    const e = this.#pending;
    const old = e.blocks.get(b);
    if (old instanceof Buffer) { src.copy(old); return; }
    if (typeof old === 'number') { fs.writeSync(e.spill.fd, src, 0, DISK_BLOCK, old * DISK_BLOCK); return; }
    if (e.nextAllocBytes <= this.maxPending) {
      const buf = e.alloc();
      src.copy(buf);
      e.blocks.set(b, buf);
      return;
    }
    const slot = e.spillSlots++;
    fs.writeSync(e.spill.fd, src, 0, DISK_BLOCK, slot * DISK_BLOCK);
    e.blocks.set(b, slot);
  }

  /** WRITE: data at offset (the caller checked the range). Blocks written partly are merged. */
  write(offset: number, data: Buffer): void {
    this.#pending.wrote += data.length;
    this.#span(offset, data.length, (b, from, to, at) => {
      if (from === 0 && to === DISK_BLOCK) { this.#store(b, data.subarray(at, at + DISK_BLOCK)); return; }
      const tmp = Buffer.allocUnsafe(DISK_BLOCK);
      this.#readBlock(b, tmp);
      data.copy(tmp, from, at, at + (to - from));
      this.#store(b, tmp);
    });
  }

  /** WRITE_ZEROES and TRIM (a trimmed range reads back as zeroes, as on the primary's raw file). */
  zero(offset: number, length: number): void {
    this.#pending.wrote += length;
    this.#span(offset, length, (b, from, to) => {
      if (from === 0 && to === DISK_BLOCK) {
        const e = this.#pending;
        const old = e.blocks.get(b);
        if (old instanceof Buffer) old.fill(0);         // keep the slab slot: it is counted
        else e.blocks.set(b, null);                     // a spill slot is simply abandoned
        return;
      }
      const tmp = Buffer.allocUnsafe(DISK_BLOCK);
      this.#readBlock(b, tmp);
      tmp.fill(0, from, to);
      this.#store(b, tmp);
    });
  }

  /** READ: PATH overlaid with the epochs not yet on it. */
  read(offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    const tmp = Buffer.allocUnsafe(DISK_BLOCK);
    this.#span(offset, length, (b, from, to, at) => {
      this.#readBlock(b, tmp);
      tmp.copy(out, at, from, to);
    });
    return out;
  }

  /** Calls fn(block, fromInBlock, toInBlock, offsetInRequest) for each block of [offset, offset+length). */
  #span(offset: number, length: number, fn: (b: number, from: number, to: number, at: number) => void): void {
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const b = Math.floor(pos / DISK_BLOCK);
      const from = pos - b * DISK_BLOCK;
      const to = Math.min(DISK_BLOCK, end - b * DISK_BLOCK);
      fn(b, from, to, pos - offset);
      pos += to - from;
    }
  }

  // ---------------------------------------------------------------- checkpoints

  /** Bytes held for the checkpoint in progress (distinct blocks x 4 KiB). */
  get pendingBytes(): number { return this.#pending.blocks.size * DISK_BLOCK; }

  /**
   * Makes the pending epoch checkpoint k's. Refuses (MigrationError) if the epoch missed
   * writes: ERR_PEER when the NBD client went away (the primary is probably gone: failover to
   * the previous checkpoint), ERR_DISK when a write failed or PATH could not be written.
   */
  async commit(k: number): Promise<void> {
    const t0 = performance.now();
    this.check(k);
    const e = this.#pending;
    // Backpressure: at most one epoch is being applied; the next commit waits for it.
    await this.#applyDone;
    if (this.#applyError) throw new MigrationError('ERR_DISK', `disk ${this.name}: writing checkpoint ${this.committed} to ${this.path} failed: ${this.#applyError.message}`, `nbd/${this.name}`, undefined, { cause: this.#applyError });
    this.#seal(k, e, t0);
    if (this.mode === 'sync') await this.#applyDone;
    const rec = this.records[this.records.length - 1]!;
    rec.commitMs = performance.now() - t0;
    if (this.mode === 'sync' && this.#applyError) throw new MigrationError('ERR_DISK', `disk ${this.name}: writing checkpoint ${k}: ${(this.#applyError as Error).message}`, `nbd/${this.name}`);
  }

  /** Throws the MigrationError commit(k) would refuse with; nothing changes. */
  check(k: number): void {
    const e = this.#pending;
    if (this.#closed) throw new MigrationError('ERR_DISK', `disk ${this.name}: closed`, `nbd/${this.name}`);
    if (this.#applyError) throw new MigrationError('ERR_DISK', `disk ${this.name}: writing checkpoint ${this.committed} to ${this.path} failed: ${this.#applyError.message}`, `nbd/${this.name}`, undefined, { cause: this.#applyError });
    if (e.failed) throw new MigrationError('ERR_DISK', `disk ${this.name}: checkpoint ${k} is missing a write: ${e.failed}`, `nbd/${this.name}`);
    if (!this.#attached) {
      const why = this.#everAttached ? e.gap ?? 'the NBD client went away' : 'no NBD client ever connected (drive_add + x-blockdev-change must run on the primary before migrate)';
      throw new MigrationError('ERR_PEER', `disk ${this.name}: cannot commit checkpoint ${k}: ${why}`, `nbd/${this.name}`);
    }
    if (e.gap) throw new MigrationError('ERR_PEER', `disk ${this.name}: cannot commit checkpoint ${k}: ${e.gap}`, `nbd/${this.name}`);
  }

  #seal(k: number, e: Epoch, t0: number): void {
    const rec: DiskCommitRecord = { checkpoint: k, bytes: e.wrote, blocks: e.blocks.size, spilledBlocks: e.spillSlots, commitMs: 0 };
    this.#pending = new Epoch(e.index + 1, this.#spills[(e.index + 1) % 2]!);
    this.committed = k;
    if (e.blocks.size > 0) {
      this.#applying = e;
      // Started on the next turn: even sorting the block list must not sit inside the pause.
      this.#applyDone = new Promise<void>((r) => setImmediate(r)).then(() => this.#apply(e, rec)).then(
        () => { this.#applying = null; },
        (err: Error) => { this.#applyError = err; this.log.error({ err, checkpoint: k }, 'writing a committed checkpoint to the disk image failed; the image is not the checkpoint\'s'); },
      );
    }
    rec.commitMs = performance.now() - t0;
    this.records.push(rec);
    if (this.records.length > 4096) this.records.splice(0, 2048);
  }

  /**
   * Writes a sealed epoch to PATH: runs of adjacent blocks as pwritev calls (a few in flight,
   * so scattered 4 KiB blocks do not wait on one thread-pool round trip each), then one fdatasync.
   */
  async #apply(e: Epoch, rec: DiskCommitRecord): Promise<void> {
    const t0 = performance.now();
    const keys = Float64Array.from(e.blocks.keys()).sort();
    const inflight = new Set<Promise<void>>();
    let failed: unknown = null;
    let i = 0;
    while (i < keys.length) {
      if (failed) throw failed;
      if (inflight.size >= APPLY_PARALLEL) await Promise.race(inflight);
      const first = keys[i]!;
      const bufs: Buffer[] = [];
      while (i < keys.length && keys[i] === first + bufs.length && bufs.length < IOV_MAX) {
        const b = keys[i]!;
        const v = e.blocks.get(b)!;
        let buf: Buffer;
        if (v === null) buf = ZERO_BLOCK;
        else if (typeof v === 'number') {
          // spilled: read back synchronously (page cache; the spill file was written moments ago)
          buf = Buffer.allocUnsafe(DISK_BLOCK);
          fs.readSync(e.spill.fd, buf, 0, DISK_BLOCK, v * DISK_BLOCK);
        } else buf = v;
        // the image's last block may be partial
        const room = this.size - b * DISK_BLOCK;
        bufs.push(room < DISK_BLOCK ? buf.subarray(0, room) : buf);
        i++;
      }
      const p = this.#writeRun(bufs, first * DISK_BLOCK).catch((err: unknown) => { failed ??= err; });
      inflight.add(p);
      void p.finally(() => inflight.delete(p));
    }
    await Promise.all(inflight);
    if (failed) throw failed;
    const t1 = performance.now();
    await this.#fh.datasync();
    rec.applyMs = t1 - t0;
    rec.syncMs = performance.now() - t1;
    if (e.spillSlots > 0) fs.ftruncateSync(e.spill.fd, 0);
    this.log.debug({ checkpoint: rec.checkpoint, bytes: rec.blocks * DISK_BLOCK, applyMs: rec.applyMs, syncMs: rec.syncMs }, 'disk checkpoint written');
  }

  async #writeRun(bufs: Buffer[], pos: number): Promise<void> {
    const want = bufs.reduce((s, x) => s + x.length, 0);
    const { bytesWritten } = await this.#fh.writev(bufs, pos);
    // short writes are legal: finish the run with plain writes
    if (bytesWritten < want) {
      const rest = Buffer.concat(bufs).subarray(bytesWritten);
      let at = 0;
      while (at < rest.length) at += (await this.#fh.write(rest, at, rest.length - at, pos + bytesWritten + at)).bytesWritten;
    }
  }

  /** Drops the pending epoch (a checkpoint that will never commit). */
  discard(): void {
    const e = this.#pending;
    if (e.spillSlots > 0 && this.#applying?.spill !== e.spill) fs.ftruncateSync(e.spill.fd, 0);
    this.#pending = new Epoch(e.index, e.spill);
    this.#pending.gap = e.gap;
  }

  /** Resolves once PATH holds the last committed checkpoint (its apply finished). */
  async settle(): Promise<void> {
    await this.#applyDone;
  }

  get applyError(): Error | null { return this.#applyError; }

  /** discard + settle + close the files. PATH then is the committed checkpoint's disk. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const dropped = this.#pending.blocks.size;
    this.discard();
    await this.settle();
    await this.#fh.close().catch(() => undefined);
    for (const s of this.#spills) {
      try { fs.closeSync(s.fd); } catch { /* closed */ }
      await unlink(s.path).catch(() => undefined);
    }
    if (dropped) this.log.info({ checkpoint: this.committed, blocks: dropped }, 'uncommitted disk writes dropped');
  }
}
