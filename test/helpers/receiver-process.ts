import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

/** `colo-receiver listen` as a child process, the way a user runs it. */
export class ReceiverProcess {
  readonly lines: Record<string, unknown>[] = [];
  stdout = '';
  stderr = '';
  readonly exited: Promise<number>;
  /** The receiver's own pid (the CLI re-executes itself once for huge pages). */
  pid = -1;
  #port: Promise<number>;

  constructor(readonly child: ChildProcess) {
    let resolvePort!: (p: number) => void, rejectPort!: (e: Error) => void;
    this.#port = new Promise((res, rej) => { resolvePort = res; rejectPort = rej; });
    let buf = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr += d;
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        try {
          const j = JSON.parse(line) as Record<string, unknown>;
          this.lines.push(j);
          if (j.msg === 'waiting for an incoming migration') { if (typeof j.pid === 'number') this.pid = j.pid; resolvePort(Number(j.port)); }
        } catch { /* not JSON: a stack trace or a progress line */ }
      }
    });
    child.stdout!.setEncoding('utf8').on('data', (d: string) => { this.stdout += d; });
    this.exited = once(child, 'exit').then(([code]) => Number(code ?? 99));
    void this.exited.then((c) => rejectPort(new Error(`receiver exited (${c}) before listening: ${this.stderr.slice(-2000)}`)));
  }

  static start(args: string[], env: Record<string, string> = {}): ReceiverProcess {
    const child = spawn(process.execPath, [CLI, 'listen', '--port', '0', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LOG_LEVEL: process.env.LOG_LEVEL ?? 'info', ...env },
    });
    return new ReceiverProcess(child);
  }

  port(): Promise<number> { return this.#port; }

  /** Resolves with the exit code, or kills the receiver after `ms`. */
  async wait(ms: number): Promise<number> {
    const t = setTimeout(() => this.child.kill('SIGKILL'), ms);
    try { return await this.exited; } finally { clearTimeout(t); }
  }

  summary(): Record<string, unknown> { return JSON.parse(this.stdout) as Record<string, unknown>; }

  kill(): void {
    if (this.child.exitCode !== null) return;
    if (this.pid > 0 && this.pid !== this.child.pid) { try { process.kill(this.pid, 'SIGKILL'); } catch { /* gone */ } }
    this.child.kill('SIGKILL');
  }
}
