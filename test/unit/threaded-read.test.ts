// Reader threads (src/net/threaded-read.ts, src/net/socket-reader.ts) over real loopback
// sockets, with a parser stand-in: command mode (exact and partial targets, pause, EOF,
// destroy) and packet mode (whole packets into reserved parts, SYNC parking, EOF inside a
// packet, a header that cannot be sized). The migration-level paths run in
// test/integration (loopback, COLO) and test/property (kill anywhere).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { createServer, type Server, type Socket } from 'node:net';
import { after, before, describe, test } from 'node:test';
import { pausedLoopbackPair, type DirectReader } from '../../src/net/direct-read.js';
import { adoptForThreadedRead, readerThreadsSelfTest, type PacketReader, type Reservation, type ThreadedSocket } from '../../src/net/threaded-read.js';
import { encodeMultiFDPacketHeader } from '../../src/sender/multifd-builder.js';
import { MULTIFD_FLAG_SYNC, MULTIFD_PACKET_HEADER_LEN, TARGET_PAGE_SIZE } from '../../src/wire/constants.js';

const within = <T>(p: Promise<T>, ms: number, what: string) =>
  Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`timed out: ${what}`)), ms).unref())]);

/** An accepted socket, paused after its first bytes (as the listener hands it over), and its client. */
async function pair(server: Server, port: number): Promise<{ accepted: Socket; client: Socket }> {
  const { accepted, client } = await pausedLoopbackPair(server, port, Buffer.from([0xaa]));
  // A reader destroyed with bytes unread resets the connection: the client's side of it.
  client.on('error', () => undefined);
  return { accepted, client };
}

function header(normalPages: number, flags = 0, packetNum = 0): Buffer {
  return encodeMultiFDPacketHeader({ flags, pagesAlloc: 128, normalPages, nextPacketSize: 0, packetNum, ramblock: 'pc.ram', offsets: Array.from({ length: normalPages }, (_, k) => k * TARGET_PAGE_SIZE) });
}

function payload(pages: number, seed: number): Buffer {
  const b = Buffer.alloc(pages * TARGET_PAGE_SIZE);
  for (let i = 0; i < b.length; i += 64) b.writeUInt32LE((seed * 2654435761 + i) >>> 0, i);
  return b;
}

/** Records what a reader thread delivers in packet mode; reservations are 4 parts of 32 pages. */
class FakePackets implements PacketReader {
  readonly mem = new Uint8Array(new SharedArrayBuffer(64 * 128 * TARGET_PAGE_SIZE));
  readonly packets: { header: Buffer; payload: Buffer }[] = [];
  readonly bad: Buffer[] = [];
  endedInto: number | null = null;
  #next = 0;
  #ready = true;
  midPacket?: () => boolean;
  onReservable?: () => void;
  onPacketHook?: (h: Buffer) => void;
  // command mode: only until the first readTarget, the handshake is not sent here
  readTarget(): Uint8Array { return Buffer.alloc(16); }
  onDirectRead(): void { throw new Error('packet mode expected'); }
  packetsReady(): boolean { return this.#ready; }
  reserve(): Reservation | null {
    const base = (this.#next++ % 64) * 128 * TARGET_PAGE_SIZE;
    // Parts out of order in memory: the payload must follow the parts' order, not addresses.
    const part = (k: number) => ({ sab: this.mem.buffer as SharedArrayBuffer, offset: base + k * 32 * TARGET_PAGE_SIZE, bytes: 32 * TARGET_PAGE_SIZE });
    return { parts: [part(2), part(0), part(3), part(1)] };
  }
  unreserve(): void {}
  onReaderPacket(h: Buffer, bytes: number, res: Reservation | null): void {
    const out = Buffer.alloc(bytes);
    let at = 0;
    for (const p of res?.parts ?? []) {
      const k = Math.min(p.bytes, bytes - at);
      out.set(new Uint8Array(p.sab, p.offset, k), at);
      at += k;
      if (at === bytes) break;
    }
    this.packets.push({ header: h, payload: out });
    this.onPacketHook?.(h);
  }
  onReaderBadHeader(h: Buffer): void { this.bad.push(h); }
  onReaderEnd(into: number): void { this.endedInto = into; }
}

describe('multifd reader threads', () => {
  let server: Server, port: number;
  const wasForced = process.env.COLO_READER_THREADS;
  before(async () => {
    // On by default from 4 cores only; forced here so that the tests run on any machine.
    process.env.COLO_READER_THREADS = '1';
    assert.equal(await readerThreadsSelfTest(), true, 'reader threads self-test');
    server = createServer({ noDelay: true });
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    port = (server.address() as { port: number }).port;
  });
  after(() => {
    server.close();
    if (wasForced === undefined) delete process.env.COLO_READER_THREADS; else process.env.COLO_READER_THREADS = wasForced;
  });

  test('command mode: exact targets in shared memory and partial ones in plain buffers arrive in order; EOF after the last byte', async () => {
    const { accepted, client } = await pair(server, port);
    const mem = new Uint8Array(new SharedArrayBuffer(1 << 20));
    const data = payload(64, 3);
    const got: Buffer[] = [];
    let total = 0, k = 0, last: Uint8Array = Buffer.alloc(0), lastExact = false;
    const wrapped: DirectReader = {
      // alternately a 1000-byte plain buffer (partial reads allowed) and an exact 37 KiB run
      readTarget: () => {
        lastExact = k % 2 === 1 && total < data.length;
        last = lastExact ? mem.subarray(4096, 4096 + Math.min(37 * 1024, data.length - total)) : Buffer.alloc(1000);
        return last;
      },
      readExact: () => lastExact,
      onDirectRead: (n) => {
        if (lastExact) assert.equal(n, last.length, 'an exact target is answered full');
        got.push(Buffer.from(last.subarray(0, n)));
        total += n;
        k++;
      },
    };
    const a = adoptForThreadedRead(accepted, wrapped);
    assert.ok(a, 'adopted');
    const ended = once(a.sock, 'end');
    a.sock.resume();
    for (let at = 0; at < data.length; at += 7777) client.write(data.subarray(at, Math.min(data.length, at + 7777)));
    client.end();
    await within(ended, 5000, 'EOF');
    assert.ok(Buffer.concat(got).equals(data), 'every byte, in order');
    a.sock.destroy();
    await within(once(a.sock, 'close'), 5000, 'close');
  });

  test('command mode: pause withholds reads; destroy of a reader waiting for bytes closes it', async () => {
    const { accepted, client } = await pair(server, port);
    let n = 0;
    const a = adoptForThreadedRead(accepted, { readTarget: () => Buffer.alloc(100), onDirectRead: (k) => { n += k; } })!;
    a.sock.resume();
    client.write(Buffer.alloc(50));
    await within(new Promise<void>((res) => { const t = setInterval(() => { if (n === 50) { clearInterval(t); res(); } }, 5); }), 5000, 'first bytes');
    // The read already asked for may still complete (as one in flight on a socket would);
    // after it nothing is read until resume().
    a.sock.pause();
    client.write(Buffer.alloc(50));
    await new Promise((res) => setTimeout(res, 100));
    client.write(Buffer.alloc(50));
    await new Promise((res) => setTimeout(res, 100));
    assert.equal(n, 100, 'only the read in flight when paused');
    a.sock.resume();
    await within(new Promise<void>((res) => { const t = setInterval(() => { if (n === 150) { clearInterval(t); res(); } }, 5); }), 5000, 'bytes after resume');
    const closed = once(a.sock, 'close');
    a.sock.destroy();
    await within(closed, 5000, 'close after destroy');
    client.destroy();
  });

  test('packet mode: whole packets land in their reservation parts in order; the reader parks after a SYNC until resumed', async () => {
    const { accepted, client } = await pair(server, port);
    const fake = new FakePackets();
    let sock!: ThreadedSocket;
    // After a SYNC packet the channel parks (pause); it is released from outside (resume).
    fake.onPacketHook = (h) => { if (h.readUInt32BE(8) & MULTIFD_FLAG_SYNC) sock.pause(); };
    const a = adoptForThreadedRead(accepted, fake)!;
    sock = a.sock;
    sock.resume();
    const sent: Buffer[] = [];
    const plan = [128, 7, 0, 128, 64];
    for (const [i, pages] of plan.entries()) {
      const body = payload(pages, i);
      sent.push(body);
      client.write(Buffer.concat([header(pages, i === 2 ? MULTIFD_FLAG_SYNC : 0, i), body]));
    }
    await within(new Promise<void>((res) => { const t = setInterval(() => { if (fake.packets.length >= 3) { clearInterval(t); res(); } }, 5); }), 5000, 'packets up to the SYNC');
    await new Promise((res) => setTimeout(res, 150));
    assert.equal(fake.packets.length, 3, 'nothing past the SYNC before the release');
    sock.resume();
    await within(new Promise<void>((res) => { const t = setInterval(() => { if (fake.packets.length === plan.length) { clearInterval(t); res(); } }, 5); }), 5000, 'packets after the release');
    for (const [i, p] of fake.packets.entries()) {
      assert.equal(p.header.readUInt32BE(16), plan[i], `packet ${i}: header`);
      assert.ok(p.payload.equals(sent[i]!), `packet ${i}: payload bytes`);
    }
    const ended = once(sock, 'end');
    client.end();
    await within(ended, 5000, 'EOF');
    assert.equal(fake.endedInto, 0, 'EOF at a packet boundary');
    sock.destroy();
  });

  test('packet mode: EOF inside a payload is reported with how far it came; a header it cannot size is handed back undecoded', async () => {
    {
      const { accepted, client } = await pair(server, port);
      const fake = new FakePackets();
      const a = adoptForThreadedRead(accepted, fake)!;
      a.sock.resume();
      const ended = once(a.sock, 'end');
      client.end(Buffer.concat([header(128), payload(3, 1)]));
      await within(ended, 5000, 'EOF');
      assert.equal(fake.endedInto, MULTIFD_PACKET_HEADER_LEN + 3 * TARGET_PAGE_SIZE);
      assert.equal(fake.packets.length, 0);
      a.sock.destroy();
    }
    {
      const { accepted, client } = await pair(server, port);
      const fake = new FakePackets();
      const a = adoptForThreadedRead(accepted, fake)!;
      a.sock.resume();
      const bad = header(128);
      bad.writeUInt32BE(0xdeadbeef, 0);
      client.write(Buffer.concat([header(1), payload(1, 9), bad, payload(128, 2)]));
      await within(new Promise<void>((res) => { const t = setInterval(() => { if (fake.bad.length === 1) { clearInterval(t); res(); } }, 5); }), 5000, 'bad header');
      assert.equal(fake.packets.length, 1, 'the good packet before it');
      assert.ok(fake.bad[0]!.equals(bad), 'the header as sent');
      const closed = once(a.sock, 'close');
      a.sock.destroy();
      await within(closed, 5000, 'a halted reader closes on destroy');
      client.destroy();
    }
  });
});
