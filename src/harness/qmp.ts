// A small QMP (QEMU Machine Protocol) client over a unix socket, for the test
// and benchmark harness. Not used by the receiver itself.
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class QmpError extends Error {
  override name = 'QmpError';
  constructor(
    readonly command: string,
    message: string,
    /** QMP error class, e.g. 'GenericError'; 'Timeout' / 'Closed' for client-side failures. */
    readonly errorClass: string,
  ) {
    super(`${command}: ${message}`);
  }
}

export interface QmpConnectOptions {
  /** How long to keep retrying connect() while QEMU creates the socket (default 20 s). */
  connectTimeoutMs?: number;
  /** Default per-command timeout (default 30 s). */
  commandTimeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * QMP client. `QmpClient.connect(path)` waits for the socket, reads the greeting
 * and negotiates capabilities. Events are kept in `events` and emitted as
 * 'event' (all) and `event:<NAME>`.
 */
export class QmpClient extends EventEmitter {
  readonly events: QmpEvent[] = [];
  greeting: Record<string, unknown> | undefined;
  private buf = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private isClosed = false;
  /** Resolves when the connection is closed (by either side). */
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;
  private greetingWaiter: ((g: Record<string, unknown>) => void) | undefined;

  private constructor(private readonly sock: net.Socket, readonly commandTimeoutMs: number) {
    super();
    this.closed = new Promise((r) => (this.resolveClosed = r));
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => this.onData(d));
    sock.on('error', () => { /* reported through close */ });
    sock.on('close', () => this.onClose());
  }

  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const deadline = Date.now() + (opts.connectTimeoutMs ?? 20_000);
    let lastErr: unknown;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(path);
          s.once('connect', () => { s.removeListener('error', reject); resolve(s); });
          s.once('error', reject);
        });
        const c = new QmpClient(sock, opts.commandTimeoutMs ?? 30_000);
        try {
          await c.handshake(Math.max(1000, deadline - Date.now()));
        } catch (e) {
          c.close();
          throw e;
        }
        return c;
      } catch (e) {
        lastErr = e;
        if (e instanceof QmpError) throw e;
      }
      if (Date.now() > deadline) {
        throw new QmpError('connect', `cannot connect to QMP socket ${path}: ${String(lastErr)}`, 'Timeout');
      }
      await sleep(50);
    }
  }

  private async handshake(timeoutMs: number): Promise<void> {
    const g = await new Promise<Record<string, unknown>>((resolve, reject) => {
      const t = setTimeout(() => reject(new QmpError('greeting', 'no QMP greeting', 'Timeout')), timeoutMs);
      if (this.greeting) { clearTimeout(t); resolve(this.greeting); return; }
      this.greetingWaiter = (x) => { clearTimeout(t); resolve(x); };
      this.closed.then(() => { clearTimeout(t); reject(new QmpError('greeting', 'connection closed', 'Closed')); });
    });
    if (!('QMP' in g)) throw new QmpError('greeting', `unexpected greeting ${JSON.stringify(g)}`, 'Protocol');
    await this.execute('qmp_capabilities');
  }

  get isOpen(): boolean {
    return !this.isClosed;
  }

  /** Executes a QMP command and resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.isClosed) return Promise.reject(new QmpError(command, 'QMP connection is closed', 'Closed'));
    const id = `h${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args && Object.keys(args).length > 0) msg['arguments'] = args;
    return new Promise<T>((resolve, reject) => {
      const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new QmpError(command, `no answer within ${timeoutMs} ms`, 'Timeout'));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /** Runs an HMP command line through QMP and returns its text output. */
  hmp(commandLine: string, opts: { timeoutMs?: number } = {}): Promise<string> {
    return this.execute<string>('human-monitor-command', { 'command-line': commandLine }, opts);
  }

  /** Waits for an event (already received ones after `since` count, default: only new ones). */
  waitEvent(name: string, timeoutMs: number, pred?: (e: QmpEvent) => boolean, since?: number): Promise<QmpEvent> {
    if (since !== undefined) {
      const hit = this.events.slice(since).find((e) => e.event === name && (!pred || pred(e)));
      if (hit) return Promise.resolve(hit);
    }
    return new Promise((resolve, reject) => {
      const onEv = (e: QmpEvent) => {
        if (!pred || pred(e)) { cleanup(); resolve(e); }
      };
      const t = setTimeout(() => { cleanup(); reject(new QmpError(name, `event not seen within ${timeoutMs} ms`, 'Timeout')); }, timeoutMs);
      const onClose = () => { cleanup(); reject(new QmpError(name, 'connection closed while waiting for event', 'Closed')); };
      const cleanup = () => {
        clearTimeout(t);
        this.removeListener(`event:${name}`, onEv);
        this.removeListener('close', onClose);
      };
      this.on(`event:${name}`, onEv);
      this.once('close', onClose);
    });
  }

  close(): void {
    if (!this.isClosed) this.sock.destroy();
  }

  private onData(d: string): void {
    this.buf += d;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (!line) continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: Record<string, unknown>): void {
    if ('QMP' in msg) {
      this.greeting = msg;
      this.greetingWaiter?.(msg);
      this.greetingWaiter = undefined;
      return;
    }
    if (typeof msg['event'] === 'string') {
      const ev = msg as unknown as QmpEvent;
      this.events.push(ev);
      this.emit('event', ev);
      this.emit(`event:${ev.event}`, ev);
      return;
    }
    const id = typeof msg['id'] === 'string' ? msg['id'] : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) return;
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const err = msg['error'] as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, err.desc ?? 'error', err.class ?? 'GenericError'));
    } else {
      p.resolve(msg['return']);
    }
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QmpError(p.command, 'QMP connection closed', 'Closed'));
    }
    this.pending.clear();
    this.emit('close');
    this.resolveClosed();
  }
}
