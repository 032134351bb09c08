// Precopy (plain live migration) endpoints built from real QEMU: a source VM
// whose RAM holds known data (loader devices), and QEMU's own -incoming
// destination for cross-checks.
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { freePort, QemuProcess, qemuOptValue, type QemuExit } from './qemu.js';
import type { QmpClient } from './qmp.js';

export type MultifdCompression = 'none' | 'zlib' | 'zstd';

export interface MultifdOptions {
  channels: number;
  compression?: MultifdCompression;
}

export interface LoaderFile {
  /** Host file whose bytes are placed into guest RAM. */
  path: string;
  /** Guest-physical address. */
  addr: number;
}

/** The interesting part of query-migrate's answer. */
export interface MigrationInfo {
  status: string;
  'error-desc'?: string;
  'total-time'?: number;
  downtime?: number;
  ram?: { transferred?: number; total?: number; duplicate?: number; normal?: number; 'normal-bytes'?: number; [k: string]: unknown };
  [k: string]: unknown;
}

/** Capability list + parameters for a migration with the given multifd setting. */
export function migrationSetup(multifd?: MultifdOptions): { capabilities: { capability: string; state: boolean }[]; parameters: Record<string, unknown> } {
  const capabilities = [{ capability: 'multifd', state: !!multifd }];
  const parameters: Record<string, unknown> = {};
  if (multifd) {
    parameters['multifd-channels'] = multifd.channels;
    parameters['multifd-compression'] = multifd.compression ?? 'none';
  }
  return { capabilities, parameters };
}

async function applySetup(q: QmpClient, multifd: MultifdOptions | undefined, extraCaps: Record<string, boolean> = {}, extraParams: Record<string, unknown> = {}): Promise<void> {
  const s = migrationSetup(multifd);
  const caps = s.capabilities.concat(Object.entries(extraCaps).map(([capability, state]) => ({ capability, state })));
  await q.execute('migrate-set-capabilities', { capabilities: caps });
  const params = { ...s.parameters, ...extraParams };
  if (Object.keys(params).length) await q.execute('migrate-set-parameters', params);
}

const TERMINAL = new Set(['completed', 'failed', 'cancelled']);

/** Polls query-migrate until a terminal status; throws on failure or timeout. */
export async function waitMigrationDone(q: QmpClient, timeoutMs: number, proc?: QemuProcess): Promise<MigrationInfo> {
  const deadline = Date.now() + timeoutMs;
  let last: MigrationInfo | undefined;
  for (;;) {
    if (proc && !proc.alive) throw new Error(`${proc.role}: QEMU exited during migration; ${proc.stderrTail()}`);
    last = await q.execute<MigrationInfo>('query-migrate');
    if (last.status && TERMINAL.has(last.status)) {
      if (last.status !== 'completed') {
        throw new Error(`migration ${last.status}: ${last['error-desc'] ?? JSON.stringify(last)}`);
      }
      return last;
    }
    if (Date.now() > deadline) throw new Error(`migration not done within ${timeoutMs} ms (status ${last.status})`);
    await sleep(100);
  }
}

abstract class QmpVm {
  constructor(readonly proc: QemuProcess) {}
  qmp(): Promise<QmpClient> {
    return this.proc.qmp();
  }
  async execute<T = unknown>(cmd: string, args?: Record<string, unknown>): Promise<T> {
    return (await this.qmp()).execute<T>(cmd, args);
  }
  async queryMigrate(): Promise<MigrationInfo> {
    return this.execute<MigrationInfo>('query-migrate');
  }
  async waitMigrationDone(timeoutMs = 60_000): Promise<MigrationInfo> {
    return waitMigrationDone(await this.qmp(), timeoutMs, this.proc);
  }
  /** Writes `size` bytes of guest-physical memory at `addr` to `file` (absolute, or relative to the run dir). */
  async pmemsave(addr: number, size: number, file: string): Promise<string> {
    const f = path.resolve(this.proc.runDir, file);
    await this.execute('pmemsave', { val: addr, size, filename: f });
    return f;
  }
  async status(): Promise<string> {
    return (await this.execute<{ status: string }>('query-status')).status;
  }
  quit(): Promise<QemuExit> {
    return this.proc.quit();
  }
  kill(): Promise<QemuExit> {
    return this.proc.kill();
  }
}

export interface PrecopySourceOptions {
  memMiB?: number;                 // default 256
  machine?: string;                // default 'pc'
  loaderFiles?: LoaderFile[];
  multifd?: MultifdOptions;
  runDir: string;
  /** Start with -S (vCPUs never run; default true). */
  paused?: boolean;
  role?: string;                   // default 'source'
  /**
   * Migration bandwidth cap in bytes/s set before migrate. Default 'unlimited'
   * (1 TiB/s) so that the destination, not QEMU's default 128 MiB/s throttle, is
   * measured; 'qemu-default' leaves QEMU's setting alone.
   */
  maxBandwidth?: number | 'unlimited' | 'qemu-default';
  extraArgs?: string[];
  env?: Record<string, string | undefined>;
  /** QEMU binary (default qemuBinary(); see qemuBinaryFor). */
  binary?: string;
}

/** max-bandwidth used for 'unlimited' (bytes/s). */
export const UNLIMITED_BANDWIDTH = 2 ** 40;

export class PrecopySource extends QmpVm {
  constructor(proc: QemuProcess, readonly options: PrecopySourceOptions) {
    super(proc);
  }
  /** QMP stop (pause the vCPUs). */
  async stop(): Promise<void> {
    await this.execute('stop');
  }
  async cont(): Promise<void> {
    await this.execute('cont');
  }
  /**
   * Sets the migration capabilities/parameters (multifd, channels, compression,
   * max-bandwidth; `opts` adds/overrides) and starts `migrate` to `uri`
   * (e.g. tcp:127.0.0.1:4444).
   */
  async migrate(uri: string, opts: { capabilities?: Record<string, boolean>; parameters?: Record<string, unknown> } = {}): Promise<void> {
    const q = await this.qmp();
    const bw = this.options.maxBandwidth ?? 'unlimited';
    const params: Record<string, unknown> = {};
    if (bw !== 'qemu-default') params['max-bandwidth'] = bw === 'unlimited' ? UNLIMITED_BANDWIDTH : bw;
    await applySetup(q, this.options.multifd, opts.capabilities, { ...params, ...opts.parameters });
    await q.execute('migrate', { uri });
  }
}

/**
 * Starts `qemu-system-x86_64 -accel tcg -M pc -m 256 -nodefaults -display none [-S]`
 * with one `-device loader,file=...,addr=...,force-raw=on` per loader file (the
 * bytes are in guest RAM at those addresses from the first reset), and QMP.
 */
export async function startPrecopySource(o: PrecopySourceOptions): Promise<PrecopySource> {
  const devices = (o.loaderFiles ?? []).map((l) =>
    `loader,file=${qemuOptValue(path.resolve(l.path))},addr=0x${l.addr.toString(16)},force-raw=on`);
  const proc = QemuProcess.start({
    runDir: o.runDir,
    role: o.role ?? 'source',
    machine: o.machine ?? 'pc',
    memMiB: o.memMiB ?? 256,
    paused: o.paused !== false,
    devices,
    extra: o.extraArgs ?? [],
    serial: false,
    env: o.env ?? {},
    ...(o.binary ? { binary: o.binary } : {}),
  });
  const src = new PrecopySource(proc, o);
  try {
    await src.qmp();
  } catch (e) {
    await proc.kill();
    throw e;
  }
  return src;
}

export interface PrecopyDestinationOptions {
  memMiB?: number;                 // default 256
  machine?: string;                // default 'pc'
  multifd?: MultifdOptions;
  runDir: string;
  port?: number;                   // default: a free port
  role?: string;                   // default 'destination'
  extraArgs?: string[];
  /** QEMU binary (default qemuBinary(); see qemuBinaryFor). */
  binary?: string;
}

export class PrecopyDestination extends QmpVm {
  constructor(proc: QemuProcess, readonly port: number) {
    super(proc);
  }
  get uri(): string {
    return `tcp:127.0.0.1:${this.port}`;
  }
}

/**
 * QEMU's own destination: `-S -incoming defer`, multifd capabilities set, then
 * `migrate-incoming tcp:127.0.0.1:<port>`. The VM stays paused after the load.
 */
export async function startPrecopyDestination(o: PrecopyDestinationOptions): Promise<PrecopyDestination> {
  const port = o.port ?? await freePort();
  const proc = QemuProcess.start({
    runDir: o.runDir,
    role: o.role ?? 'destination',
    machine: o.machine ?? 'pc',
    memMiB: o.memMiB ?? 256,
    paused: true,
    incoming: 'defer',
    extra: o.extraArgs ?? [],
    serial: false,
    ...(o.binary ? { binary: o.binary } : {}),
  });
  const dst = new PrecopyDestination(proc, port);
  try {
    const q = await dst.qmp();
    await applySetup(q, o.multifd);
    await q.execute('migrate-incoming', { uri: dst.uri });
  } catch (e) {
    await proc.kill();
    throw e;
  }
  return dst;
}
