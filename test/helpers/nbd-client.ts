// A small NBD client that puts on the wire what QEMU 7.2's NBD client (nbd/client.c) sends for
// `file.driver=nbd,file.export=NAME`: client flags FIXED_NEWSTYLE|NO_ZEROES, NBD_OPT_STRUCTURED_REPLY
// (len 0), then NBD_OPT_GO with one information request (NBD_INFO_BLOCK_SIZE) - falling back to
// NBD_OPT_EXPORT_NAME when GO is unsupported - then requests with simple replies. Raw access to
// the socket lets tests send malformed bytes.
import net from 'node:net';
import { once } from 'node:events';
import {
  IHAVEOPT, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_READ, NBD_CMD_TRIM, NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT, NBD_OPT_EXPORT_NAME, NBD_OPT_GO, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK,
  NBD_REP_ERR_UNSUP, NBD_REP_INFO, NBD_REQUEST_MAGIC, NBD_SIMPLE_REPLY_MAGIC, NBDMAGIC, OPT_REPLY_MAGIC,
} from '../../src/disk/nbd-protocol.js';
import { ByteQueue } from '../../src/wire/byte-queue.js';

export interface OptReply { opt: number; type: number; data: Buffer }
export interface ExportInfo { size: number; flags: number; blockSize?: { min: number; pref: number; max: number }; via: 'GO' | 'EXPORT_NAME' }

export class NbdTestClient {
  readonly q = new ByteQueue();
  #wake: (() => void) | null = null;
  ended = false;
  #cookie = 1n;
  /** The server's handshake flags. */
  serverFlags = 0;

  private constructor(readonly sock: net.Socket) {
    sock.on('data', (d: Buffer) => { this.q.push(d); this.#wake?.(); });
    sock.on('close', () => { this.ended = true; this.#wake?.(); });
    sock.on('error', () => { this.ended = true; this.#wake?.(); });
  }

  static async connect(port: number, host = '127.0.0.1'): Promise<NbdTestClient> {
    const s = net.connect(port, host);
    await once(s, 'connect');
    s.setNoDelay(true);
    return new NbdTestClient(s);
  }

  /** Next n bytes from the server; rejects if the connection closes first. */
  async take(n: number): Promise<Buffer> {
    while (this.q.length < n) {
      if (this.ended) throw new Error(`connection closed (wanted ${n} bytes, have ${this.q.length})`);
      await new Promise<void>((r) => { this.#wake = r; });
      this.#wake = null;
    }
    return Buffer.from(this.q.take(n));
  }

  /** Resolves once the server closed the connection. */
  async closed(): Promise<void> {
    while (!this.ended) { await new Promise<void>((r) => { this.#wake = r; }); this.#wake = null; }
  }

  send(b: Buffer): void { this.sock.write(b); }

  /** Reads NBDMAGIC, IHAVEOPT and the handshake flags; answers with `clientFlags`. */
  async greet(clientFlags = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES): Promise<void> {
    const h = await this.take(18);
    if (h.readBigUInt64BE(0) !== NBDMAGIC || h.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('not a newstyle NBD server');
    this.serverFlags = h.readUInt16BE(16);
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags, 0);
    this.send(f);
  }

  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(opt, 8);
    h.writeUInt32BE(data.length, 12);
    this.send(Buffer.concat([h, data]));
  }

  async optReply(): Promise<OptReply> {
    const h = await this.take(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic ${h.readBigUInt64BE(0).toString(16)}`);
    const len = h.readUInt32BE(16);
    return { opt: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.take(len) };
  }

  static goData(name: string, infos: number[] = [NBD_INFO_BLOCK_SIZE]): Buffer {
    const n = Buffer.from(name, 'utf8');
    const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    b.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((t, i) => b.writeUInt16BE(t, 4 + n.length + 2 + 2 * i));
    return b;
  }

  /** Replies to GO/INFO up to the final one (ACK or an error). */
  async goReplies(): Promise<OptReply[]> {
    const out: OptReply[] = [];
    for (;;) {
      const r = await this.optReply();
      out.push(r);
      if (r.type !== NBD_REP_INFO) return out;
    }
  }

  /** QEMU 7.2's negotiation for export `name`. */
  async handshake(name: string): Promise<ExportInfo> {
    await this.greet();
    this.option(NBD_OPT_STRUCTURED_REPLY);
    const sr = await this.optReply();
    if (sr.type !== NBD_REP_ACK && sr.type !== NBD_REP_ERR_UNSUP) throw new Error(`STRUCTURED_REPLY answered ${sr.type}`);
    this.option(NBD_OPT_GO, NbdTestClient.goData(name));
    const replies = await this.goReplies();
    const last = replies[replies.length - 1]!;
    if (last.type === NBD_REP_ERR_UNSUP) {
      this.option(NBD_OPT_EXPORT_NAME, Buffer.from(name, 'utf8'));
      const r = await this.take(10);
      return { size: Number(r.readBigUInt64BE(0)), flags: r.readUInt16BE(8), via: 'EXPORT_NAME' };
    }
    if (last.type !== NBD_REP_ACK) throw new Error(`NBD_OPT_GO refused: type 0x${last.type.toString(16)} ${last.data.toString('utf8')}`);
    const info: Partial<ExportInfo> = { via: 'GO' };
    for (const r of replies.slice(0, -1)) {
      const t = r.data.readUInt16BE(0);
      if (t === NBD_INFO_EXPORT) { info.size = Number(r.data.readBigUInt64BE(2)); info.flags = r.data.readUInt16BE(10); }
      if (t === NBD_INFO_BLOCK_SIZE) info.blockSize = { min: r.data.readUInt32BE(2), pref: r.data.readUInt32BE(6), max: r.data.readUInt32BE(10) };
    }
    if (info.size === undefined) throw new Error('no NBD_INFO_EXPORT before ACK');
    return info as ExportInfo;
  }

  // ------------------------------------------------------------ transmission

  request(type: number, offset: number, length: number, flags = 0, payload?: Buffer): bigint {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    const cookie = this.#cookie++;
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.send(payload ? Buffer.concat([h, payload]) : h);
    return cookie;
  }

  /** One simple reply: its errno, and `readLength` bytes of data when it succeeded. */
  async reply(cookie: bigint, readLength = 0): Promise<{ error: number; data?: Buffer }> {
    const h = await this.take(16);
    if (h.readUInt32BE(0) !== NBD_SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic ${h.readUInt32BE(0).toString(16)}`);
    if (h.readBigUInt64BE(8) !== cookie) throw new Error(`reply for cookie ${h.readBigUInt64BE(8)}, expected ${cookie}`);
    const error = h.readUInt32BE(4);
    if (error === 0 && readLength > 0) return { error, data: await this.take(readLength) };
    return { error };
  }

  async write(offset: number, data: Buffer, flags = 0): Promise<number> {
    return (await this.reply(this.request(NBD_CMD_WRITE, offset, data.length, flags, data))).error;
  }
  async writeZeroes(offset: number, length: number, flags = 0): Promise<number> {
    return (await this.reply(this.request(NBD_CMD_WRITE_ZEROES, offset, length, flags))).error;
  }
  async trim(offset: number, length: number): Promise<number> {
    return (await this.reply(this.request(NBD_CMD_TRIM, offset, length))).error;
  }
  async flush(): Promise<number> { return (await this.reply(this.request(NBD_CMD_FLUSH, 0, 0))).error; }
  async read(offset: number, length: number): Promise<{ error: number; data?: Buffer }> {
    return this.reply(this.request(NBD_CMD_READ, offset, length), length);
  }
  /** NBD_CMD_DISC (no reply), then the client closes its side, as QEMU does. */
  disc(): void { this.request(NBD_CMD_DISC, 0, 0); this.sock.end(); }
  destroy(): void { this.sock.destroy(); }
}
