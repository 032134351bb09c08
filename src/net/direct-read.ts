import { once } from 'node:events';
import { connect, createServer, Socket, type Server } from 'node:net';
import { TLSSocket } from 'node:tls';
import type { Logger } from '../log.js';

/**
 * Socket reads straight into memory the caller chooses (a multifd packet's staging slot in a
 * SharedArrayBuffer), instead of Node's fresh 64 KiB Buffer per read that the parser then
 * copies: the page bytes of a packet never pass through the main thread.
 *
 * Node gives this to sockets it creates with `onread: { buffer, callback }`; a socket that
 * net.Server accepted has no such option, so its handle is adopted into a new Socket made
 * with it. That touches Node internals (`_handle`, `_server`): it is done only after a
 * startup self-test passed on this Node, and every other kind of stream (TLS, in-memory
 * pairs) keeps the ordinary 'data' path. Nothing else in the project knows about it.
 */

/** What a direct-read consumer provides: the next buffer to read into, and what landed there. */
export interface DirectReader {
  /** Where the next bytes go; called after every read (and once at the start). */
  readTarget(): Uint8Array;
  /** `n` bytes landed at the start of the buffer the last readTarget() returned. */
  onDirectRead(n: number): void;
  /**
   * The last target must be filled before the parser can use any of it (a header, a run of
   * page slots): a reader thread then answers once, when it is full (src/net/threaded-read.ts).
   */
  readExact?(): boolean;
}

/** The libuv handle of an accepted socket, as far as adopting it goes (Node internals). */
export interface SocketHandle { useUserBuffer?: unknown; readStop?: () => number; reading?: boolean; fd?: number }
/** The server an accepted socket counts in: adopting the socket moves the count. */
export type CountingServer = Server & { _connections: number; _emitCloseIfDrained?: () => void };
interface Internal { _handle?: SocketHandle | null; _server?: CountingServer | null }

let state: 'untested' | 'testing' | 'ok' | 'off' = 'untested';
let selfTest: Promise<boolean> | null = null;
let reason = '';
let logged = false;

/** Can this socket's handle be adopted (a plain TCP socket with a live libuv handle)? */
function adoptable(sock: unknown): sock is Socket & Internal {
  if (!(sock instanceof Socket) || sock instanceof TLSSocket) return false;
  const h = (sock as Internal)._handle;
  return !!h && typeof h.useUserBuffer === 'function' && typeof h.readStop === 'function';
}

/**
 * Takes an accepted, paused socket's libuv handle away from it, stopped, with the bytes the
 * socket had already buffered (in order, for the new owner to consume first) and the server
 * it counts in. The handle is detached before the buffer is drained: read() on a paused
 * socket below its high-water mark starts its handle reading again, and the old socket would
 * take bytes that belong to the new owner (seen with a reader thread as owner: a corrupted
 * stream in the loopback tests). The socket is left without a handle or listeners.
 */
export function detachPaused(sock: Socket & Internal): { handle: SocketHandle; buffered: Buffer[]; server: CountingServer | null } {
  const handle = sock._handle!;
  sock._handle = null;
  handle.readStop!();
  handle.reading = false;
  const buffered: Buffer[] = [];
  for (let c: Buffer | null; (c = sock.read() as Buffer | null) !== null;) buffered.push(c);
  const server = sock._server ?? null;
  sock._server = null;
  sock.removeAllListeners();
  return { handle, buffered, server };
}

/**
 * A loopback connection accepted by `server` (listening on `port`), paused after the client's
 * `first` bytes arrived, as the listener hands connections over: what both self-tests adopt.
 */
export async function pausedLoopbackPair(server: Server, port: number, first: Buffer): Promise<{ accepted: Socket; client: Socket; got: Buffer }> {
  const accepted = once(server, 'connection') as Promise<[Socket]>;
  const client = connect(port, '127.0.0.1');
  await once(client, 'connect');
  const [s] = await accepted;
  client.write(first);
  const [got] = await once(s, 'data') as [Buffer];
  s.pause();
  return { accepted: s, client, got };
}

/**
 * Moves an accepted, paused socket's handle into a new Socket whose reads land where `r`
 * says. Bytes the old socket had already buffered are returned, in order, for the caller
 * to consume first. The new socket counts as the server's connection in place of the old.
 */
function adopt(sock: Socket & Internal, r: DirectReader): { sock: Socket; buffered: Buffer[] } {
  const { handle, buffered, server } = detachPaused(sock);
  // `handle` is a constructor option @types/node does not list.
  const fresh = new Socket({
    handle,
    readable: true,
    writable: true,
    onread: {
      buffer: () => r.readTarget(),
      callback: (n: number) => { r.onDirectRead(n); return true; },
    },
  } as unknown as ConstructorParameters<typeof Socket>[0]) as Socket & Internal;
  fresh._server = server;
  return { sock: fresh, buffered };
}

/** Runs the self-test once per process; resolves true when direct reads work here. */
export function directReadReady(log?: Logger): Promise<boolean> {
  selfTest ??= (async () => {
    state = 'testing';
    try {
      await runSelfTest();
      state = 'ok';
    } catch (e) {
      state = 'off';
      reason = e instanceof Error ? e.message : String(e);
    }
    if (log && !logged) {
      logged = true;
      if (state === 'ok') log.debug('socket reads straight into shared memory (self-test passed)');
      else log.warn({ reason }, 'socket reads into shared memory unavailable on this Node: multifd uses the \'data\' path');
    }
    return state === 'ok';
  })();
  return selfTest;
}

/**
 * A socket to read with `r`, or null for the 'data' path (not a plain TCP socket, or the
 * self-test did not pass). `COLO_DIRECT_READ=0` turns it off (to compare both paths).
 */
export function adoptForDirectRead(sock: unknown, r: DirectReader): { sock: Socket; buffered: Buffer[] } | null {
  if (state !== 'ok' || process.env.COLO_DIRECT_READ === '0' || !adoptable(sock)) return null;
  return adopt(sock, r);
}

/**
 * Accepts a loopback connection the way the listener does (first bytes by 'data', pause),
 * adopts it, and checks that bytes land in a SharedArrayBuffer view at the offsets asked
 * for, that pause/resume, EOF and the server's connection count behave.
 */
async function runSelfTest(): Promise<void> {
  const sab = new Uint8Array(new SharedArrayBuffer(1 << 16));
  const server = createServer({ noDelay: true });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as { port: number }).port;
  try {
    const { accepted: s, client, got: first } = await pausedLoopbackPair(server, port, Buffer.from([1, 2, 3, 4]));
    if (!adoptable(s)) throw new Error('accepted socket has no adoptable handle');
    let landed = 0, expect = Infinity;
    let gotAll!: () => void;
    const all = new Promise<void>((res) => { gotAll = res; });
    const want = 40_000;
    const { sock, buffered } = adopt(s, {
      readTarget: () => sab.subarray(1024 + landed, 1024 + want),
      onDirectRead: (n) => { landed += n; if (landed >= expect) gotAll(); },
    });
    if (first.length !== 4) throw new Error(`self-test: first read ${first.length} bytes`);
    const payload = Buffer.alloc(want - 4);
    expect = payload.length - buffered.reduce((a, b) => a + b.length, 0);
    for (let i = 0; i < payload.length; i++) payload[i] = (i * 7 + 1) & 0xff;
    sock.resume();
    client.end(payload);
    const timeout = setTimeout(() => gotAll(), 2000);
    await all;
    clearTimeout(timeout);
    const got = Buffer.concat([...buffered, Buffer.from(sab.subarray(1024, 1024 + landed))]);
    if (!got.equals(payload)) throw new Error(`self-test: ${got.length} of ${payload.length} bytes arrived intact`);
    const ended = once(sock, 'end');
    sock.resume();
    await Promise.race([ended, new Promise((_, rej) => setTimeout(() => rej(new Error('self-test: no EOF')), 2000).unref())]);
    sock.destroy();
    await once(sock, 'close');
  } finally {
    const closed = new Promise<void>((res) => server.close(() => res()));
    await Promise.race([closed, new Promise<void>((_, rej) => setTimeout(() => rej(new Error('self-test: server still counts the adopted connection')), 2000).unref())]);
  }
}
