// COLO with real QEMU 7.2 under TCG: a primary running the test guest, and
// QEMU's own secondary (the C baseline). Timings come from QEMU's trace log
// (-trace events=FILE, log backend, -msg timestamp=on).
import fs from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ensureShim, type GuestImage } from './guest.js';
import { freePort, QemuProcess, type QemuExit } from './qemu.js';
import type { QmpClient } from './qmp.js';
import type { MigrationInfo, MultifdOptions } from './precopy.js';

export type GuestFiles = Pick<GuestImage, 'kernel' | 'initrd'>;

/** Trace events enabled on the primary. */
export const PRIMARY_TRACE_EVENTS = [
  'colo_send_message', 'colo_receive_message', 'colo_vm_state_change',
  'migration_bitmap_sync_start', 'migration_bitmap_sync_end',
  'savevm_section_start', 'savevm_section_end', 'multifd_send_sync_main',
];

/** Trace events enabled on QEMU's secondary. */
export const SECONDARY_TRACE_EVENTS = [
  'colo_send_message', 'colo_receive_message', 'colo_vm_state_change',
  'colo_flush_ram_cache_begin', 'colo_flush_ram_cache_end',
  'ram_load_complete', 'multifd_recv_sync_main',
];

export const GUEST_READY_RE = /COLO-GUEST-READY/;

// ---------------------------------------------------------------------------
// trace parsing

export interface TraceLine {
  /** Wall-clock time, milliseconds since the epoch (µs resolution). */
  t: number;
  tid: number;
  event: string;
  args: string;
}

const TRACE_RE = /^(\d+)@(\d+)\.(\d{6}):([A-Za-z0-9_]+) ?(.*)$/;

/** Parses QEMU log-backend trace lines written with `-msg timestamp=on`. */
export function parseTraceLines(text: string): TraceLine[] {
  const out: TraceLine[] = [];
  for (const line of text.split('\n')) {
    const m = TRACE_RE.exec(line);
    if (!m) continue;
    out.push({ tid: Number(m[1]), t: Number(m[2]) * 1000 + Number(m[3]) / 1000, event: m[4]!, args: m[5] ?? '' });
  }
  return out;
}

const MSG_RE = /'([a-z-]+)'/;
function coloMessage(l: TraceLine): { dir: 'send' | 'receive'; msg: string } | undefined {
  if (l.event !== 'colo_send_message' && l.event !== 'colo_receive_message') return undefined;
  const m = MSG_RE.exec(l.args);
  if (!m) return undefined;
  return { dir: l.event === 'colo_send_message' ? 'send' : 'receive', msg: m[1]! };
}

function delta(a: number | undefined, b: number | undefined): number | undefined {
  return a !== undefined && b !== undefined ? b - a : undefined;
}

/** One checkpoint as seen in the primary's trace (times: epoch ms). */
export interface PrimaryCheckpoint {
  index: number;                 // 0-based
  requestAt: number;             // sent CHECKPOINT_REQUEST
  replyAt?: number;              // received CHECKPOINT_REPLY
  vmstateSendAt?: number;        // sent VMSTATE_SEND (RAM part starts)
  vmstateSizeAt?: number;        // sent VMSTATE_SIZE (RAM part written, blob follows)
  receivedAt?: number;           // received VMSTATE_RECEIVED
  loadedAt?: number;             // received VMSTATE_LOADED
  bitmapSyncMs?: number;         // migration_bitmap_sync_start -> _end within the checkpoint
  /** VMSTATE_SEND -> VMSTATE_SIZE sent (device save + RAM part written). */
  sendToSizeMs?: number;
  /** VMSTATE_SEND -> VMSTATE_RECEIVED (RAM + blob transferred and read). */
  sendToReceivedMs?: number;
  /** VMSTATE_SEND -> VMSTATE_LOADED (... and applied by the secondary). */
  sendToLoadedMs?: number;
  /** CHECKPOINT_REQUEST -> VMSTATE_LOADED (whole checkpoint; VM paused for about this long). */
  requestToLoadedMs?: number;
  complete: boolean;
}

export interface PrimaryTrace {
  /** CHECKPOINT_READY received: COLO has started. */
  coloStartAt?: number;
  checkpoints: PrimaryCheckpoint[];
}

/** Per-checkpoint timings from a COLO primary's trace. */
export function parsePrimaryTrace(text: string): PrimaryTrace {
  const res: PrimaryTrace = { checkpoints: [] };
  let cur: PrimaryCheckpoint | undefined;
  let syncStart: number | undefined;
  for (const l of parseTraceLines(text)) {
    if (l.event === 'migration_bitmap_sync_start') { syncStart = l.t; continue; }
    if (l.event === 'migration_bitmap_sync_end') {
      if (cur && !cur.complete && syncStart !== undefined) cur.bitmapSyncMs = (cur.bitmapSyncMs ?? 0) + (l.t - syncStart);
      syncStart = undefined;
      continue;
    }
    const m = coloMessage(l);
    if (!m) continue;
    const key = `${m.dir}:${m.msg}`;
    if (key === 'receive:checkpoint-ready') { res.coloStartAt ??= l.t; continue; }
    if (key === 'send:checkpoint-request') {
      cur = { index: res.checkpoints.length, requestAt: l.t, complete: false };
      res.checkpoints.push(cur);
      continue;
    }
    if (!cur) continue;
    switch (key) {
      case 'receive:checkpoint-reply': cur.replyAt = l.t; break;
      case 'send:vmstate-send': cur.vmstateSendAt = l.t; break;
      case 'send:vmstate-size': cur.vmstateSizeAt = l.t; break;
      case 'receive:vmstate-received': cur.receivedAt = l.t; break;
      case 'receive:vmstate-loaded': cur.loadedAt = l.t; cur.complete = true; break;
      default: break;
    }
  }
  for (const c of res.checkpoints) {
    const set = (k: 'sendToSizeMs' | 'sendToReceivedMs' | 'sendToLoadedMs' | 'requestToLoadedMs', v: number | undefined) => {
      if (v !== undefined) c[k] = v;
    };
    set('sendToSizeMs', delta(c.vmstateSendAt, c.vmstateSizeAt));
    set('sendToReceivedMs', delta(c.vmstateSendAt, c.receivedAt));
    set('sendToLoadedMs', delta(c.vmstateSendAt, c.loadedAt));
    set('requestToLoadedMs', delta(c.requestAt, c.loadedAt));
  }
  return res;
}

/** One checkpoint as seen in QEMU's secondary's trace (times: epoch ms). */
export interface SecondaryCheckpoint {
  index: number;
  requestAt: number;             // received CHECKPOINT_REQUEST
  vmstateSendAt?: number;        // received VMSTATE_SEND
  ramLoadedAt?: number;          // ram_load_complete (RAM part parsed)
  vmstateSizeAt?: number;        // received VMSTATE_SIZE
  receivedAt?: number;           // sent VMSTATE_RECEIVED
  flushBeginAt?: number;         // colo_flush_ram_cache_begin
  flushEndAt?: number;           // colo_flush_ram_cache_end
  flushPages?: number;           // dirty pages flushed from the cache
  loadedAt?: number;             // sent VMSTATE_LOADED
  /** VMSTATE_SEND received -> VMSTATE_RECEIVED sent (RAM + blob received). */
  receiveMs?: number;
  flushMs?: number;
  /** VMSTATE_SEND received -> cache flushed into guest RAM. */
  sendToFlushedMs?: number;
  complete: boolean;
}

export interface SecondaryTrace {
  readyAt?: number;              // sent CHECKPOINT_READY
  checkpoints: SecondaryCheckpoint[];
}

/** Per-checkpoint timings from QEMU's COLO secondary's trace. */
export function parseSecondaryTrace(text: string): SecondaryTrace {
  const res: SecondaryTrace = { checkpoints: [] };
  let cur: SecondaryCheckpoint | undefined;
  for (const l of parseTraceLines(text)) {
    if (l.event === 'colo_flush_ram_cache_begin') {
      if (cur) {
        cur.flushBeginAt = l.t;
        const n = /(\d+)/.exec(l.args);
        if (n) cur.flushPages = Number(n[1]);
      }
      continue;
    }
    if (l.event === 'colo_flush_ram_cache_end') { if (cur) cur.flushEndAt = l.t; continue; }
    if (l.event === 'ram_load_complete') { if (cur && cur.vmstateSendAt !== undefined) cur.ramLoadedAt ??= l.t; continue; }
    const m = coloMessage(l);
    if (!m) continue;
    const key = `${m.dir}:${m.msg}`;
    if (key === 'send:checkpoint-ready') { res.readyAt ??= l.t; continue; }
    if (key === 'receive:checkpoint-request') {
      cur = { index: res.checkpoints.length, requestAt: l.t, complete: false };
      res.checkpoints.push(cur);
      continue;
    }
    if (!cur) continue;
    switch (key) {
      case 'receive:vmstate-send': cur.vmstateSendAt = l.t; break;
      case 'receive:vmstate-size': cur.vmstateSizeAt = l.t; break;
      case 'send:vmstate-received': cur.receivedAt = l.t; break;
      case 'send:vmstate-loaded': cur.loadedAt = l.t; cur.complete = true; break;
      default: break;
    }
  }
  for (const c of res.checkpoints) {
    const r = delta(c.vmstateSendAt, c.receivedAt);
    if (r !== undefined) c.receiveMs = r;
    const f = delta(c.flushBeginAt, c.flushEndAt);
    if (f !== undefined) c.flushMs = f;
    const s = delta(c.vmstateSendAt, c.flushEndAt);
    if (s !== undefined) c.sendToFlushedMs = s;
  }
  return res;
}

/**
 * Memory-transfer time per checkpoint across both traces (same host clock):
 * primary sends VMSTATE_SEND -> secondary has flushed its cache into guest RAM.
 * Checkpoints are paired by index.
 */
export function memoryTransferMs(p: PrimaryTrace, s: SecondaryTrace): number[] {
  const out: number[] = [];
  const n = Math.min(p.checkpoints.length, s.checkpoints.length);
  for (let i = 0; i < n; i++) {
    const a = p.checkpoints[i]!.vmstateSendAt;
    const b = s.checkpoints[i]!.flushEndAt;
    if (a !== undefined && b !== undefined) out.push(b - a);
  }
  return out;
}

/** Incremental counter of a substring in a growing trace file. */
class TraceCounter {
  private offset = 0;
  private count = 0;
  private tail = '';
  constructor(private readonly file: string | undefined, private readonly needle: string) {}
  read(): number {
    if (!this.file) return 0;
    let fd: number;
    try { fd = fs.openSync(this.file, 'r'); } catch { return this.count; }
    try {
      const size = fs.fstatSync(fd).size;
      if (size > this.offset) {
        const buf = Buffer.alloc(size - this.offset);
        const n = fs.readSync(fd, buf, 0, buf.length, this.offset);
        this.offset += n;
        const text = this.tail + buf.toString('utf8', 0, n);
        const lastNl = text.lastIndexOf('\n');
        const full = lastNl >= 0 ? text.slice(0, lastNl + 1) : '';
        this.tail = lastNl >= 0 ? text.slice(lastNl + 1) : text;
        let i = 0;
        while ((i = full.indexOf(this.needle, i)) >= 0) { this.count++; i += this.needle.length; }
      }
    } finally {
      fs.closeSync(fd);
    }
    return this.count;
  }
}

// ---------------------------------------------------------------------------
// shim environment

export interface ShimEnvOptions {
  shim: string;
  tlbFlush?: boolean;
  nodelay?: boolean;
  mfdCacheRamBytes?: number;
  verbose?: boolean;
}

/** Environment variables that LD_PRELOAD the colo shim with the given switches. */
export function shimEnv(o: ShimEnvOptions): Record<string, string> {
  const env: Record<string, string> = { LD_PRELOAD: o.shim };
  if (o.tlbFlush) env['COLO_SHIM_TLBFLUSH'] = '1';
  if (o.nodelay) env['COLO_SHIM_NODELAY'] = '1';
  if (o.mfdCacheRamBytes) {
    env['COLO_SHIM_MFD_CACHE'] = '1';
    env['COLO_SHIM_RAM_BYTES'] = String(o.mfdCacheRamBytes);
  }
  if (o.verbose) env['COLO_SHIM_VERBOSE'] = '1';
  return env;
}

function guestAppend(extra?: string): string {
  return ['console=ttyS0', 'init_on_free=1', extra ?? ''].filter(Boolean).join(' ');
}

// ---------------------------------------------------------------------------
// primary

export interface ColoPrimaryOptions {
  guest: GuestFiles;
  memMiB?: number;                 // default 512
  multifd?: MultifdOptions;
  checkpointDelayMs?: number;      // default 600
  runDir: string;
  /** Trace colo_* etc. into <runDir>/primary-trace.log (default true; needed for checkpoint counting). */
  trace?: boolean;
  /** Shim path, or false for none (default: ensureShim()). */
  shim?: string | false;
  /** COLO_SHIM_TLBFLUSH (default true). */
  tlbFlush?: boolean;
  /** COLO_SHIM_NODELAY (default false: stock 7.2 behaviour). */
  nodelay?: boolean;
  /** Extra guest kernel command-line arguments (e.g. 'colo.sink=null'). */
  append?: string;
  uploadPort?: number;             // host port forwarded to guest 5000 (default: free port)
  shellPort?: number;              // host port forwarded to guest 5001 (default: free port)
  bootTimeoutMs?: number;          // default 120 s
  role?: string;                   // default 'primary'
  extraArgs?: string[];
  /** QEMU binary (default qemuBinary(); see qemuBinaryFor). */
  binary?: string;
}

export class ColoPrimary {
  /** Milliseconds from spawn to the guest's READY line. */
  bootMs = 0;
  private readonly requests: TraceCounter;
  private readonly loaded: TraceCounter;

  constructor(
    readonly proc: QemuProcess,
    readonly options: ColoPrimaryOptions,
    readonly uploadPort: number,
    readonly shellPort: number,
  ) {
    this.requests = new TraceCounter(proc.tracePath, "Send 'checkpoint-request'");
    this.loaded = new TraceCounter(proc.tracePath, "Receive 'vmstate-loaded'");
  }

  qmp(): Promise<QmpClient> {
    return this.proc.qmp();
  }

  /** Sets x-colo (+ multifd) and x-checkpoint-delay (+ multifd params), then `migrate uri`. */
  async migrate(uri: string, opts: { capabilities?: Record<string, boolean>; parameters?: Record<string, unknown> } = {}): Promise<void> {
    const q = await this.qmp();
    const mf = this.options.multifd;
    const caps: Record<string, boolean> = { 'x-colo': true, multifd: !!mf, ...opts.capabilities };
    await q.execute('migrate-set-capabilities', {
      capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
    });
    const params: Record<string, unknown> = { 'x-checkpoint-delay': this.options.checkpointDelayMs ?? 600, ...opts.parameters };
    if (mf) {
      params['multifd-channels'] = mf.channels;
      params['multifd-compression'] = mf.compression ?? 'none';
    }
    await q.execute('migrate-set-parameters', params);
    await q.execute('migrate', { uri });
  }

  /** query-migrate (7.2 says only {"status":"colo"} during COLO). */
  async status(): Promise<MigrationInfo> {
    return (await this.qmp()).execute<MigrationInfo>('query-migrate');
  }

  async coloStatus(): Promise<{ mode: string; 'last-mode'?: string; reason: string }> {
    return (await this.qmp()).execute('query-colo-status');
  }

  /** Waits until query-migrate reports "colo"; throws if the migration fails. */
  async waitColo(timeoutMs = 120_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.proc.alive) throw new Error(`primary exited; ${this.proc.stderrTail()}`);
      const s = await this.status();
      if (s.status === 'colo') return;
      if (s.status === 'failed' || s.status === 'cancelled' || s.status === 'completed') {
        throw new Error(`primary migration ${s.status}: ${s['error-desc'] ?? JSON.stringify(s)}`);
      }
      if (Date.now() > deadline) throw new Error(`primary not in COLO state within ${timeoutMs} ms (status ${s.status})`);
      await sleep(50);
    }
  }

  /** Checkpoints started (CHECKPOINT_REQUEST sent), from the trace. */
  checkpointsStarted(): number {
    return this.requests.read();
  }

  /** Checkpoints completed (VMSTATE_LOADED received), from the trace. */
  checkpointCount(): number {
    return this.loaded.read();
  }

  /** Waits until at least `n` checkpoints have completed. */
  async waitCheckpoints(n: number, timeoutMs: number, alsoAlive: QemuProcess[] = []): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const c = this.checkpointCount();
      if (c >= n) return c;
      for (const p of [this.proc, ...alsoAlive]) {
        if (!p.alive) throw new Error(`${p.role} exited after ${c} checkpoints; ${p.stderrTail()}`);
      }
      if (Date.now() > deadline) throw new Error(`only ${c} of ${n} checkpoints within ${timeoutMs} ms`);
      await sleep(100);
    }
  }

  parseTrace(): PrimaryTrace {
    return parsePrimaryTrace(this.proc.readTrace());
  }

  kill(): Promise<QemuExit> {
    return this.proc.kill();
  }
}

/**
 * Starts the COLO primary: the test guest under TCG with user networking
 * (hostfwd 127.0.0.1:<uploadPort> -> guest 5000, <shellPort> -> 5001), the
 * shim (COLO_SHIM_TLBFLUSH=1, optional COLO_SHIM_NODELAY) and the trace;
 * resolves when the guest has printed COLO-GUEST-READY.
 */
export async function startColoPrimary(o: ColoPrimaryOptions): Promise<ColoPrimary> {
  const uploadPort = o.uploadPort ?? await freePort();
  const shellPort = o.shellPort ?? await freePort();
  const shim = o.shim === false ? undefined : (o.shim ?? await ensureShim());
  const env = shim ? shimEnv({ shim, tlbFlush: o.tlbFlush !== false, nodelay: !!o.nodelay }) : {};
  const proc = QemuProcess.start({
    runDir: o.runDir,
    role: o.role ?? 'primary',
    cpu: 'qemu64',
    memMiB: o.memMiB ?? 512,
    kernel: o.guest.kernel,
    initrd: o.guest.initrd,
    append: guestAppend(o.append),
    netdevs: [`user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:${uploadPort}-:5000,hostfwd=tcp:127.0.0.1:${shellPort}-:5001`],
    devices: ['virtio-net-pci,netdev=n0,romfile='],
    ...(o.trace !== false ? { trace: { events: PRIMARY_TRACE_EVENTS } } : {}),
    msgTimestamp: true,
    env,
    extra: o.extraArgs ?? [],
    ...(o.binary ? { binary: o.binary } : {}),
  });
  const p = new ColoPrimary(proc, o, uploadPort, shellPort);
  try {
    await proc.waitForSerial(GUEST_READY_RE, o.bootTimeoutMs ?? 120_000);
    p.bootMs = Date.now() - proc.startedAt;
    await p.qmp();
  } catch (e) {
    await proc.kill();
    throw e;
  }
  return p;
}

// ---------------------------------------------------------------------------
// QEMU's own secondary (C baseline)

export interface QemuSecondaryOptions {
  guest: GuestFiles;
  memMiB?: number;                 // default 512 (must match the primary)
  multifd?: MultifdOptions;
  port?: number;                   // default: a free port
  runDir: string;
  /**
   * Emulate the 7.2 multifd->COLO-cache fix with the shim (needed with multifd;
   * true = ensureShim(), or a shim path). Compression 'none' only.
   */
  mfdCacheShim?: boolean | string;
  /** COLO_SHIM_NODELAY on the secondary (loads the shim). */
  nodelay?: boolean;
  /** Shim path for nodelay when mfdCacheShim is not a path (default ensureShim()). */
  shim?: string;
  trace?: boolean;                 // default true
  /** Must match the primary's guest command line (fw_cfg contents are compared). */
  append?: string;
  role?: string;                   // default 'secondary'
  extraArgs?: string[];
  /** QEMU binary (default qemuBinary(); see qemuBinaryFor). */
  binary?: string;
  /**
   * Set the x-colo capability before migrate-incoming (10.x refuses ENABLE_COLO without it;
   * 7.2 does not need it).
   */
  xColo?: boolean;
}

export class QemuSecondary {
  private readonly loaded: TraceCounter;
  constructor(readonly proc: QemuProcess, readonly port: number, readonly options: QemuSecondaryOptions) {
    this.loaded = new TraceCounter(proc.tracePath, "Send 'vmstate-loaded'");
  }
  get uri(): string {
    return `tcp:127.0.0.1:${this.port}`;
  }
  qmp(): Promise<QmpClient> {
    return this.proc.qmp();
  }
  async status(): Promise<MigrationInfo> {
    return (await this.qmp()).execute<MigrationInfo>('query-migrate');
  }
  /** Checkpoints applied (VMSTATE_LOADED sent), from the trace. */
  checkpointCount(): number {
    return this.loaded.read();
  }
  parseTrace(): SecondaryTrace {
    return parseSecondaryTrace(this.proc.readTrace());
  }
  kill(): Promise<QemuExit> {
    return this.proc.kill();
  }
}

/**
 * QEMU's own COLO secondary: same guest and devices as the primary (netdev
 * type must match; no hostfwd), `-incoming defer`, multifd capabilities if
 * requested, then `migrate-incoming tcp:127.0.0.1:<port>`.
 */
export async function startQemuSecondary(o: QemuSecondaryOptions): Promise<QemuSecondary> {
  const port = o.port ?? await freePort();
  const memMiB = o.memMiB ?? 512;
  let env: Record<string, string> = {};
  if (o.mfdCacheShim || o.nodelay) {
    const shim = typeof o.mfdCacheShim === 'string' ? o.mfdCacheShim : (o.shim ?? await ensureShim());
    env = shimEnv({
      shim,
      nodelay: !!o.nodelay,
      ...(o.mfdCacheShim && o.multifd ? { mfdCacheRamBytes: memMiB * 1024 * 1024 } : {}),
    });
  }
  const proc = QemuProcess.start({
    runDir: o.runDir,
    role: o.role ?? 'secondary',
    cpu: 'qemu64',
    memMiB,
    kernel: o.guest.kernel,
    initrd: o.guest.initrd,
    append: guestAppend(o.append),
    netdevs: ['user,id=n0,restrict=on'],
    devices: ['virtio-net-pci,netdev=n0,romfile='],
    incoming: 'defer',
    ...(o.trace !== false ? { trace: { events: SECONDARY_TRACE_EVENTS } } : {}),
    msgTimestamp: true,
    env,
    extra: o.extraArgs ?? [],
    ...(o.binary ? { binary: o.binary } : {}),
  });
  const s = new QemuSecondary(proc, port, o);
  try {
    const q = await s.qmp();
    if (o.xColo) {
      await q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-colo', state: true }] });
    }
    if (o.multifd) {
      await q.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
      await q.execute('migrate-set-parameters', {
        'multifd-channels': o.multifd.channels,
        'multifd-compression': o.multifd.compression ?? 'none',
      });
    }
    await q.execute('migrate-incoming', { uri: s.uri });
  } catch (e) {
    await proc.kill();
    throw e;
  }
  return s;
}
