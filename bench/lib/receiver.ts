// `colo-receiver listen` as a child process, the way a user runs it (the benchmark measures the
// CLI, not an in-process receiver that would share its event loop with the harness).
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { copyFileSync, cpSync, createWriteStream, existsSync, symlinkSync, type WriteStream } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const CLI = fileURLToPath(new URL('../../src/cli/main.js', import.meta.url));

export class ReceiverChild {
  readonly exited: Promise<number>;
  /**
   * The receiver's own pid: the CLI re-executes itself once for huge pages, and the process
   * that holds the guest (what schedstat and VmHWM must read) names itself when listening.
   */
  pid: number;
  stderrTail = '';
  #port: Promise<number>;
  #nbdPort: Promise<number>;
  #log: WriteStream;

  private constructor(readonly child: ChildProcess, logFile: string) {
    this.pid = child.pid ?? -1;
    this.#log = createWriteStream(logFile);
    let resolvePort!: (p: number) => void, rejectPort!: (e: Error) => void;
    this.#port = new Promise((res, rej) => { resolvePort = res; rejectPort = rej; });
    this.#port.catch(() => undefined);
    let resolveNbd!: (p: number) => void, rejectNbd!: (e: Error) => void;
    this.#nbdPort = new Promise((res, rej) => { resolveNbd = res; rejectNbd = rej; });
    this.#nbdPort.catch(() => undefined);
    let buf = '';
    child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.#log.write(d);
      this.stderrTail = (this.stderrTail + d).slice(-4000);
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.includes('NBD server listening')) {
          try { resolveNbd(Number((JSON.parse(line) as { port: number }).port)); } catch { /* not JSON */ }
          continue;
        }
        if (!line.includes('waiting for an incoming migration')) continue;
        try {
          const m = JSON.parse(line) as { port: number; pid?: number };
          if (typeof m.pid === 'number') this.pid = m.pid;
          resolvePort(Number(m.port));
        } catch { /* not JSON */ }
      }
    });
    child.stdout!.setEncoding('utf8').on('data', (d: string) => { this.#log.write(d); });
    this.exited = once(child, 'exit').then(([code]) => { this.#log.end(); return code === null ? 99 : Number(code); });
    void this.exited.then((c) => {
      rejectPort(new Error(`receiver exited (${c}) before listening: ${this.stderrTail}`));
      rejectNbd(new Error(`receiver exited (${c}) without an NBD server: ${this.stderrTail}`));
    });
  }

  /**
   * Starts `node <cli> listen --port 0 ...args` (default dist/src/cli/main.js); its stdout and
   * stderr go to `logFile`.
   */
  static start(args: string[], logFile: string, cli = CLI, env: Record<string, string> = {}): ReceiverChild {
    const child = spawn(process.execPath, [cli, 'listen', '--port', '0', '--no-progress', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, LOG_LEVEL: 'info', ...env },
    });
    return new ReceiverChild(child, logFile);
  }

  port(): Promise<number> { return this.#port; }
  /** The NBD port (listen --nbd HOST:0). */
  nbdPort(): Promise<number> { return this.#nbdPort; }

  get alive(): boolean { return this.child.exitCode === null && this.child.signalCode === null; }

  /** The exit code, or SIGKILL (by pid) after `ms`. */
  async wait(ms: number): Promise<number> {
    const t = setTimeout(() => this.kill(), ms);
    try { return await this.exited; } finally { clearTimeout(t); }
  }

  kill(): void {
    if (!this.alive) return;
    // The re-executed receiver follows its parent out, but not before it noticed: kill both.
    if (this.pid !== this.child.pid) { try { process.kill(this.pid, 'SIGKILL'); } catch { /* gone */ } }
    this.child.kill('SIGKILL');
  }
}

/**
 * Copies the compiled receiver (dist/src, dist/workers) into `dir` and returns its CLI path, so
 * that every cell of a run uses the same build even if the tree is rebuilt meanwhile.
 */
export function snapshotReceiver(dir: string): string {
  const dist = fileURLToPath(new URL('../../', import.meta.url));
  for (const sub of ['src', 'workers']) cpSync(join(dist, sub), join(dir, 'dist', sub), { recursive: true });
  // The copy resolves its packages (pino, piscina, zstd-napi) from the project's node_modules
  // and "type": "module" from a package.json, even when --out points outside the project.
  const root = join(dist, '..');
  if (!existsSync(join(dir, 'node_modules'))) symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'), 'dir');
  if (!existsSync(join(dir, 'package.json'))) copyFileSync(join(root, 'package.json'), join(dir, 'package.json'));
  return join(dir, 'dist', 'src', 'cli', 'main.js');
}
