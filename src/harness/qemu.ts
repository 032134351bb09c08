// Spawning and supervising qemu-system-x86_64 for tests and benchmarks.
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { QmpClient } from './qmp.js';

/** The QEMU binary: $QEMU or qemu-system-x86_64 from PATH. */
export function qemuBinary(): string {
  return process.env['QEMU'] || 'qemu-system-x86_64';
}

/**
 * The QEMUs the suites run against:
 * - '7.2': Debian's system QEMU ($QEMU overrides it, as for qemuBinary());
 * - '10.0': stock 10.0.2 from bookworm-backports, unpacked by scripts/install-qemu10.sh
 *   ($QEMU10 overrides; default <project>/.build/qemu-10.0.2/qemu-system-x86_64);
 * - '10.0-colo': 10.0.2 built with native/qemu-10.0.2-colo.patch by
 *   scripts/build-qemu10-colo.sh ($QEMU10_COLO overrides; default
 *   <project>/.build/qemu-10.0.2-colo/qemu-system-x86_64).
 */
export type QemuFlavour = '7.2' | '10.0' | '10.0-colo';
export const QEMU_FLAVOURS: readonly QemuFlavour[] = ['7.2', '10.0', '10.0-colo'];

const FLAVOUR_DEFAULTS: Record<Exclude<QemuFlavour, '7.2'>, { env: string; dir: string; script: string }> = {
  '10.0': { env: 'QEMU10', dir: '.build/qemu-10.0.2', script: 'scripts/install-qemu10.sh' },
  '10.0-colo': { env: 'QEMU10_COLO', dir: '.build/qemu-10.0.2-colo', script: 'scripts/build-qemu10-colo.sh' },
};

/** The binary for a QEMU flavour (see QemuFlavour), or a path given as is. */
export function qemuBinaryFor(flavour: QemuFlavour | string): string {
  if (flavour === '7.2') return qemuBinary();
  const d = FLAVOUR_DEFAULTS[flavour as keyof typeof FLAVOUR_DEFAULTS];
  if (!d) return flavour;
  return process.env[d.env] || path.join(harnessProjectRoot(), d.dir, 'qemu-system-x86_64');
}

/**
 * false when the flavour's binary runs and has the expected version; otherwise a skip reason
 * naming the command that installs it.
 */
export function qemuMissing(flavour: QemuFlavour): string | false {
  const bin = qemuBinaryFor(flavour);
  const nums = qemuVersionNumbers(bin);
  if (flavour === '7.2') {
    return nums ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
  }
  const d = FLAVOUR_DEFAULTS[flavour];
  if (!nums) return `QEMU ${flavour} not found at ${bin} (${d.script} not run)`;
  if (nums[0] !== 10 || nums[1] !== 0) return `${bin} is QEMU ${nums.join('.')}, not 10.0 (${d.script})`;
  return false;
}

/** The project root (directory of colo-receiver's package.json), found upwards from this file. */
function harnessProjectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        if ((JSON.parse(fs.readFileSync(pj, 'utf8')) as { name?: string }).name === 'colo-receiver') return dir;
      } catch { /* keep looking */ }
    }
    const up = path.dirname(dir);
    if (up === dir) return process.cwd();
    dir = up;
  }
}

const versionCache = new Map<string, string | null>();

/** First line of `qemu --version` (e.g. "QEMU emulator version 7.2.22 (...)"), or null if not runnable. */
export function qemuVersion(binary = qemuBinary()): string | null {
  if (!versionCache.has(binary)) {
    let v: string | null = null;
    try {
      v = execFileSync(binary, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 20_000 })
        .split('\n')[0]?.trim() ?? null;
    } catch {
      v = null;
    }
    versionCache.set(binary, v);
  }
  return versionCache.get(binary) ?? null;
}

/** Parsed [major, minor, micro] of the QEMU binary, or null. */
export function qemuVersionNumbers(binary = qemuBinary()): [number, number, number] | null {
  const m = /version (\d+)\.(\d+)\.(\d+)/.exec(qemuVersion(binary) ?? '');
  return m ? [Number(m[1]), Number(m[2]), Number(m[3])] : null;
}

export function haveQemu(binary = qemuBinary()): boolean {
  return qemuVersion(binary) !== null;
}

/** A TCP port on 127.0.0.1 that was free a moment ago. */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      const port = typeof a === 'object' && a ? a.port : 0;
      s.close(() => resolve(port));
    });
  });
}

/** Escapes a value for QEMU's comma-separated option syntax. */
export function qemuOptValue(v: string): string {
  return v.replace(/,/g, ',,');
}

export interface QemuTraceOptions {
  /** Trace event names or patterns (e.g. 'colo_*'). */
  events: string[];
}

export interface QemuArgsOptions {
  accel?: string;                 // default 'tcg'
  machine?: string;               // default 'pc'
  cpu?: string;                   // e.g. 'qemu64'
  memMiB?: number;                // default 256
  smp?: number;                   // default 1
  name?: string;                  // -name NAME,debug-threads=on
  nodefaults?: boolean;           // default true
  paused?: boolean;               // -S
  kernel?: string;
  initrd?: string;
  append?: string;
  netdevs?: string[];             // each a full -netdev value
  devices?: string[];             // each a full -device value
  serialFile?: string;            // -serial file:PATH
  qmpSocket?: string;             // -qmp unix:PATH,server=on,wait=off
  incoming?: string;              // e.g. 'defer'
  traceEventsFile?: string;       // -trace events=FILE
  logFile?: string;               // -D FILE
  msgTimestamp?: boolean;         // -msg timestamp=on
  extra?: string[];
}

/** Builds a qemu-system-x86_64 argument vector (no binary). */
export function buildQemuArgs(o: QemuArgsOptions): string[] {
  const a: string[] = [];
  if (o.name) a.push('-name', `${qemuOptValue(o.name)},debug-threads=on`);
  a.push('-accel', o.accel ?? 'tcg', '-M', o.machine ?? 'pc');
  if (o.cpu) a.push('-cpu', o.cpu);
  a.push('-m', String(o.memMiB ?? 256), '-smp', String(o.smp ?? 1));
  if (o.nodefaults !== false) a.push('-nodefaults');
  a.push('-vga', 'none', '-display', 'none');
  if (o.paused) a.push('-S');
  if (o.kernel) a.push('-kernel', o.kernel);
  if (o.initrd) a.push('-initrd', o.initrd);
  if (o.append !== undefined) a.push('-append', o.append);
  for (const n of o.netdevs ?? []) a.push('-netdev', n);
  for (const d of o.devices ?? []) a.push('-device', d);
  if (o.serialFile) a.push('-serial', `file:${qemuOptValue(o.serialFile)}`);
  if (o.qmpSocket) a.push('-qmp', `unix:${qemuOptValue(o.qmpSocket)},server=on,wait=off`);
  if (o.traceEventsFile) a.push('-trace', `events=${qemuOptValue(o.traceEventsFile)}`);
  if (o.logFile) a.push('-D', o.logFile);
  if (o.msgTimestamp) a.push('-msg', 'timestamp=on');
  if (o.incoming) a.push('-incoming', o.incoming);
  a.push(...(o.extra ?? []));
  return a;
}

export interface QemuStartOptions extends QemuArgsOptions {
  /** Directory for logs, serial output, QMP socket, trace (created). */
  runDir: string;
  /** Role name used for file names (default 'qemu'). */
  role?: string;
  binary?: string;
  /** Extra environment variables (merged over process.env). */
  env?: Record<string, string | undefined>;
  /** Add a serial log file (default true). */
  serial?: boolean;
  /** Add a QMP socket (default true). */
  qmp?: boolean;
  /** Enable the trace backend with these events (log to <role>-trace.log, -msg timestamp=on). */
  trace?: QemuTraceOptions;
}

const live = new Set<QemuProcess>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // Never leave a QEMU behind when the test/benchmark process ends.
  process.on('exit', () => {
    for (const q of live) {
      try { process.kill(q.pid, 'SIGKILL'); } catch { /* gone */ }
    }
  });
}

function shortSocketPath(runDir: string, role: string): string {
  const p = path.join(runDir, `${role}.qmp`);
  if (Buffer.byteLength(p) < 100) return p;
  return path.join(os.tmpdir(), `qmp-${process.pid}-${randomBytes(4).toString('hex')}.sock`);
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * A running QEMU. Output goes to files in `runDir`:
 * `<role>.stdout.log`, `<role>.stderr.log`, `<role>-serial.log`, `<role>-trace.log`,
 * `<role>.cmd.json` (argv and shim environment).
 */
export class QemuProcess {
  readonly pid: number;
  readonly exited: Promise<QemuExit>;
  exitStatus: QemuExit | undefined;
  readonly serialPath: string | undefined;
  readonly qmpPath: string | undefined;
  readonly tracePath: string | undefined;
  readonly stdoutPath: string;
  readonly stderrPath: string;
  readonly startedAt: number;
  private qmpClient: Promise<QmpClient> | undefined;

  private constructor(
    readonly role: string,
    readonly runDir: string,
    readonly argv: string[],
    private readonly child: ChildProcess,
    paths: { serial?: string; qmp?: string; trace?: string; stdout: string; stderr: string },
  ) {
    if (child.pid === undefined) throw new Error(`cannot start ${argv[0]} (not installed?)`);
    this.pid = child.pid;
    this.serialPath = paths.serial;
    this.qmpPath = paths.qmp;
    this.tracePath = paths.trace;
    this.stdoutPath = paths.stdout;
    this.stderrPath = paths.stderr;
    this.startedAt = Date.now();
    this.exited = new Promise((resolve) => {
      child.once('exit', (code, signal) => {
        this.exitStatus = { code, signal };
        live.delete(this);
        resolve(this.exitStatus);
      });
    });
    live.add(this);
    installExitHook();
  }

  static start(o: QemuStartOptions): QemuProcess {
    const role = o.role ?? 'qemu';
    const runDir = path.resolve(o.runDir);
    fs.mkdirSync(runDir, { recursive: true });
    const serial = o.serial !== false ? (o.serialFile ?? path.join(runDir, `${role}-serial.log`)) : undefined;
    const qmp = o.qmp !== false ? (o.qmpSocket ?? shortSocketPath(runDir, role)) : undefined;
    if (qmp) fs.rmSync(qmp, { force: true });
    let traceEventsFile = o.traceEventsFile;
    let logFile = o.logFile;
    let trace: string | undefined = logFile;
    if (o.trace) {
      traceEventsFile = path.join(runDir, `${role}-trace-events.txt`);
      fs.writeFileSync(traceEventsFile, o.trace.events.join('\n') + '\n');
      logFile = logFile ?? path.join(runDir, `${role}-trace.log`);
      trace = logFile;
    }
    if (serial) fs.writeFileSync(serial, '');
    const args = buildQemuArgs({
      ...o,
      name: o.name ?? role,
      serialFile: serial,
      qmpSocket: qmp,
      traceEventsFile,
      logFile,
      msgTimestamp: o.msgTimestamp ?? (o.trace ? true : undefined),
    });
    const binary = o.binary ?? qemuBinary();
    const stdout = path.join(runDir, `${role}.stdout.log`);
    const stderr = path.join(runDir, `${role}.stderr.log`);
    const outFd = fs.openSync(stdout, 'w');
    const errFd = fs.openSync(stderr, 'w');
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const [k, v] of Object.entries(o.env ?? {})) {
      if (v === undefined) delete env[k];
      else env[k] = v;
    }
    fs.writeFileSync(path.join(runDir, `${role}.cmd.json`), JSON.stringify({
      argv: [binary, ...args],
      env: Object.fromEntries(Object.entries(o.env ?? {}).filter(([, v]) => v !== undefined)),
      cwd: runDir,
      version: qemuVersion(binary),
    }, null, 1));
    let child: ChildProcess;
    try {
      child = spawn(binary, args, { cwd: runDir, env, stdio: ['ignore', outFd, errFd] });
      child.on('error', () => { /* ENOENT etc.: reported through pid/exit */ });
    } finally {
      fs.closeSync(outFd);
      fs.closeSync(errFd);
    }
    return new QemuProcess(role, runDir, [binary, ...args], child, {
      ...(serial ? { serial } : {}), ...(qmp ? { qmp } : {}), ...(trace ? { trace } : {}), stdout, stderr,
    });
  }

  get alive(): boolean {
    return this.exitStatus === undefined;
  }

  /** The (cached) QMP connection. */
  qmp(): Promise<QmpClient> {
    if (!this.qmpPath) return Promise.reject(new Error(`${this.role}: started without QMP`));
    if (!this.qmpClient) {
      const qmpPath = this.qmpPath;
      this.qmpClient = Promise.race([
        QmpClient.connect(qmpPath, { connectTimeoutMs: 30_000 }),
        this.exited.then((e) => { throw new Error(`${this.role}: QEMU exited (${fmtExit(e)}) before QMP was up; ${this.stderrTail()}`); }),
      ]);
      this.qmpClient.catch(() => { this.qmpClient = undefined; });
    }
    return this.qmpClient;
  }

  readSerial(): string {
    if (!this.serialPath) return '';
    try { return fs.readFileSync(this.serialPath, 'latin1'); } catch { return ''; }
  }

  readTrace(): string {
    if (!this.tracePath) return '';
    try { return fs.readFileSync(this.tracePath, 'utf8'); } catch { return ''; }
  }

  stderrTail(n = 1500): string {
    try {
      const s = fs.readFileSync(this.stderrPath, 'utf8');
      return s.length > n ? '...' + s.slice(-n) : s;
    } catch { return ''; }
  }

  /**
   * Resolves with the match once the serial log matches `re` (searched from
   * byte offset `from`, default 0). Rejects on timeout or if QEMU exits.
   */
  async waitForSerial(re: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    return this.waitForFile(() => this.readSerial().slice(from), re, timeoutMs, 'serial output');
  }

  /** Like waitForSerial, on the trace log. */
  async waitForTrace(re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    return this.waitForFile(() => this.readTrace(), re, timeoutMs, 'trace output');
  }

  private async waitForFile(read: () => string, re: RegExp, timeoutMs: number, what: string): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = read().match(re);
      if (m) return m;
      if (!this.alive) {
        throw new Error(`${this.role}: QEMU exited (${fmtExit(this.exitStatus)}) while waiting for ${re} in ${what}; ${this.stderrTail()}`);
      }
      if (Date.now() > deadline) throw new Error(`${this.role}: timeout (${timeoutMs} ms) waiting for ${re} in ${what}`);
      await sleep(100);
    }
  }

  /** SIGKILL by PID (a QEMU stuck in a COLO bug ignores SIGTERM) and wait for the exit. */
  async kill(): Promise<QemuExit> {
    this.closeQmp();
    if (this.alive) {
      try { process.kill(this.pid, 'SIGKILL'); } catch { /* already gone */ }
    }
    return this.exited;
  }

  /** QMP `quit`, falling back to SIGKILL after `timeoutMs`. */
  async quit(timeoutMs = 5000): Promise<QemuExit> {
    if (!this.alive) return this.exited;
    try {
      const q = await within(this.qmp(), timeoutMs);
      if (q) await q.execute('quit', undefined, { timeoutMs }).catch(() => undefined);
    } catch { /* fall through to kill */ }
    const r = await within(this.exited, timeoutMs);
    if (r) { this.closeQmp(); return r; }
    return this.kill();
  }

  private closeQmp(): void {
    const c = this.qmpClient;
    this.qmpClient = undefined;
    c?.then((q) => q.close()).catch(() => undefined);
  }
}

/** `p`'s value, or undefined if it takes longer than `ms` (the timer is cleared either way). */
export async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<undefined>((resolve) => { timer = setTimeout(resolve, ms, undefined); })]);
  } finally {
    clearTimeout(timer);
  }
}

function fmtExit(e: QemuExit | undefined): string {
  if (!e) return 'running';
  return e.signal ? `signal ${e.signal}` : `code ${e.code}`;
}
