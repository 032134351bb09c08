import { Socket } from 'node:net';
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';

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
/**
 * After an exact target is full, read up to this many bytes into the scratch buffer and answer
 * for both at once (0: answer at once). The main thread asks for it when the target ends a
 * packet's payload, so the next packet's header comes with it: one wake-up per packet, not two.
 */
export const CMD_THEN = 6;
export const EVT_SEQ = 8;
export const EVT_KIND = 9;
/** Bytes that landed in the command's target. */
export const EVT_N = 10;
/** errno (negative libuv code) of an EVT_ERROR. */
export const EVT_ERRNO = 11;
/** Bytes of the follow-up read (CMD_THEN), at the start of the scratch buffer. */
export const EVT_N2 = 12;
export const CTL_WORDS = 16;

export const CMD_READ = 1;
export const CMD_STOP = 2;

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

export interface SocketReadSummary { bytes: number; reads: number; wakes: number }

interface PortMessage { uid?: number; sab?: SharedArrayBuffer; evict?: boolean; stop?: boolean }

export function serveSocket(t: SocketReadTask): Promise<SocketReadSummary> {
  const ctl = new Int32Array(t.ctl);
  const regions = new Map<number, Uint8Array>([[SCRATCH_REGION, new Uint8Array(t.scratch)]]);
  // Commands count from 0: the first may be written before this thread starts.
  let seen = 0;
  let target: Uint8Array | null = null;
  let exact = false;
  let got = 0;
  /** Follow-up read asked for, and what the command's own target took once it was full. */
  let then = 0;
  let first = 0;
  let inThen = false;
  let stopping = false;
  const sum: SocketReadSummary = { bytes: 0, reads: 0, wakes: 0 };
  // Bytes read after a stop are dropped: the main thread has let the connection go.
  const discard = new Uint8Array(64 * 1024);

  const onMessage = (m: PortMessage) => {
    if (m.stop) stopping = true;
    else if (m.evict) regions.delete(m.uid!);
    else if (m.sab) regions.set(m.uid!, new Uint8Array(m.sab));
  };
  const drainPort = () => {
    for (let m = receiveMessageOnPort(t.port); m !== undefined; m = receiveMessageOnPort(t.port)) onMessage(m.message as PortMessage);
  };
  const report = (kind: number, errno = 0) => {
    ctl[EVT_KIND] = kind;
    ctl[EVT_N] = inThen ? first : got;
    ctl[EVT_N2] = inThen ? got : 0;
    ctl[EVT_ERRNO] = errno;
    target = null;
    inThen = false;
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
    if (ctl[CMD] !== CMD_READ) { stopping = true; return; }
    const r = regions.get(ctl[CMD_REGION]!);
    if (!r) throw new Error(`socket reader: region ${ctl[CMD_REGION]} was never sent`);
    target = r.subarray(ctl[CMD_OFFSET]!, ctl[CMD_OFFSET]! + ctl[CMD_LENGTH]!);
    exact = ctl[CMD_EXACT] === 1;
    then = exact && ctl[CMD_REGION] !== SCRATCH_REGION ? ctl[CMD_THEN]! : 0;
    got = 0;
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
          if (target === null && !stopping) take();
          if (stopping || target === null) { queueMicrotask(stop); return discard; }
          return target.subarray(got);
        },
        callback: (n: number) => {
          if (stopping || target === null) return false;
          got += n;
          sum.bytes += n;
          sum.reads++;
          if (got === target.length && then > 0 && !inThen) {
            // The payload is in; the next header goes to the scratch buffer before answering.
            inThen = true;
            first = got;
            got = 0;
            target = regions.get(SCRATCH_REGION)!.subarray(0, then);
            exact = false;
          } else if (got === target.length || !exact) {
            report(EVT_DATA);
          }
          // A stop the main thread wrote while this target was being filled.
          if (Atomics.load(ctl, CMD_SEQ) !== seen) { drainPort(); if (ctl[CMD] === CMD_STOP || stopping) { stopping = true; queueMicrotask(stop); return false; } }
          return true;
        },
      },
    } as unknown as ConstructorParameters<typeof Socket>[0]);
    t.port.on('message', (m: PortMessage) => { onMessage(m); if (stopping) stop(); });
    sock.on('end', () => { if (!stopping) report(EVT_END); stop(); });
    sock.on('error', (e: NodeJS.ErrnoException) => { if (!stopping) report(EVT_ERROR, typeof e.errno === 'number' ? e.errno : -5); });
    sock.on('close', () => { t.port.close(); resolve(sum); });
  });
}
