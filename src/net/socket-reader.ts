import { Socket } from 'node:net';
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { MULTIFD_FLAG_SYNC, MULTIFD_MAGIC, MULTIFD_PACKET_HEADER_LEN, MULTIFD_PAGES_PER_PACKET, MULTIFD_VERSION, TARGET_PAGE_SIZE } from '../wire/constants.js';

/**
 * The reader thread of one multifd connection (what QEMU's multifd_recv_thread does with its
 * socket): the kernel's copy of every byte from the socket into memory, off the main thread.
 * The main thread keeps the parser and the page table; it says where the next bytes go, this
 * thread puts them there and says how many landed. Runs in a piscina worker
 * (workers/socket-reader.ts); src/net/threaded-read.ts is the main thread's side.
 *
 * One command and one answer at a time, in a few Int32 words of a SharedArrayBuffer: the
 * main thread writes a target (a SharedArrayBuffer it sent over the port, an offset, a
 * length, and whether it must be filled: a packet header or a run of page slots) and bumps
 * CMD_SEQ; this thread reads into it, bumps EVT_SEQ with what happened and posts a word on
 * the port to wake the main thread. A target that
 * must be filled is answered once it is full, so a 512 KiB packet payload costs the main
 * thread one wake-up however many reads the kernel needed.
 */
export const CMD_SEQ = 0;
export const CMD = 1;
export const CMD_REGION = 2;
export const CMD_OFFSET = 3;
export const CMD_LENGTH = 4;
export const CMD_EXACT = 5;
export const EVT_SEQ = 8;
export const EVT_KIND = 9;
/** Bytes that landed in the command's target. */
export const EVT_N = 10;
/** errno (negative libuv code) of an EVT_ERROR. */
export const EVT_ERRNO = 11;

/**
 * Packet mode (CMD_PACKETS, once the parser stands between two multifd packets): from then on
 * this thread reads whole packets by itself, as multifd_recv_thread does, and the main thread
 * only hears of each one after it is in. Headers go to HDR_SLOTS slots of the scratch buffer;
 * payloads to runs of page slots the main thread reserved ahead (the RES ring), so no read
 * waits for the main thread unless it fell HDR_SLOTS packets or every reservation behind.
 * After a SYNC packet the thread waits for the barrier's release (P_RELEASE), as the channel
 * parks. Each packet is posted on the port as [PKT_DONE_MSG, header slot, reservation, payload bytes].
 */
export const P_WAKE = 16;
/** Reservations published (main thread). */
export const P_RES_HEAD = 17;
/** Packets the main thread has taken (their header slots are free again). */
export const P_DONE = 18;
/** SYNC packets the main thread has released. */
export const P_RELEASE = 19;
/** 1 from a packet's first header byte until its payload is in (the peer owes us bytes). */
export const P_IN_PACKET = 20;
export const RES_BASE = 24;
/**
 * A reservation: its part count, then per part (region, offset, bytes). Parts are runs of
 * page slots as the slab has them free (long runs first, then the holes commits left), so a
 * payload may be read in up to RES_PARTS reads.
 */
export const RES_PARTS = 32;
export const RES_WORDS = 1 + 3 * RES_PARTS;
/**
 * Reservations published ahead, and header slots: most of a loaded checkpoint's packets on one
 * channel (~16 of 512 KiB for 32 MB over 4 channels) are read without waiting for the main
 * thread. With 4 and 8 the readers waited on it whenever it waited for a core: COLO multifd-4
 * under load 1.33x C's transfer, 1.18x with 12 and 32 (bench/README.md, session 6). The cost:
 * up to 12 x 128 free slots held per connection (24 MiB over 4).
 */
export const RES_SLOTS = 12;
export const HDR_SLOTS = 32;
export const CTL_WORDS = RES_BASE + RES_WORDS * RES_SLOTS;

export const CMD_READ = 1;
export const CMD_STOP = 2;
export const CMD_PACKETS = 3;

/** Port messages in packet mode: [kind, ...]. */
export const MSG_PACKET = 1;
/** [MSG_BAD, header slot]: a header the thread cannot size; it reads no further. */
export const MSG_BAD = 2;
/** [MSG_END, header bytes, payload bytes]: EOF, and how far into a packet it came. */
export const MSG_END = 3;
/** [MSG_ERROR, errno, header bytes, payload bytes]. */
export const MSG_ERROR = 4;

export const EVT_DATA = 1;
export const EVT_END = 2;
export const EVT_ERROR = 3;

/** Region 0 is the connection's own scratch buffer (headers, handshake bytes, side reads). */
export const SCRATCH_REGION = 0;

export interface SocketReadTask {
  op: 'read';
  fd: number;
  ctl: SharedArrayBuffer;
  scratch: SharedArrayBuffer;
  /** {uid, sab}: a region the commands name from now on; {evict: uid}; {stop: true}. */
  port: MessagePort;
}

export interface SocketReadSummary { bytes: number; reads: number; wakes: number; packets: number }

interface PortMessage { uid?: number; sab?: SharedArrayBuffer; evict?: boolean; stop?: boolean }

export function serveSocket(t: SocketReadTask): Promise<SocketReadSummary> {
  const ctl = new Int32Array(t.ctl);
  const scratch = new Uint8Array(t.scratch);
  const regions = new Map<number, Uint8Array>([[SCRATCH_REGION, scratch]]);
  // Commands count from 0: the first may be written before this thread starts.
  let seen = 0;
  let target: Uint8Array | null = null;
  let exact = false;
  let got = 0;
  let stopping = false;
  const sum: SocketReadSummary = { bytes: 0, reads: 0, wakes: 0, packets: 0 };
  // Bytes read after a stop are dropped: the main thread has let the connection go.
  const discard = new Uint8Array(64 * 1024);

  // packet mode
  let packets = false;
  let phase: 'header' | 'payload' | 'release' | 'halt' = 'header';
  let pk = 0;
  let resTail = 0;
  let syncs = 0;
  let payLen = 0;
  let hdrGot = 0;
  /** The reservation part the payload is being read into, and bytes of the payload before it. */
  let part = 0;
  let partStart = 0;

  const onMessage = (m: PortMessage) => {
    if (m.stop) stopping = true;
    else if (m.evict) regions.delete(m.uid!);
    else if (m.sab) regions.set(m.uid!, new Uint8Array(m.sab));
  };
  const drainPort = () => {
    for (let m = receiveMessageOnPort(t.port); m !== undefined; m = receiveMessageOnPort(t.port)) onMessage(m.message as PortMessage);
  };
  const region = (uid: number): Uint8Array => {
    let r = regions.get(uid);
    if (r === undefined) { drainPort(); r = regions.get(uid); }
    if (r === undefined) throw new Error(`socket reader: region ${uid} was never sent`);
    return r;
  };
  const report = (kind: number, errno = 0) => {
    ctl[EVT_KIND] = kind;
    ctl[EVT_N] = got;
    ctl[EVT_ERRNO] = errno;
    target = null;
    // The stores above, and the kernel's bytes in the target, happen-before this one.
    Atomics.add(ctl, EVT_SEQ, 1);
    // The main thread is woken by a message: its event loop hears a port at once, where an
    // Atomics.waitAsync settled ~1 ms late (bench:throughput: 0.13 GB/s against 0.66).
    t.port.postMessage(kind);
  };
  /** Takes the next command, waiting for it: the socket has bytes, and nowhere to put them yet. */
  const take = () => {
    while (Atomics.load(ctl, CMD_SEQ) === seen) { sum.wakes++; Atomics.wait(ctl, CMD_SEQ, seen); }
    seen = Atomics.load(ctl, CMD_SEQ);
    // Regions a command names were posted before it.
    drainPort();
    if (ctl[CMD] === CMD_PACKETS) { packets = true; return; }
    if (ctl[CMD] !== CMD_READ) { stopping = true; return; }
    target = region(ctl[CMD_REGION]!).subarray(ctl[CMD_OFFSET]!, ctl[CMD_OFFSET]! + ctl[CMD_LENGTH]!);
    exact = ctl[CMD_EXACT] === 1;
    got = 0;
  };
  /** Whether a stop was written since the command taken (a newer read command is taken later, by take()). */
  const checkStop = () => {
    if (Atomics.load(ctl, CMD_SEQ) !== seen) { drainPort(); if (ctl[CMD] === CMD_STOP) stopping = true; }
    return stopping;
  };
  /** Waits until `ready()` or a stop; the main thread bumps P_WAKE after every change. */
  const waitFor = (ready: () => boolean) => {
    for (;;) {
      const w = Atomics.load(ctl, P_WAKE);
      if (checkStop() || ready()) return;
      sum.wakes++;
      Atomics.wait(ctl, P_WAKE, w);
    }
  };
  /** Packet mode: where the next bytes go (waiting for a header slot, a reservation or a release). */
  const packetTarget = (): Uint8Array | null => {
    if (phase === 'halt') { waitFor(() => false); return null; }
    if (phase === 'release') {
      waitFor(() => Atomics.load(ctl, P_RELEASE) >= syncs);
      if (stopping) return null;
      phase = 'header';
    }
    if (phase === 'header') {
      if (hdrGot === 0) waitFor(() => pk - Atomics.load(ctl, P_DONE) < HDR_SLOTS);
      if (stopping) return null;
      const at = (pk % HDR_SLOTS) * MULTIFD_PACKET_HEADER_LEN;
      return scratch.subarray(at + hdrGot, at + MULTIFD_PACKET_HEADER_LEN);
    }
    // payload
    if (got === 0) { waitFor(() => Atomics.load(ctl, P_RES_HEAD) > resTail); part = 0; partStart = 0; }
    if (stopping) return null;
    const e = RES_BASE + (resTail % RES_SLOTS) * RES_WORDS;
    for (;;) {
      if (part >= ctl[e]!) throw new Error(`socket reader: a payload of ${payLen} bytes is larger than its reservation`);
      const q = e + 1 + 3 * part;
      const bytes = ctl[q + 2]!;
      if (got < partStart + bytes) {
        const at = ctl[q + 1]! + (got - partStart);
        return region(ctl[q]!).subarray(at, at + Math.min(partStart + bytes, payLen) - got);
      }
      partStart += bytes;
      part++;
    }
  };
  const packetDone = () => {
    const flags = (scratch[(pk % HDR_SLOTS) * MULTIFD_PACKET_HEADER_LEN + 11]! | 0);
    t.port.postMessage([MSG_PACKET, pk % HDR_SLOTS, payLen > 0 ? resTail % RES_SLOTS : -1, payLen]);
    if (payLen > 0) resTail++;
    pk++;
    sum.packets++;
    hdrGot = 0;
    got = 0;
    payLen = 0;
    Atomics.store(ctl, P_IN_PACKET, 0);
    if (flags & MULTIFD_FLAG_SYNC) { syncs++; phase = 'release'; } else phase = 'header';
  };
  /** A whole header is in: size its payload, or stop reading when it cannot be sized safely. */
  const headerDone = () => {
    const h = new DataView(scratch.buffer, scratch.byteOffset + (pk % HDR_SLOTS) * MULTIFD_PACKET_HEADER_LEN, MULTIFD_PACKET_HEADER_LEN);
    const pagesAlloc = h.getUint32(12), normal = h.getUint32(16);
    if (h.getUint32(0) !== MULTIFD_MAGIC || h.getUint32(4) !== MULTIFD_VERSION || pagesAlloc > MULTIFD_PAGES_PER_PACKET || normal > pagesAlloc) {
      // The main thread decodes it again and reports the peer's error, typed, as QEMU words it.
      t.port.postMessage([MSG_BAD, pk % HDR_SLOTS]);
      phase = 'halt';
      return;
    }
    payLen = normal * TARGET_PAGE_SIZE;
    got = 0;
    if (payLen === 0) packetDone(); else phase = 'payload';
  };
  const onPacketBytes = (n: number) => {
    if (phase === 'header') {
      if (hdrGot === 0) Atomics.store(ctl, P_IN_PACKET, 1);
      hdrGot += n;
      if (hdrGot === MULTIFD_PACKET_HEADER_LEN) headerDone();
    } else if (phase === 'payload') {
      got += n;
      if (got === payLen) packetDone();
    }
  };

  return new Promise<SocketReadSummary>((resolve) => {
    let sock: Socket;
    const stop = () => { if (!sock.destroyed) sock.destroy(); };
    sock = new Socket({
      fd: t.fd,
      readable: true,
      writable: false,
      onread: {
        buffer: () => {
          if (!packets && target === null && !stopping) take();
          if (packets && !stopping) {
            const b = packetTarget();
            if (b !== null) return b;
          }
          if (stopping || target === null) { queueMicrotask(stop); return discard; }
          return target.subarray(got);
        },
        callback: (n: number) => {
          if (stopping) return false;
          sum.bytes += n;
          sum.reads++;
          if (packets) { onPacketBytes(n); return true; }
          if (target === null) return false;
          got += n;
          if (got === target.length || !exact) report(EVT_DATA);
          // A stop the main thread wrote while this target was being filled.
          if (checkStop()) { queueMicrotask(stop); return false; }
          return true;
        },
      },
    } as unknown as ConstructorParameters<typeof Socket>[0]);
    t.port.on('message', (m: PortMessage) => { onMessage(m); if (stopping) stop(); });
    const inPacket = () => (phase === 'payload' ? [hdrGot, got] : [hdrGot, 0]);
    sock.on('end', () => {
      if (!stopping) { if (packets) t.port.postMessage([MSG_END, ...inPacket()]); else report(EVT_END); }
      stop();
    });
    sock.on('error', (e: NodeJS.ErrnoException) => {
      if (stopping) return;
      const errno = typeof e.errno === 'number' ? e.errno : -5;
      if (packets) t.port.postMessage([MSG_ERROR, errno, ...inPacket()]); else report(EVT_ERROR, errno);
    });
    sock.on('close', () => { t.port.close(); resolve(sum); });
  });
}
