// One benchmark cell = one primary (real QEMU 7.2 or the synthetic one) checkpointing into one
// secondary (our receiver as a CLI child, or QEMU's own -incoming) for warm-up + N checkpoints.
import { readFile } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  attachReplication,
  DISK_NAME,
  makeExt4Image,
  primaryDiskArgs,
  startColoPrimary,
  type Pki,
  startQemuSecondary,
  UploadWorkload,
  type ColoPrimary,
  type GuestFiles,
  type QemuSecondary,
} from '../../src/harness/index.js';
import { SyntheticSource } from '../../src/sender/source.js';
import { ReceiverChild } from './receiver.js';
import { schedSnapshot, schedUsage, type SchedUsage } from './sched.js';
import {
  addOurs,
  addQemuSecondary,
  parseOursCsv,
  parsePrimaryTrace,
  parseSecondaryTrace,
  primaryDirtyPages,
  primaryTimes,
  type CheckpointTimes,
} from './traces.js';

export type Secondary = 'ours' | 'qemu';
export type Workload = 'idle' | 'load';

export interface CellSpec {
  primary: 'qemu' | 'synthetic';
  /** 0 = plain, N = multifd with N channels. */
  channels: number;
  workload: Workload;
  secondary: Secondary;
  /** TCP_NODELAY on QEMU's sockets (shim). Ours always sets it on its own sockets. */
  nodelay: boolean;
  /** Every channel over TLS (tls-creds-x509 on the primary, --tls-creds on ours; ours only). */
  tls?: boolean;

  /**
   * The guest's uploads go to an ext4 virtio-blk disk, synced per file (colo.sink=disk):
   * 'replicated' = quorum + replication + NBD into our --nbd/--disk (README "Disks");
   * 'local' = the same disk without replication (the baseline for what replication adds).
   */
  disk?: 'replicated' | 'local';
}

export interface CellConfig {
  ramMiB: number;
  intervalMs: number;
  warmup: number;
  checkpoints: number;
  uploadMBps: number;
  guest?: GuestFiles;
  runDir: string;
  /** The receiver's CLI (a snapshot of the build taken when the run started). */
  receiverCli?: string;
  /** Extra environment for our receiver (e.g. GLIBC_TUNABLES). */
  receiverEnv?: Record<string, string>;
  /**
   * The real QEMU of the primary and of the C secondary: binary, and whether it is the 10.0.2
   * COLO build (C secondary: x-colo set, the seed's multifd semantics built in, no shim cache
   * redirect). Default: the system's 7.2 with the shim's redirect.
   */
  qemu?: { binary: string; colo10: boolean };
  /** Certificates for the TLS cells (made once per run). */
  pki?: Pki;
  /**
   * COLO's primary and secondary run on two hosts: pin the primary (and this harness, which
   * drives its upload) to these CPUs and the secondary to the others, so neither takes the
   * other's CPU time (taskset -a: every thread, and threads made later inherit it).
   */
  splitCores?: { primary: string; secondary: string };
  log: (msg: string) => void;
}

export interface CellResult extends CellSpec {
  name: string;
  ok: boolean;
  error?: string;
  startedAt: string;
  wallSeconds: number;
  loadavgStart: number[];
  loadavgEnd: number[];
  runDir: string;
  bootMs?: number;
  coloAfterMs?: number;
  /** Achieved upload rate (load cells), MB/s. */
  uploadMBps?: number;
  uploadFiles?: number;
  uploadErrors?: number;
  firstIndex?: number;
  /** Measured checkpoints, primary index order. */
  checkpoints: CheckpointTimes[];
  /** Ours: CSV rows paired with the primary's trace, and how many disagreed on the page count. */
  pairing?: { paired: number; mismatched: number };
  receiverExit?: number;
  /** Errors of earlier attempts of this cell (--retries). */
  retriedAfter?: string[];
  /** CPU time and run-queue wait per measured checkpoint (all threads), from /proc schedstat. */
  sched?: { secondary?: SchedUsage; primary?: SchedUsage };
  /** disk 'replicated': the receiver's --stats-json NBD commands and per-disk commit figures. */
  diskStats?: { nbd?: unknown; disks?: unknown };
  /** The secondary's memory at the end of the measured window (/proc/PID/status), MiB. */
  memory?: { vmHWMMiB: number; vmRSSMiB: number; anonHugePagesMiB: number };
}

/** VmHWM, VmRSS and AnonHugePages of a process, MiB (undefined when it is gone). */
export function processMemory(pid: number): CellResult['memory'] {
  try {
    const st = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (k: string, text: string) => Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(text)?.[1] ?? 0);
    let huge = 0;
    try { huge = kb('AnonHugePages', readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8')); } catch { /* older kernel */ }
    return { vmHWMMiB: Math.round(kb('VmHWM', st) / 102.4) / 10, vmRSSMiB: Math.round(kb('VmRSS', st) / 102.4) / 10, anonHugePagesMiB: Math.round(huge / 102.4) / 10 };
  } catch { return undefined; }
}

export function modeName(channels: number): string {
  return channels === 0 ? 'plain' : `multifd-${channels}`;
}

export function cellName(s: CellSpec): string {
  return `${s.primary === 'synthetic' ? 'synthetic-' : ''}${modeName(s.channels)}-${s.workload}-${s.secondary}${s.tls ? '-tls' : ''}${s.nodelay ? '' : '-stock'}${s.disk ? `-${s.disk === 'local' ? 'localdisk' : 'disk'}` : ''}`;
}

const cleanups = new Set<() => unknown>();
/** Kills whatever a cell left running (SIGINT, or an exception between start and stop). */
export async function cleanupAll(): Promise<void> {
  for (const c of [...cleanups]) { try { await c(); } catch { /* already gone */ } }
  cleanups.clear();
}

export async function runCell(spec: CellSpec, cfg: CellConfig): Promise<CellResult> {
  const name = cellName(spec);
  const runDir = join(cfg.runDir, name);
  mkdirSync(runDir, { recursive: true });
  const res: CellResult = {
    ...spec, name, ok: false, startedAt: new Date().toISOString(), wallSeconds: 0,
    loadavgStart: loadavg().map(round2), loadavgEnd: [], runDir, checkpoints: [],
  };
  const t0 = performance.now();
  try {
    if (spec.primary === 'qemu') await qemuCell(spec, cfg, runDir, res);
    else await syntheticCell(spec, cfg, runDir, res);
    res.ok = res.checkpoints.length >= cfg.checkpoints;
    if (!res.ok) res.error = `only ${res.checkpoints.length} of ${cfg.checkpoints} measured checkpoints complete`;
  } catch (e) {
    res.error = (e as Error).message.slice(0, 2000);
  } finally {
    await cleanupAll();
    res.loadavgEnd = loadavg().map(round2);
    res.wallSeconds = Math.round((performance.now() - t0) / 100) / 10;
  }
  return res;
}

/** Every thread of `pid` onto `cpus` (a taskset list); threads it makes later inherit it. */
function pin(pid: number, cpus: string): void {
  execFileSync('taskset', ['-a', '-p', '-c', cpus, String(pid)], { stdio: 'ignore' });
}

function round2(x: number): number { return Math.round(x * 100) / 100; }

function track<T>(kill: () => T): () => T {
  cleanups.add(kill);
  return kill;
}

async function qemuCell(spec: CellSpec, cfg: CellConfig, runDir: string, res: CellResult): Promise<void> {
  const guest = cfg.guest!;
  const multifd = spec.channels > 0 ? { channels: spec.channels } : undefined;
  const csv = join(runDir, 'checkpoints.csv');
  let recv: ReceiverChild | undefined;
  let sec: QemuSecondary | undefined;
  let uri: string;
  const primaryImg = join(runDir, 'primary-disk.img');
  const receiverImg = join(runDir, 'receiver-disk.img');
  if (spec.disk) {
    if (spec.secondary !== 'ours') throw new Error("disk cells run with our receiver only (QEMU's secondary needs its own NBD/hidden-disk setup)");
    makeExt4Image(primaryImg);
    copyFileSync(primaryImg, receiverImg);
    track(() => { rmSync(primaryImg, { force: true }); rmSync(receiverImg, { force: true }); });
  }
  if (spec.secondary === 'ours') {
    if (spec.tls && !cfg.pki) throw new Error('a TLS cell needs cfg.pki');
    recv = ReceiverChild.start(['--multifd-channels', String(spec.channels), '--stats-json', join(runDir, 'stats.json'),
      '--checkpoints-csv', csv, ...(spec.tls ? ['--tls-creds', cfg.pki!.serverDir, '--tls-authz', cfg.pki!.clientDn.replace(/,/g, ',,')] : []),
      ...(spec.disk === 'replicated' ? ['--nbd', '127.0.0.1:0', '--disk', `${DISK_NAME}=${receiverImg}`] : [])],
      join(runDir, 'receiver.log'), cfg.receiverCli, cfg.receiverEnv);
    const r = recv;
    track(() => r.kill());
    uri = `tcp:127.0.0.1:${await recv.port()}`;
  } else {
    const q10 = cfg.qemu?.colo10 === true;
    sec = await startQemuSecondary({
      guest, runDir, memMiB: cfg.ramMiB, ...(multifd ? { multifd, ...(q10 ? {} : { mfdCacheShim: true }) } : {}), nodelay: spec.nodelay,
      ...(cfg.qemu ? { binary: cfg.qemu.binary } : {}), ...(q10 ? { xColo: true } : {}),
    });
    const s = sec;
    track(() => s.kill());
    uri = s.uri;
  }
  const primary: ColoPrimary = await startColoPrimary({
    guest, runDir, memMiB: cfg.ramMiB, checkpointDelayMs: cfg.intervalMs, nodelay: spec.nodelay, ...(multifd ? { multifd } : {}),
    ...(cfg.qemu ? { binary: cfg.qemu.binary } : {}),
    ...(spec.disk ? { append: 'colo.sink=disk colo.keep=8' } : {}),
    extraArgs: [...(spec.tls ? ['-object', `tls-creds-x509,id=tls0,dir=${cfg.pki!.clientDir},endpoint=client,verify-peer=on`] : []), ...(spec.disk ? primaryDiskArgs(primaryImg) : [])],
  });
  track(() => primary.kill());
  res.bootMs = primary.bootMs;
  if (cfg.splitCores) {
    pin(primary.proc.pid, cfg.splitCores.primary);
    pin(process.pid, cfg.splitCores.primary);
    pin(recv ? recv.pid : sec!.proc.pid, cfg.splitCores.secondary);
  }
  if (spec.disk === 'replicated') await attachReplication(primary, { primaryImage: primaryImg, receiverPath: receiverImg, nbdPort: await recv!.nbdPort() });
  const alsoAlive = sec ? [sec.proc] : [];
  const tm = Date.now();
  // max-bandwidth only paces the initial precopy (a COLO checkpoint is not rate limited): same on both sides.
  await primary.migrate(uri, { parameters: { 'max-bandwidth': 10_000_000_000, ...(spec.tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'colo-receiver' } : {}) } });
  await primary.waitColo(180_000);
  res.coloAfterMs = Date.now() - tm;
  const perCkpt = cfg.intervalMs + 2000;
  const waitFor = async (n: number) => {
    if (recv && !recv.alive) throw new Error(`receiver exited: ${recv.stderrTail.slice(-1500)}`);
    await primary.waitCheckpoints(n, 60_000 + n * perCkpt, alsoAlive);
    if (recv && !recv.alive) throw new Error(`receiver exited: ${recv.stderrTail.slice(-1500)}`);
  };
  let upload: UploadWorkload | undefined;
  if (spec.workload === 'load') {
    const before = Math.ceil(cfg.warmup / 2);
    await waitFor(before);
    upload = new UploadWorkload({ port: primary.uploadPort, rateMBps: cfg.uploadMBps, fileBytes: 8 << 20 }).start();
    const u = upload;
    track(() => u.stop({ waitAcks: false }));
  }
  await waitFor(cfg.warmup);
  const first = primary.checkpointsStarted();
  res.firstIndex = first;
  const secPid = recv ? recv.pid : sec!.proc.pid;
  const s0 = schedSnapshot(secPid), p0 = schedSnapshot(primary.proc.pid), c0 = primary.checkpointCount();
  cfg.log(`  ${res.name}: COLO after ${res.coloAfterMs} ms, measuring checkpoints ${first}..${first + cfg.checkpoints - 1}`);
  // Measured: primary checkpoints first .. first+N-1, all complete once N+first have completed.
  const end = first + cfg.checkpoints;
  let lastLog = Date.now();
  for (let n = Math.min(first + 10, end); ; n = Math.min(n + 10, end)) {
    await waitFor(n);
    if (Date.now() - lastLog > 20_000) { cfg.log(`  ${res.name}: ${primary.checkpointCount() - first} of ${cfg.checkpoints} measured`); lastLog = Date.now(); }
    if (n >= end) break;
  }
  const done = primary.checkpointCount() - c0;
  res.sched = { secondary: schedUsage(s0, schedSnapshot(secPid), done), primary: schedUsage(p0, schedSnapshot(primary.proc.pid), done) };
  const mem = processMemory(secPid);
  if (mem) res.memory = mem;
  if (upload) {
    const rate = upload.rateMBps();
    const files = await upload.stop({ waitAcks: false });
    res.uploadMBps = Math.round(rate * 10) / 10;
    res.uploadFiles = files.length;
    res.uploadErrors = upload.errors.length + files.filter((f) => f.error && f.error !== 'upload aborted').length;
  }
  // Stop the primary: ours sees the primary gone, keeps its committed checkpoint and exits 0
  // after writing the CSV; QEMU's secondary is simply killed.
  await primary.kill();
  const ptext = primary.proc.readTrace();
  const ptrace = parsePrimaryTrace(ptext);
  const times = primaryTimes(ptrace, primaryDirtyPages(ptext));
  if (recv) {
    res.receiverExit = await recv.wait(60_000);
    if (spec.disk === 'replicated') {
      const st = JSON.parse(await readFile(join(runDir, 'stats.json'), 'utf8')) as { nbd?: unknown; disks?: unknown };
      res.diskStats = { nbd: st.nbd, disks: st.disks };
    }
    const rows = parseOursCsv(await readFile(csv, 'utf8'));
    res.pairing = addOurs(times, rows);
  } else if (sec) {
    await sec.kill();
    addQemuSecondary(times, ptrace, sec.parseTrace());
  }
  for (let i = first; i < first + cfg.checkpoints; i++) {
    const t = times.get(i);
    if (t && t.transferMs !== undefined) res.checkpoints.push(t);
  }
}

/** The synthetic primary in this process (QEMU-exact bytes, calibrated workload model) into our receiver. */
async function syntheticCell(spec: CellSpec, cfg: CellConfig, runDir: string, res: CellResult): Promise<void> {
  if (spec.secondary !== 'ours') throw new Error("QEMU's secondary cannot load the synthetic primary's device state");
  const csv = join(runDir, 'checkpoints.csv');
  const recv = ReceiverChild.start(['--multifd-channels', String(spec.channels), '--stats-json', join(runDir, 'stats.json'),
    '--checkpoints-csv', csv], join(runDir, 'receiver.log'), cfg.receiverCli, cfg.receiverEnv);
  track(() => recv.kill());
  const port = await recv.port();
  const total = cfg.warmup + cfg.checkpoints;
  const started = new Map<number, number>();
  const times = new Map<number, CheckpointTimes>();
  const src = new SyntheticSource({
    port, layout: '7.2', channels: spec.channels, colo: true, checkpoints: total, workload: spec.workload,
    intervalMs: cfg.intervalMs, memory: { ramMiB: cfg.ramMiB }, seed: 7,
  });
  track(() => src.close());
  src.on('checkpointStart', (e: { index: number }) => { started.set(e.index, performance.now()); });
  let s0: ReturnType<typeof schedSnapshot> | undefined;
  src.on('checkpoint', (info: { index: number; dirtyPages: number }) => {
    if (info.index === cfg.warmup - 1) s0 = schedSnapshot(recv.pid);
    if (info.index === total - 1 && s0) res.sched = { secondary: schedUsage(s0, schedSnapshot(recv.pid), cfg.checkpoints) };
    const t0 = started.get(info.index);
    times.set(info.index, {
      index: info.index, dirtyPages: info.dirtyPages,
      ...(t0 !== undefined ? { primaryRequestToLoadedMs: performance.now() - t0 } : {}),
    });
    if ((info.index + 1) % 25 === 0) cfg.log(`  ${res.name}: ${info.index + 1} of ${total}`);
  });
  const tm = Date.now();
  src.once('precopy', () => { res.coloAfterMs = Date.now() - tm; });
  const r = await src.run();
  src.close();
  res.receiverExit = await recv.wait(60_000);
  if (r.checkpoints !== total) throw new Error(`synthetic primary committed ${r.checkpoints} of ${total}`);
  res.pairing = addOurs(times, parseOursCsv(await readFile(csv, 'utf8')));
  res.firstIndex = cfg.warmup;
  for (let i = cfg.warmup; i < total; i++) {
    const t = times.get(i);
    if (t && t.transferMs !== undefined) res.checkpoints.push(t);
  }
  await sleep(0);
}
