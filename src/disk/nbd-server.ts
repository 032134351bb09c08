// NBD server for the primary's block replication (QEMU `replication,mode=primary` over its NBD
// client): fixed newstyle handshake, simple replies, writes into PendingDisk epochs.
import net, { type Server, type Socket } from 'node:net';
import { MigrationError } from '../errors.js';
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import { ByteQueue } from '../wire/byte-queue.js';
import {
  CMD_NAMES, IHAVEOPT, NBD_CMD_BLOCK_STATUS, NBD_CMD_DISC, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_FLUSH, NBD_CMD_READ,
  NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_EINVAL, NBD_EIO, NBD_ESHUTDOWN, NBD_FLAG_C_FIXED_NEWSTYLE, NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_HAS_FLAGS, NBD_FLAG_NO_ZEROES, NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_MAX_OPTION, NBD_MAX_REQUEST, NBD_OPT_ABORT, NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO, NBD_OPT_INFO, NBD_OPT_LIST, NBD_REP_ACK, NBD_REP_ERR_INVALID, NBD_REP_ERR_POLICY, NBD_REP_ERR_UNKNOWN, NBD_REP_ERR_UNSUP,
  NBD_REP_INFO, NBD_REP_SERVER, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBDMAGIC, OPT_NAMES, OPT_REPLY_MAGIC, REQUEST_BYTES,
} from './nbd-protocol.js';
import type { PendingDisk } from './pending-disk.js';

/** What we advertise: writes, flush, FUA (acknowledged like a write), trim and write-zeroes. */
const EXPORT_FLAGS = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
/** Block sizes for NBD_INFO_BLOCK_SIZE: sector minimum, page preferred, QEMU's 32 MiB maximum. */
const MIN_BLOCK = 512, PREF_BLOCK = 4096;
const KNOWN_CMD_FLAGS = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;

export interface NbdServerOptions {
  host: string;
  port: number;
  disks: PendingDisk[];
  log?: Logger;
  /** A client silent this long inside a request (header read, payload missing) is dropped. 0: never. */
  ioTimeoutMs?: number;
  /** Handshakes in progress at once; more are refused (a stranger cannot pile up sockets). */
  maxHandshakes?: number;
}

/** Commands per type, per export (the note on what QEMU sent). */
export type CommandCounts = Record<string, number>;

type Stage = 'client-flags' | 'options' | 'transmission' | 'closed';

/**
 * One NBD connection. Requests are served in order, synchronously, as their bytes arrive:
 * a write's acknowledgement goes out only after it is in the pending epoch, so "acked by us"
 * implies "part of the checkpoint being built".
 */
class NbdConnection {
  readonly q = new ByteQueue();
  stage: Stage = 'client-flags';
  noZeroes = false;
  fixed = false;
  disk: PendingDisk | null = null;
  /** Requests whose header was read but not their payload: a death now loses a write. */
  inRequest = false;
  readonly name: string;

  constructor(readonly server: NbdServer, readonly sock: Socket, readonly id: number) {
    this.name = `nbd/?#${id}`;
  }

  get channel(): string { return this.disk ? `nbd/${this.disk.name}` : 'nbd/?'; }

  err(message: string, at = this.q.consumed): MigrationError {
    return new MigrationError('ERR_NBD', `${this.channel}: ${message}`, this.channel, at);
  }

  // ------------------------------------------------------------ replies

  optReply(opt: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    this.sock.write(data.length ? Buffer.concat([h, data]) : h);
  }

  optError(opt: number, type: number, msg: string): void { this.optReply(opt, type, Buffer.from(msg, 'utf8')); }

  simpleReply(handle: Buffer, error: number, data?: Buffer): void {
    const h = Buffer.allocUnsafe(16);
    h.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    handle.copy(h, 8);
    this.sock.write(data ? Buffer.concat([h, data]) : h);
  }

  // ------------------------------------------------------------ parsing

  /** Runs as far as the buffered bytes allow. Throws MigrationError on a protocol violation. */
  pump(): void {
    for (;;) {
      if (this.stage === 'closed') return;
      if (this.stage === 'client-flags') {
        if (this.q.length < 4) return;
        const f = this.q.take(4).readUInt32BE(0);
        if (f & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) throw this.err(`unknown client flags 0x${f.toString(16)}`, this.q.consumed - 4);
        this.fixed = (f & NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
        this.noZeroes = (f & NBD_FLAG_C_NO_ZEROES) !== 0;
        this.stage = 'options';
        continue;
      }
      if (this.stage === 'options') { if (!this.option()) return; continue; }
      if (!this.request()) return;
    }
  }

  /** One option (haggling phase); false when more bytes are needed. */
  option(): boolean {
    if (this.q.length < 16) return false;
    const h = this.q.peek(16);
    const at = this.q.consumed;
    if (h.readBigUInt64BE(0) !== IHAVEOPT) throw this.err(`option magic 0x${h.readBigUInt64BE(0).toString(16)}, expected IHAVEOPT`, at);
    const opt = h.readUInt32BE(8);
    const len = h.readUInt32BE(12);
    if (len > NBD_MAX_OPTION) throw this.err(`option ${OPT_NAMES[opt] ?? opt} carries ${len} bytes (cap ${NBD_MAX_OPTION})`, at + 12);
    if (this.q.length < 16 + len) return false;
    this.q.skip(16);
    const data = Buffer.from(this.q.take(len));
    const srv = this.server;
    srv.options[OPT_NAMES[opt] ?? `OPT_${opt}`] = (srv.options[OPT_NAMES[opt] ?? `OPT_${opt}`] ?? 0) + 1;
    switch (opt) {
      case NBD_OPT_EXPORT_NAME: {
        const name = data.toString('utf8');
        const disk = srv.find(name);
        // No error reply exists for EXPORT_NAME: the spec says close the connection.
        if (!disk) throw this.err(`unknown export "${name}" (NBD_OPT_EXPORT_NAME)`, at);
        if (!this.bind(disk, opt)) throw this.err(`export "${name}" already has a client`, at);
        const r = Buffer.alloc(this.noZeroes ? 10 : 134);
        r.writeBigUInt64BE(BigInt(disk.size), 0);
        r.writeUInt16BE(EXPORT_FLAGS, 8);
        this.sock.write(r);
        this.stage = 'transmission';
        return true;
      }
      case NBD_OPT_GO:
      case NBD_OPT_INFO: {
        if (len < 6) { this.optError(opt, NBD_REP_ERR_INVALID, 'option too short'); return true; }
        const nlen = data.readUInt32BE(0);
        if (4 + nlen + 2 > len) { this.optError(opt, NBD_REP_ERR_INVALID, 'name length beyond the option'); return true; }
        const name = data.toString('utf8', 4, 4 + nlen);
        const nreq = data.readUInt16BE(4 + nlen);
        if (4 + nlen + 2 + 2 * nreq !== len) { this.optError(opt, NBD_REP_ERR_INVALID, 'information request count does not match the length'); return true; }
        const reqs = new Set<number>();
        for (let i = 0; i < nreq; i++) reqs.add(data.readUInt16BE(4 + nlen + 2 + 2 * i));
        const disk = srv.find(name);
        if (!disk) {
          srv.log.warn({ channel: 'nbd/?', name, option: OPT_NAMES[opt] }, 'NBD client asked for an unknown export: refused');
          this.optError(opt, NBD_REP_ERR_UNKNOWN, `unknown export "${name}"`);
          return true;
        }
        if (opt === NBD_OPT_GO && disk.attached) {
          srv.log.warn({ channel: `nbd/${disk.name}` }, 'a second NBD client for an export that has one: refused');
          this.optError(opt, NBD_REP_ERR_POLICY, `export "${name}" already has a client`);
          return true;
        }
        const ex = Buffer.allocUnsafe(12);
        ex.writeUInt16BE(NBD_INFO_EXPORT, 0);
        ex.writeBigUInt64BE(BigInt(disk.size), 2);
        ex.writeUInt16BE(EXPORT_FLAGS, 10);
        this.optReply(opt, NBD_REP_INFO, ex);
        if (reqs.has(NBD_INFO_BLOCK_SIZE)) {
          const bs = Buffer.allocUnsafe(14);
          bs.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
          bs.writeUInt32BE(MIN_BLOCK, 2);
          bs.writeUInt32BE(PREF_BLOCK, 6);
          bs.writeUInt32BE(NBD_MAX_REQUEST, 10);
          this.optReply(opt, NBD_REP_INFO, bs);
        }
        this.optReply(opt, NBD_REP_ACK);
        if (opt === NBD_OPT_GO) { this.bind(disk, opt); this.stage = 'transmission'; }
        return true;
      }
      case NBD_OPT_LIST: {
        if (len !== 0) { this.optError(opt, NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data'); return true; }
        for (const d of srv.disks) {
          const n = Buffer.from(d.name, 'utf8');
          const b = Buffer.allocUnsafe(4 + n.length);
          b.writeUInt32BE(n.length, 0);
          n.copy(b, 4);
          this.optReply(opt, NBD_REP_SERVER, b);
        }
        this.optReply(opt, NBD_REP_ACK);
        return true;
      }
      case NBD_OPT_ABORT:
        this.optReply(opt, NBD_REP_ACK);
        this.close('NBD_OPT_ABORT');
        return true;
      default:
        // STRUCTURED_REPLY, STARTTLS, meta contexts, ...: refused, so QEMU's client falls back to
        // simple replies and never sends BLOCK_STATUS.
        if (!this.fixed) throw this.err(`option ${OPT_NAMES[opt] ?? opt} from a client without fixed newstyle`, at);
        this.optError(opt, NBD_REP_ERR_UNSUP, `option ${OPT_NAMES[opt] ?? opt} not supported`);
        return true;
    }
  }

  bind(disk: PendingDisk, opt: number): boolean {
    if (disk.attached) return false;
    this.disk = disk;
    disk.attach();
    this.server.log.info({ channel: `nbd/${disk.name}`, option: OPT_NAMES[opt], peer: this.sock.remoteAddress, size: disk.size }, 'NBD client attached');
    return true;
  }

  /** One request; false when more bytes are needed. */
  request(): boolean {
    const q = this.q;
    if (q.length < REQUEST_BYTES) { this.inRequest = q.length > 0; return false; }
    const h = q.peek(REQUEST_BYTES);
    const at = q.consumed;
    const disk = this.disk!;
    if (h.readUInt32BE(0) !== NBD_REQUEST_MAGIC) throw this.err(`request magic 0x${h.readUInt32BE(0).toString(16)}`, at);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const offset = Number(h.readBigUInt64BE(16));
    const length = h.readUInt32BE(24);
    const counts = this.server.commands(disk.name);
    const cname = CMD_NAMES[type] ?? `CMD_${type}`;
    if (type === NBD_CMD_WRITE) {
      // The payload follows the header: a write above the cap cannot be skipped safely.
      if (length > NBD_MAX_REQUEST) throw this.err(`WRITE of ${length} bytes (cap ${NBD_MAX_REQUEST})`, at + 24);
      if (q.length < REQUEST_BYTES + length) { this.inRequest = true; return false; }
    }
    this.inRequest = false;
    q.skip(REQUEST_BYTES);
    const handle = Buffer.from(h.subarray(8, 16));
    counts[cname] = (counts[cname] ?? 0) + 1;
    const bad = (why: string, errno = NBD_EINVAL, writeLike = false): void => {
      const e = this.err(`${cname} ${why}`, at);
      this.server.log.warn({ err: e }, 'NBD request refused');
      // The primary's quorum completes the guest's write without us: this checkpoint is not whole.
      if (writeLike) disk.fail(`${cname} at ${offset}+${length} refused: ${why}`);
      this.simpleReply(handle, errno);
    };
    if (flags & ~KNOWN_CMD_FLAGS) {
      if (type === NBD_CMD_WRITE) q.skip(length);
      bad(`with unknown flags 0x${flags.toString(16)}`, NBD_EINVAL, type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM);
      return true;
    }
    switch (type) {
      case NBD_CMD_WRITE: {
        if (!disk.inRange(offset, length)) { q.skip(length); bad(`${offset}+${length} outside the export (${disk.size} bytes)`, NBD_EINVAL, true); return true; }
        if (this.server.closing) { q.skip(length); bad('after the end of the session', NBD_ESHUTDOWN, true); return true; }
        const data = q.take(length);
        try { disk.write(offset, data); } catch (e) { bad(`failed: ${(e as Error).message}`, NBD_EIO, true); return true; }
        this.simpleReply(handle, 0);
        return true;
      }
      case NBD_CMD_WRITE_ZEROES:
      case NBD_CMD_TRIM: {
        if (!disk.inRange(offset, length)) { bad(`${offset}+${length} outside the export (${disk.size} bytes)`, NBD_EINVAL, true); return true; }
        if (this.server.closing) { bad('after the end of the session', NBD_ESHUTDOWN, true); return true; }
        try { disk.zero(offset, length); } catch (e) { bad(`failed: ${(e as Error).message}`, NBD_EIO, true); return true; }
        this.simpleReply(handle, 0);
        return true;
      }
      case NBD_CMD_READ: {
        if (length > NBD_MAX_REQUEST) { bad(`of ${length} bytes (cap ${NBD_MAX_REQUEST})`); return true; }
        if (!disk.inRange(offset, length)) { bad(`${offset}+${length} outside the export (${disk.size} bytes)`); return true; }
        let data: Buffer;
        try { data = disk.read(offset, length); } catch (e) { bad(`failed: ${(e as Error).message}`, NBD_EIO); return true; }
        this.simpleReply(handle, 0, data);
        return true;
      }
      case NBD_CMD_FLUSH:
        // Durability is the checkpoint's business: pending writes reach PATH when they commit.
        this.simpleReply(handle, 0);
        return true;
      case NBD_CMD_DISC:
        this.close('NBD_CMD_DISC');
        return true;
      case NBD_CMD_BLOCK_STATUS:
        bad('without a negotiated metadata context (structured replies are not offered)');
        return true;
      default:
        bad('is not supported');
        return true;
    }
  }

  close(why: string): void {
    if (this.stage === 'closed') return;
    const wasTransmitting = this.stage === 'transmission';
    this.stage = 'closed';
    if (this.disk && wasTransmitting) {
      this.disk.detach(why);
      this.server.log[why === 'NBD_CMD_DISC' || this.server.closing ? 'info' : 'warn']({ channel: `nbd/${this.disk.name}`, why, inRequest: this.inRequest }, 'NBD client detached');
    }
    this.sock.end();
    this.sock.destroySoon?.();
  }
}

/** NBD server for the configured disks (one client per export, as QEMU's docs require). */
export class NbdServer {
  readonly disks: PendingDisk[];
  readonly log: Logger;
  readonly options: Record<string, number> = {};
  readonly #commands = new Map<string, CommandCounts>();
  readonly #conns = new Set<NbdConnection>();
  readonly errors: MigrationError[] = [];
  #server: Server | null = null;
  #nextId = 0;
  closing = false;

  constructor(readonly opts: NbdServerOptions) {
    this.disks = opts.disks;
    this.log = opts.log ?? silentLogger;
    const names = new Set<string>();
    for (const d of this.disks) {
      if (names.has(d.name)) throw new RangeError(`two disks named "${d.name}"`);
      names.add(d.name);
    }
  }

  find(name: string): PendingDisk | undefined { return this.disks.find((d) => d.name === name); }

  commands(name: string): CommandCounts {
    let c = this.#commands.get(name);
    if (!c) { c = {}; this.#commands.set(name, c); }
    return c;
  }

  /** Commands received per export, by type. */
  get commandCounts(): Record<string, CommandCounts> { return Object.fromEntries(this.#commands); }

  async listen(): Promise<number> {
    const server = net.createServer((s) => this.#accept(s));
    this.#server = server;
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(this.opts.port, this.opts.host, () => { server.off('error', reject); resolve(); });
    });
    const a = server.address();
    const port = typeof a === 'object' && a ? a.port : this.opts.port;
    this.log.info({ host: this.opts.host, port, disks: this.disks.map((d) => ({ name: d.name, path: d.path, size: d.size })) }, 'NBD server listening');
    return port;
  }

  /** Serve one already-connected socket (tests use in-process pairs; the listener calls this too). */
  serve(sock: Socket): void { this.#accept(sock); }

  #accept(sock: Socket): void {
    const handshaking = [...this.#conns].filter((c) => c.stage !== 'transmission').length;
    if (this.closing || handshaking >= (this.opts.maxHandshakes ?? 16)) {
      this.log.warn({ channel: 'nbd/?', peer: sock.remoteAddress, closing: this.closing }, 'NBD connection refused');
      sock.destroy();
      return;
    }
    const c = new NbdConnection(this, sock, this.#nextId++);
    this.#conns.add(c);
    sock.setNoDelay(true);
    const io = this.opts.ioTimeoutMs ?? 0;
    if (io > 0) {
      sock.setTimeout(io);
      // Idle between requests is normal (a quiet guest); silence inside a request or handshake is not.
      sock.on('timeout', () => { if (c.inRequest || c.stage !== 'transmission') this.#fail(c, c.err(`no data for ${io} ms ${c.stage === 'transmission' ? 'inside a request' : 'in the handshake'}`)); });
    }
    sock.on('data', (d: Buffer) => {
      c.q.push(d);
      try { c.pump(); } catch (e) { this.#fail(c, e instanceof MigrationError ? e : c.err(`internal error: ${(e as Error).message}`)); }
    });
    sock.on('end', () => {
      if (c.stage !== 'closed') {
        if (c.inRequest) this.#fail(c, c.err('connection closed inside a request'));
        else c.close('peer closed the connection');
      }
    });
    sock.on('error', (e) => {
      if (c.stage !== 'closed') this.#fail(c, new MigrationError('ERR_PEER', `${c.channel}: ${e.message}`, c.channel, c.q.consumed, { cause: e }));
    });
    sock.on('close', () => { if (c.stage !== 'closed') c.close('socket closed'); this.#conns.delete(c); });
    const hello = Buffer.allocUnsafe(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
    sock.write(hello);
  }

  #fail(c: NbdConnection, e: MigrationError): void {
    if (c.stage === 'closed') return;
    this.errors.push(e);
    if (this.errors.length > 64) this.errors.shift();
    // The disk notices the lost client (detach); nothing committed is touched.
    this.log.warn({ err: e }, 'NBD connection failed');
    // A write cut short was never acknowledged; the detach below already makes this
    // checkpoint uncommittable (ERR_PEER: the primary is probably gone).
    c.close(e.message);
    c.sock.destroy();
  }

  /** Stop accepting and drop every client (the session ended). */
  async close(): Promise<void> {
    this.closing = true;
    for (const c of this.#conns) { c.close('receiver closing'); c.sock.destroy(); }
    const s = this.#server;
    if (s) await new Promise<void>((r) => s.close(() => r()));
  }
}

/** Re-exported for tests and the synthetic writer. */
export { NBD_EIO, NBD_EINVAL };
