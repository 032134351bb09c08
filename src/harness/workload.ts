// Host-side workload for the test guest: uploads into the guest's port 5000
// (reached through the primary's user-net hostfwd) and a remote shell on 5001.
import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';

/** Wall-clock time in epoch milliseconds with sub-ms resolution (comparable with QEMU trace times). */
export function nowMs(): number {
  return performance.timeOrigin + performance.now();
}

export interface UploadedFile {
  index: number;
  /** Bytes sent for this file. */
  bytes: number;
  /** sha256 (hex) of the bytes sent. */
  sha256: string;
  /** Where the guest stored it (from its "STORED <path> <bytes>" answer). */
  remotePath?: string;
  /** Bytes the guest says it stored (undefined with colo.sink=null). */
  storedBytes?: number;
  startedAt: number;
  /** Last byte written and FIN sent (epoch ms). */
  sentAt?: number;
  /** The guest confirmed the file is stored (epoch ms): the upload's finish time. */
  finishedAt?: number;
  /** checkpointCount() at finishedAt, if a callback was given. */
  checkpointAtFinish?: number;
  /** Upload confirmed with the full size. */
  ok: boolean;
  error?: string;
}

export interface UploadWorkloadOptions {
  port: number;
  host?: string;                       // default 127.0.0.1
  /** Target average rate in MB/s (1e6 bytes); 0 = unlimited. Default 40. */
  rateMBps?: number;
  /** Bytes per file (default 8 MiB). */
  fileBytes?: number;
  /** Stop after this many files (default: unlimited). */
  maxFiles?: number;
  /** Stop starting new files after this long (default: unlimited). */
  durationMs?: number;
  /** Called when a file is confirmed, e.g. () => primary.checkpointCount(). */
  checkpointCount?: () => number;
  /** Files whose confirmation may be outstanding while the next is sent (default 4). */
  maxInFlight?: number;
  /** How long to wait for the guest's confirmation (default 60 s). */
  ackTimeoutMs?: number;
  chunkBytes?: number;                 // default 64 KiB
}

/**
 * Uploads a series of files of random content into the guest's upload sink at
 * a target rate, recording each file's sha256 and the time the guest confirmed
 * it. `start()`, then `stop()` (or await `done` with maxFiles/durationMs).
 */
export class UploadWorkload {
  readonly files: UploadedFile[] = [];
  bytesSent = 0;
  readonly errors: Error[] = [];
  private stopping = false;
  private t0 = 0;
  private running: Promise<void> | undefined;
  private readonly acks = new Set<Promise<void>>();
  private readonly sockets = new Set<net.Socket>();
  private readonly o: Required<Omit<UploadWorkloadOptions, 'maxFiles' | 'durationMs' | 'checkpointCount'>> & UploadWorkloadOptions;

  constructor(opts: UploadWorkloadOptions) {
    this.o = {
      host: '127.0.0.1', rateMBps: 40, fileBytes: 8 << 20, maxInFlight: 4, ackTimeoutMs: 60_000, chunkBytes: 64 << 10,
      ...opts,
    };
    this.o.maxInFlight = Math.max(1, this.o.maxInFlight);
  }

  start(): this {
    if (!this.running) {
      this.t0 = nowMs();
      this.running = this.loop().catch((e: unknown) => { this.errors.push(e instanceof Error ? e : new Error(String(e))); });
    }
    return this;
  }

  /** Resolves when the workload ends by itself (maxFiles / durationMs) or after stop(). */
  get done(): Promise<UploadedFile[]> {
    return (this.running ?? Promise.resolve()).then(async () => {
      await Promise.allSettled([...this.acks]);
      return this.files;
    });
  }

  /** Stops sending; by default waits for outstanding confirmations (aborting the file being sent). */
  async stop(opts: { waitAcks?: boolean } = {}): Promise<UploadedFile[]> {
    this.stopping = true;
    if (opts.waitAcks === false) for (const s of this.sockets) s.destroy();
    return this.done;
  }

  /** Files the guest confirmed in full. */
  completed(): UploadedFile[] {
    return this.files.filter((f) => f.ok);
  }

  /** Average rate so far, MB/s. */
  rateMBps(): number {
    const dt = (nowMs() - this.t0) / 1000;
    return dt > 0 ? this.bytesSent / 1e6 / dt : 0;
  }

  private shouldStop(): boolean {
    if (this.stopping) return true;
    if (this.o.maxFiles !== undefined && this.files.length >= this.o.maxFiles) return true;
    if (this.o.durationMs !== undefined && nowMs() - this.t0 >= this.o.durationMs) return true;
    return false;
  }

  private async loop(): Promise<void> {
    while (!this.shouldStop()) {
      while (this.acks.size >= this.o.maxInFlight && !this.stopping) await Promise.race(this.acks);
      if (this.shouldStop()) break;
      let sock: net.Socket;
      try {
        sock = await connect(this.o.host, this.o.port, 10_000);
      } catch (e) {
        this.errors.push(e as Error);
        await sleep(100);
        continue;
      }
      await this.sendFile(sock);
    }
  }

  private async sendFile(sock: net.Socket): Promise<void> {
    const f: UploadedFile = { index: this.files.length, bytes: 0, sha256: '', startedAt: nowMs(), ok: false };
    this.files.push(f);
    this.sockets.add(sock);
    const hash = createHash('sha256');
    let answer = '';
    let closed = false;
    let sockErr: Error | undefined;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => { answer += d; });
    sock.on('error', (e) => { sockErr = e; });
    const ended = new Promise<void>((resolve) => sock.once('close', () => { closed = true; resolve(); }));
    const rate = this.o.rateMBps * 1e6;
    try {
      let left = this.o.fileBytes;
      while (left > 0) {
        if (this.stopping || closed || sockErr) throw sockErr ?? new Error('upload aborted');
        const chunk = randomBytes(Math.min(this.o.chunkBytes, left));
        hash.update(chunk);
        left -= chunk.length;
        f.bytes += chunk.length;
        this.bytesSent += chunk.length;
        if (!sock.write(chunk)) {
          await new Promise<void>((resolve) => {
            const done = () => { sock.off('drain', done); sock.off('close', done); resolve(); };
            sock.on('drain', done);
            sock.on('close', done);
          });
        }
        if (rate > 0) {
          const ahead = this.bytesSent / rate * 1000 - (nowMs() - this.t0);
          if (ahead > 1) await sleep(ahead);
        }
      }
      f.sha256 = hash.digest('hex');
      // end()'s callback waits for 'finish', which a socket destroyed by stop() may never
      // emit: its close ends the wait too. (A bench:colo cell once never returned from
      // stop(), the primary still checkpointing; this wait is the one without a way out.)
      await Promise.race([new Promise<void>((resolve) => sock.end(resolve)), ended]);
      if (this.stopping && closed) throw new Error('upload aborted');
      f.sentAt = nowMs();
    } catch (e) {
      f.error = (e as Error).message;
      sock.destroy();
      this.sockets.delete(sock);
      return;
    }
    // wait for "STORED <path> <bytes>" and the close, without blocking the next file
    const ack = (async () => {
      const ac = new AbortController();
      const timer = sleep(this.o.ackTimeoutMs, 'timeout' as const, { signal: ac.signal }).catch(() => 'closed' as const);
      const r = await Promise.race([ended.then(() => 'closed' as const), timer]);
      ac.abort();
      const m = /STORED (\S+) (\d+|-)/.exec(answer);
      if (m) {
        f.finishedAt = nowMs();
        f.remotePath = m[1]!;
        if (m[2] === '-') {
          f.ok = true;                    // colo.sink=null: dropped, size not counted
        } else {
          f.storedBytes = Number(m[2]);
          f.ok = f.storedBytes === f.bytes;
          if (!f.ok) f.error = `guest stored ${f.storedBytes} of ${f.bytes} bytes`;
        }
        if (this.o.checkpointCount) f.checkpointAtFinish = this.o.checkpointCount();
      } else {
        f.error = r === 'timeout' ? 'no confirmation from the guest' : `connection closed without confirmation${sockErr ? ': ' + sockErr.message : ''}`;
      }
      sock.destroy();
      this.sockets.delete(sock);
    })();
    this.acks.add(ack);
    void ack.finally(() => this.acks.delete(ack));
  }
}

function connect(host: string, port: number, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection({ host, port, noDelay: true });
    const t = setTimeout(() => { s.destroy(); reject(new Error(`connect ${host}:${port} timed out`)); }, timeoutMs);
    s.once('connect', () => { clearTimeout(t); s.removeAllListeners('error'); resolve(s); });
    s.once('error', (e) => { clearTimeout(t); reject(e); });
  });
}

/**
 * Runs a command line in the guest's remote shell (port 5001 via hostfwd) and
 * returns its stdout.
 */
export async function guestShell(shellPort: number, command: string, opts: { host?: string; timeoutMs?: number } = {}): Promise<string> {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  const sock = await connect(opts.host ?? '127.0.0.1', shellPort, timeoutMs);
  return new Promise((resolve, reject) => {
    let out = '';
    const t = setTimeout(() => { sock.destroy(); reject(new Error(`guest shell: no end of output within ${timeoutMs} ms`)); }, timeoutMs);
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => { out += d; });
    sock.on('error', (e) => { clearTimeout(t); reject(e); });
    sock.on('close', () => { clearTimeout(t); resolve(out); });
    sock.end(`${command}\nexit\n`);
  });
}

/** sha256 (hex) of a file in the guest, computed by the guest's busybox sha256sum. */
export async function readBackSha256(shellPort: number, remotePath: string, opts: { host?: string; timeoutMs?: number } = {}): Promise<string> {
  if (!/^[A-Za-z0-9_./-]+$/.test(remotePath)) throw new Error(`unsafe guest path ${remotePath}`);
  const out = await guestShell(shellPort, `sha256sum ${remotePath} 2>&1`, opts);
  const m = /^([0-9a-f]{64})\s/m.exec(out);
  if (!m) throw new Error(`sha256sum ${remotePath} in the guest failed: ${out.trim()}`);
  return m[1]!;
}
