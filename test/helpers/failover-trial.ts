// One failover trial with real QEMU (7.2, or o.binary such as the COLO-patched 10.0.2): a COLO primary (multifd, TCG, the shim, the test
// guest with an upload workload and a serial heartbeat) checkpoints into `colo-receiver
// listen --on-failover resume=tcp:...`; a fresh `qemu-system-x86_64 -incoming tcp:...` waits.
// The primary is SIGKILLed at a chosen kind of moment (between checkpoints, during the RAM part
// of a checkpoint, around VMSTATE_SIZE / the device-state blob). Then: the receiver must exit 0
// having migrated the committed checkpoint into the destination, the destination must run
// the guest on from that checkpoint (heartbeat continues, no reboot, no oops), and every file
// the guest confirmed well before the committed checkpoint must read back intact from the
// resumed guest.
//
// Shared by test/qemu/failover.test.ts (3 trials) and scripts/failover-trials.mjs (N trials).
import { once } from 'node:events';
import fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import {
  attachReplication, DISK_DEVICE, ensureGuest, freePort, fsckProblem, makeExt4Image, primaryDiskArgs, guestShell, nowMs, parsePrimaryTrace, QemuProcess, startColoPrimary,
  UploadWorkload, type ColoPrimary, type GuestImage, type PrimaryCheckpoint, type UploadedFile,
} from '../../src/harness/index.js';
import { ReceiverProcess } from './receiver-process.js';

/** Where in the checkpoint cycle the primary is killed. */
export type KillMoment = 'between' | 'ram' | 'blob';
export const KILL_MOMENTS: readonly KillMoment[] = ['between', 'ram', 'blob'];

export interface TrialOptions {
  moment: KillMoment;
  /** multifd channels on both sides (default 4). */
  channels?: number;
  /** Bytes per uploaded file (default 3 MiB). */
  fileBytes?: number;
  /** Upload rate target, MB/s (default 30). */
  rateMBps?: number;
  /** x-checkpoint-delay (default 600 ms). */
  checkpointDelayMs?: number;
  /** Checkpoints completed before the kill is armed (default 5 + random 0..2). */
  minCheckpoints?: number;
  /** HB lines the destination must print after resuming (default 4). */
  hbLines?: number;
  /** Random source in [0, 1) (default Math.random). */
  random?: () => number;
  /** Keep the run directory even when the trial is intact. */
  keepDir?: boolean;
  /** Progress messages. */
  log?: (msg: string) => void;
  /** Extra environment for the receiver (e.g. COLO_READER_THREADS=1). */
  receiverEnv?: Record<string, string>;
  guest?: GuestImage;
  /** QEMU binary for the primary and the destination (default qemuBinary(): 7.2 or $QEMU). */
  binary?: string;
  /**
   * Everything over TLS: the primary as a QEMU TLS client, the receiver with --tls-creds, and
   * the destination waiting with `-incoming defer` + tls-creds endpoint=server (verify-peer on),
   * into which the receiver migrates as a TLS client (resume=tls+tcp:, --resume-tls-creds).
   */
  tls?: { serverDir: string; clientDir: string; clientDn: string };
  /**
   * Give the VM a replicated disk (README "Disks"): the primary's ext4 image behind a quorum
   * with the replication/NBD child to the receiver (`--nbd`/`--disk`), uploads stored on it and
   * synced; the destination resumes with the receiver's PATH. Extra checks: files read back
   * with the guest's page cache dropped (from the disk), and e2fsck of the committed image.
   */
  disk?: boolean;
}

export interface FileCheck {
  index: number;
  remotePath: string;
  checkpointAtFinish: number;
  sha256: string;
  got?: string;
  ok: boolean;
}

export interface TrialResult {
  moment: KillMoment;
  dir: string;
  /** How the kill was triggered, e.g. "4.1 ms after Send 'vmstate-send' (checkpoint 7)". */
  trigger: string;
  /** What the primary's trace says it was doing when it died. */
  primaryPhase: string;
  /** Checkpoints the primary saw loaded (VMSTATE_LOADED received) before it died. */
  primaryLoaded: number;
  /** The receiver's own words ("COLO ended; ..."). */
  receiverSaid: string;
  /** Checkpoint the receiver discarded (in flight at the kill), or null. */
  discarded: number | null;
  /** multifd packets read whole by reader threads (stats-json channels). */
  threadPackets?: number;
  /** Committed checkpoint (stats-json failover.checkpoint). */
  committed: number;
  receiverExit: number | null;
  /** Receiver's failover time: decision -> destination closed the stream (stats-json failover.ms). */
  deliveredMs: number | null;
  failoverBytes: number | null;
  /** SIGKILL of the primary -> destination query-status "running". */
  failoverToRunningMs: number | null;
  /** SIGKILL -> the receiver's "COLO ended" line / its "failover: resuming" line (log timestamps, ms). */
  detectMs: number | null;
  streamStartMs: number | null;
  destStatus: string | null;
  hb: { primaryLast: number | null; destFirst: number | null; destLast: number | null; destLines: number; gaps: number };
  files: { uploaded: number; confirmed: number; eligible: number; verified: number; failed: FileCheck[]; laterPresent: number; laterChecked: number };
  /** Failed checks; empty = resumed intact. */
  problems: string[];
  /**
   * Receiver-side inconsistencies that do not affect the resumed guest (e.g. its "COLO ended"
   * line naming another checkpoint than the one it then delivered). Reported, not failed.
   */
  anomalies: string[];
  intact: boolean;
  totalMs: number;
  /** disk trials: NBD commands the receiver got from QEMU, by type; e2fsck of PATH after the trial. */
  nbd?: { commands: Record<string, Record<string, number>>; options: Record<string, number>; commitMs?: unknown; applyMs?: unknown; bytesPerCheckpoint?: unknown };
  fsck?: string;
}

const BAD_KERNEL_RE = /Oops|BUG:|Kernel panic|general protection/;
const HB_RE = /HB (\d+)/g;

function guestAppend(disk = false): string {
  // colo.keep=0: the guest keeps every uploaded file, so all confirmed ones can be read back.
  return `console=ttyS0 init_on_free=1 colo.keep=0${disk ? ' colo.sink=disk' : ''}`;
}

function hbNumbers(serial: string): number[] {
  return [...serial.matchAll(HB_RE)].map((m) => Number(m[1]));
}

function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** What the primary was doing at `tKill`, from its trace (written until it died). */
function describePrimaryPhase(cps: PrimaryCheckpoint[], tKill: number): string {
  const last = cps[cps.length - 1];
  if (!last) return 'before the first checkpoint';
  const ago = (t: number) => `${(tKill - t).toFixed(1)} ms before the kill`;
  if (last.complete) return `between checkpoints: checkpoint ${last.index + 1} loaded ${ago(last.loadedAt!)}`;
  const n = last.index + 1;
  const steps: [string, number | undefined][] = [
    ['vmstate-loaded not received', undefined],
    ['vmstate-received', last.receivedAt], ['vmstate-size sent', last.vmstateSizeAt],
    ['vmstate-send sent', last.vmstateSendAt], ['checkpoint-reply received', last.replyAt],
    ['checkpoint-request sent', last.requestAt],
  ];
  for (const [what, t] of steps.slice(1)) {
    if (t !== undefined) {
      const more = what === 'vmstate-send sent' ? ' (RAM part in flight)' : what === 'vmstate-size sent' ? ' (blob in flight)' : '';
      return `in checkpoint ${n}: last ${what} ${ago(t)}${more}`;
    }
  }
  return `in checkpoint ${n}`;
}

const KILL_WORKER = `
const { parentPort, workerData: w } = require('node:worker_threads');
const fs = require('node:fs');
const cell = new Int32Array(new SharedArrayBuffer(4));
const nap = (ms) => Atomics.wait(cell, 0, 0, ms);
const now = () => performance.timeOrigin + performance.now();
const alive = () => { try { process.kill(w.pid, 0); return true; } catch { return false; } };
const fd = fs.openSync(w.file, 'r');
const buf = Buffer.alloc(1 << 20);
let off = w.offset, tail = '';
const deadline = now() + w.timeoutMs;
let seenAt = 0;
while (!seenAt) {
  const n = fs.readSync(fd, buf, 0, buf.length, off);
  if (n > 0) {
    off += n;
    const text = tail + buf.toString('latin1', 0, n);
    const nl = text.lastIndexOf('\\n');
    tail = nl >= 0 ? text.slice(nl + 1) : text;
    if (nl >= 0 && text.slice(0, nl).includes(w.needle)) { seenAt = now(); break; }
    if (n === buf.length) continue;
  }
  if (now() > deadline || !alive()) { parentPort.postMessage({ error: alive() ? 'timeout' : 'process gone' }); process.exit(0); }
  nap(0.5);
}
for (let left = seenAt + w.delayMs - now(); left > 0; left = seenAt + w.delayMs - now()) nap(Math.min(left, 2));
process.kill(w.pid, 'SIGKILL');
const killAt = now();
parentPort.postMessage({ seenAt, killAt });
`;

/**
 * SIGKILLs `pid` `delayMs` after `needle` appears in a new line of the trace `file` (lines
 * present now do not count). Runs in a worker thread polling every 0.5 ms.
 */
export async function killOnTrace(o: { file: string; needle: string; delayMs: number; pid: number; timeoutMs: number }): Promise<{ seenAt: number; killAt: number }> {
  let offset = 0;
  try {
    const cur = fs.readFileSync(o.file);
    offset = cur.lastIndexOf(0x0a) + 1;
  } catch { /* not there yet */ }
  const w = new Worker(KILL_WORKER, { eval: true, workerData: { ...o, offset } });
  try {
    const [msg] = await once(w, 'message') as [{ seenAt?: number; killAt?: number; error?: string }];
    if (msg.error || msg.seenAt === undefined || msg.killAt === undefined) throw new Error(`kill trigger: ${o.needle}: ${msg.error ?? 'no answer'}`);
    return { seenAt: msg.seenAt, killAt: msg.killAt };
  } finally {
    await w.terminate();
  }
}

/** The NBD port the receiver bound (its 'NBD server listening' log line). */
async function nbdPort(recv: ReceiverProcess): Promise<number> {
  await recv.port();
  return until('the receiver\'s NBD port', 10_000, 20, () => {
    const l = recv.lines.find((x) => x.msg === 'NBD server listening');
    return l ? Number(l.port) : undefined;
  });
}

/** sha256 of several guest files in one shell round trip: path -> hex (missing files absent). */
async function guestSha256(shellPort: number, paths: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  for (let i = 0; i < paths.length; i += 16) {
    const group = paths.slice(i, i + 16);
    for (const p of group) if (!/^[A-Za-z0-9_./-]+$/.test(p)) throw new Error(`unsafe guest path ${p}`);
    const text = await guestShell(shellPort, `sha256sum ${group.join(' ')} 2>&1`, { timeoutMs: 120_000 });
    for (const m of text.matchAll(/^([0-9a-f]{64})\s+(\S+)\s*$/gm)) out.set(m[2]!, m[1]!);
  }
  return out;
}

/** Sleeps in small steps until `pred` returns a value, or throws after `timeoutMs`. */
async function until<T>(what: string, timeoutMs: number, stepMs: number, pred: () => T | undefined | Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await pred();
    if (v !== undefined) return v;
    if (Date.now() > deadline) throw new Error(`timeout (${timeoutMs} ms) waiting for ${what}`);
    await sleep(stepMs);
  }
}

/**
 * Runs one trial. Never throws for a failed check (those go into `problems`); throws only
 * when the setup itself fails (QEMU does not boot, COLO does not start).
 */
export async function runFailoverTrial(o: TrialOptions): Promise<TrialResult> {
  const t0 = Date.now();
  const rnd = o.random ?? Math.random;
  const log = o.log ?? (() => undefined);
  const channels = o.channels ?? 4;
  const delayMs = o.checkpointDelayMs ?? 600;
  const guest = o.guest ?? await ensureGuest();
  const dir = await mkdtemp(join(tmpdir(), `colo-failover-${o.moment}-`));
  const problems: string[] = [];
  const anomalies: string[] = [];
  const cleanups: (() => unknown)[] = [];
  let recvRef: ReceiverProcess | undefined;
  const res: TrialResult = {
    moment: o.moment, dir, trigger: '', primaryPhase: '', primaryLoaded: 0, receiverSaid: '', discarded: null,
    committed: -1, receiverExit: null, deliveredMs: null, failoverBytes: null, failoverToRunningMs: null, detectMs: null, streamStartMs: null, destStatus: null,
    hb: { primaryLast: null, destFirst: null, destLast: null, destLines: 0, gaps: 0 },
    files: { uploaded: 0, confirmed: 0, eligible: 0, verified: 0, failed: [], laterPresent: 0, laterChecked: 0 },
    problems, anomalies, intact: false, totalMs: 0,
  };
  try {
    // --- destination: a fresh QEMU with the primary's machine options, waiting for the image
    const destPort = await freePort();
    const destShell = await freePort();
    // disk: PATH is the receiver's image; snapshot=on keeps the destination's own writes out of
    // it, so after the trial PATH is still exactly what the receiver committed (checked by e2fsck).
    const primaryImg = join(dir, 'primary-disk.img');
    const diskPath = join(dir, 'receiver-disk.img');
    // PATH exists from the start (the destination opens it now, the receiver at its start);
    // its content is set again while the primary is stopped, just before replication begins.
    if (o.disk) { makeExt4Image(primaryImg); fs.copyFileSync(primaryImg, diskPath); }
    const dest = QemuProcess.start({
      runDir: dir, role: 'destination', cpu: 'qemu64', memMiB: 512,
      kernel: guest.kernel, initrd: guest.initrd, append: guestAppend(o.disk),
      netdevs: [`user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:${destShell}-:5001`],
      devices: ['virtio-net-pci,netdev=n0,romfile=', ...(o.disk ? [DISK_DEVICE] : [])],
      ...(o.binary ? { binary: o.binary } : {}),
      incoming: o.tls ? 'defer' : `tcp:127.0.0.1:${destPort}`,
      extra: [
        ...(o.tls ? ['-object', `tls-creds-x509,id=tls0,dir=${o.tls.serverDir},endpoint=server,verify-peer=on`] : []),
        ...(o.disk ? ['-drive', `if=none,id=colo-disk0,driver=raw,file=${diskPath},snapshot=on`] : []),
      ],
    });
    cleanups.push(() => dest.kill());
    const dq = await dest.qmp();
    if (o.tls) {
      await dq.execute('migrate-set-parameters', { 'tls-creds': 'tls0' });
      await dq.execute('migrate-incoming', { uri: `tcp:127.0.0.1:${destPort}` });
    }

    // --- receiver
    const statsPath = join(dir, 'stats.json');
    const recv = ReceiverProcess.start([
      '--multifd-channels', String(channels), '--on-failover', `resume=${o.tls ? 'tls+' : ''}tcp:127.0.0.1:${destPort}`, '--stats-json', statsPath,
      ...(o.tls ? ['--tls-creds', o.tls.serverDir, '--tls-authz', o.tls.clientDn.replace(/,/g, ',,'), '--resume-tls-creds', o.tls.clientDir] : []),
      ...(o.disk ? ['--nbd', '127.0.0.1:0', '--disk', `colo-disk0=${diskPath}`] : []),
    ], o.receiverEnv ?? {});
    recvRef = recv;
    cleanups.push(() => recv.kill());
    const port = await recv.port();

    // --- primary, COLO, upload workload
    const primary: ColoPrimary = await startColoPrimary({
      guest, runDir: dir, memMiB: 512, checkpointDelayMs: delayMs, nodelay: true, append: o.disk ? 'colo.keep=0 colo.sink=disk' : 'colo.keep=0',
      ...(channels ? { multifd: { channels } } : {}),
      ...(o.binary ? { binary: o.binary } : {}),
      extraArgs: [
        ...(o.tls ? ['-object', `tls-creds-x509,id=tls0,dir=${o.tls.clientDir},endpoint=client,verify-peer=on`] : []),
        ...(o.disk ? primaryDiskArgs(primaryImg) : []),
      ],
    });
    cleanups.push(() => primary.kill());
    if (o.disk) {
      if (/mount \/dev\/vda failed/.test(primary.proc.readSerial())) throw new Error('setup: the guest could not mount its disk');
      await attachReplication(primary, { primaryImage: primaryImg, receiverPath: diskPath, nbdPort: await nbdPort(recv) });
      log('disk: primary stopped, image copied, replication child attached over NBD, VM continued');
    }
    await primary.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'max-bandwidth': 10_000_000_000, ...(o.tls ? { 'tls-creds': 'tls0', 'tls-hostname': 'colo-receiver' } : {}) } });
    await primary.waitColo(120_000);
    const upload = new UploadWorkload({
      // disk: every file is synced through virtio-blk + quorum + NBD under TCG: slower
      port: primary.uploadPort, rateMBps: o.rateMBps ?? (o.disk ? 6 : 30), fileBytes: o.fileBytes ?? (o.disk ? 1 << 20 : 3 << 20),
      checkpointCount: () => primary.checkpointCount(),
      // the workload's per-file ack timer is not cleared on stop(): keep it short so the
      // process can exit soon after the last trial (acks take well under a second here)
      ackTimeoutMs: 8000,
    }).start();
    cleanups.push(() => upload.stop({ waitAcks: false }));
    const minCp = o.minCheckpoints ?? 5 + Math.floor(rnd() * 3);
    const whyNot = () => {
      if (recv.child.exitCode !== null) {
        const err = recv.lines.find((l) => Number(l.level) >= 40);
        return `receiver exited (${recv.child.exitCode}) during COLO: ${err ? String(err.msg) + ' ' + JSON.stringify(err.err ?? {}).slice(0, 600) : recv.stderr.slice(-800)}`;
      }
      if (!primary.proc.alive) return `primary exited: ${primary.proc.stderrTail()}`;
      if (!dest.alive) return `destination exited: ${dest.stderrTail()}`;
      return undefined;
    };
    // enough checkpoints, and a few files confirmed early enough to be checked after any kill
    const oldFiles = () => upload.completed().filter((f) => f.checkpointAtFinish !== undefined && f.checkpointAtFinish + 2 <= primary.checkpointCount()).length;
    await until(`${minCp} checkpoints and 3 files confirmed 2 checkpoints ago`, 90_000, 50, () => {
      const why = whyNot();
      if (why) throw new Error(`setup: ${why} (after ${primary.checkpointCount()} checkpoints; run dir ${dir})`);
      return primary.checkpointCount() >= minCp && oldFiles() >= 3 ? true : undefined;
    }).catch((e: Error) => {
      throw new Error(`${e.message}; ${upload.completed().length} files confirmed, upload errors: ${[...new Set(upload.errors.map((x) => x.message).concat(upload.files.filter((f) => f.error).map((f) => f.error!)))].slice(0, 3).join(' / ')}`);
    });
    log(`${o.moment}: ${primary.checkpointCount()} checkpoints, ${upload.completed().length} files confirmed; arming the kill`);

    // --- the kill: a worker thread tails the trace and sends SIGKILL, so the moment does not
    // depend on this thread's event loop (upload workload, QMP) being free
    const history = parsePrimaryTrace(primary.proc.readTrace()).checkpoints.filter((c) => c.complete);
    const sendToSize = median(history.map((c) => c.sendToSizeMs).filter((x): x is number => x !== undefined));
    const cpMs = median(history.map((c) => c.requestToLoadedMs).filter((x): x is number => x !== undefined));
    const blob = median(history.map((c) => (c.receivedAt !== undefined && c.vmstateSizeAt !== undefined ? c.receivedAt - c.vmstateSizeAt : undefined))
      .filter((x): x is number => x !== undefined));
    const haveSize = history.some((c) => c.vmstateSizeAt !== undefined);
    const ram = Number.isFinite(sendToSize) ? sendToSize : 20;
    let needle: string;
    let waitMs: number;
    let why: string;
    if (o.moment === 'between') {
      const gap = Math.max(40, delayMs - (Number.isFinite(cpMs) ? cpMs : 150));
      needle = "Receive 'vmstate-loaded'";
      waitMs = gap * (0.1 + 0.7 * rnd());
      why = `checkpoints take ~${(Number.isFinite(cpMs) ? cpMs : NaN).toFixed(0)} ms, so the gap is ~${gap.toFixed(0)} ms`;
    } else if (o.moment === 'ram') {
      needle = "Send 'vmstate-send'";
      waitMs = ram * 0.5 * rnd();
      why = `RAM part usually ${ram.toFixed(0)} ms`;
    } else if (haveSize) {
      // VMSTATE_SIZE is traced once its header is flushed; the size value and the blob follow,
      // then the receiver answers VMSTATE_RECEIVED. Kill anywhere in that window (or just past it).
      const win = Number.isFinite(blob) ? blob : 20;
      needle = "Send 'vmstate-size'";
      waitMs = rnd() < 0.4 ? 2 * rnd() : 1.1 * win * rnd();
      why = `VMSTATE_SIZE -> VMSTATE_RECEIVED usually ${win.toFixed(0)} ms`;
    } else {
      needle = "Send 'vmstate-send'";
      waitMs = ram * (0.9 + 0.2 * rnd());
      why = `no vmstate-size in the trace; RAM part usually ${ram.toFixed(0)} ms`;
    }
    const killed = await killOnTrace({ file: primary.proc.tracePath!, needle, delayMs: waitMs, pid: primary.proc.pid, timeoutMs: 30_000 });
    const tKill = killed.killAt;
    await primary.kill();
    res.trigger = `${(killed.killAt - killed.seenAt).toFixed(1)} ms after ${needle} was seen (aimed ${waitMs.toFixed(1)} ms; ${why})`;

    // --- failover: poll the destination until it runs
    const running = until('destination query-status "running"', 60_000, 5, async () => {
      if (!dest.alive) throw new Error(`destination QEMU exited during the failover: ${dest.stderrTail()}`);
      const s = await dq.execute<{ status: string }>('query-status', undefined, { timeoutMs: 5000 });
      return s.status === 'running' ? nowMs() : undefined;
    });
    const uploaded = await upload.stop({ waitAcks: false });
    try {
      res.failoverToRunningMs = (await running) - tKill;
    } catch (e) {
      problems.push(`destination not running: ${(e as Error).message}`);
    }
    res.receiverExit = await recv.wait(60_000);
    if (res.receiverExit !== 0) problems.push(`receiver exit ${res.receiverExit}: ${recv.stderr.slice(-1500)}`);

    // --- what the primary was doing, what the receiver says
    const ptrace = parsePrimaryTrace(primary.proc.readTrace());
    res.primaryLoaded = ptrace.checkpoints.filter((c) => c.complete).length;
    res.primaryPhase = describePrimaryPhase(ptrace.checkpoints, tKill);
    const ended = recv.lines.find((l) => typeof l.msg === 'string' && l.msg.startsWith('COLO ended'));
    res.receiverSaid = ended ? String(ended.msg) : '(no "COLO ended" line)';
    if (ended && typeof ended.time === 'number') res.detectMs = ended.time - tKill;
    const resuming = recv.lines.find((l) => typeof l.msg === 'string' && l.msg.startsWith('failover: resuming'));
    if (resuming && typeof resuming.time === 'number') res.streamStartMs = resuming.time - tKill;
    const dm = /checkpoint (\d+) discarded/.exec(res.receiverSaid);
    res.discarded = dm ? Number(dm[1]) : null;
    const errors = recv.lines.filter((l) => Number(l.level) >= 50);
    if (errors.length) problems.push(`receiver error lines: ${JSON.stringify(errors).slice(0, 1000)}`);
    let stats: { committedCheckpoint?: number; failover?: { ms: number; bytes: number; checkpoint: number }; channels?: { channel: string; packets?: number; threadPackets?: number }[] } = {};
    try {
      stats = JSON.parse(await readFile(statsPath, 'utf8')) as typeof stats;
    } catch (e) {
      problems.push(`stats-json not readable: ${(e as Error).message}`);
    }
    res.threadPackets = (stats.channels ?? []).reduce((n, c) => n + (c.threadPackets ?? 0), 0);
    if (stats.failover) {
      res.committed = stats.failover.checkpoint;
      res.deliveredMs = stats.failover.ms;
      res.failoverBytes = stats.failover.bytes;
      if (stats.committedCheckpoint !== stats.failover.checkpoint) {
        anomalies.push(`stats-json committedCheckpoint ${stats.committedCheckpoint} != failover.checkpoint ${stats.failover.checkpoint}`);
      }
    } else {
      problems.push('stats-json has no failover field');
      res.committed = stats.committedCheckpoint ?? -1;
    }
    const held = /holding committed checkpoint (\d+)/.exec(res.receiverSaid);
    if (!held || Number(held[1]) !== res.committed) {
      anomalies.push(`receiver logged "${res.receiverSaid}" but delivered checkpoint ${res.committed} (stats-json failover.checkpoint)`);
    }
    // The primary got VMSTATE_LOADED for checkpoint k only after the receiver committed it.
    if (res.committed < res.primaryLoaded) problems.push(`committed checkpoint ${res.committed} < ${res.primaryLoaded} checkpoints the primary saw loaded`);
    if (res.committed > res.primaryLoaded + 1) problems.push(`committed checkpoint ${res.committed} > primary's ${res.primaryLoaded} + 1`);

    // --- the resumed guest: heartbeat continues, no reboot, no oops
    const pSerial = primary.proc.readSerial();
    const pHb = hbNumbers(pSerial);
    res.hb.primaryLast = pHb.length ? pHb[pHb.length - 1]! : null;
    const want = o.hbLines ?? 4;
    if (dest.alive) {
      try {
        await until(`${want} HB lines on the destination's serial`, 20_000, 100, () => (hbNumbers(dest.readSerial()).length >= want ? true : undefined));
      } catch (e) {
        problems.push((e as Error).message);
      }
    }
    const dSerial = dest.readSerial();
    const dHb = hbNumbers(dSerial);
    res.hb.destLines = dHb.length;
    res.hb.destFirst = dHb[0] ?? null;
    res.hb.destLast = dHb.length ? dHb[dHb.length - 1]! : null;
    for (let i = 1; i < dHb.length; i++) {
      if (dHb[i]! <= dHb[i - 1]!) problems.push(`destination HB not increasing: ${dHb[i - 1]} then ${dHb[i]}`);
      else if (dHb[i]! !== dHb[i - 1]! + 1) res.hb.gaps++;
    }
    if (res.hb.destFirst === null) problems.push('no HB line on the destination');
    else {
      if (res.hb.destFirst <= 0) problems.push(`destination HB starts at ${res.hb.destFirst} (guest restarted?)`);
      if (res.hb.primaryLast === null || res.hb.destFirst > res.hb.primaryLast + 1) {
        problems.push(`destination HB ${res.hb.destFirst} is ahead of the primary's last HB ${res.hb.primaryLast}`);
      }
    }
    if (/COLO-GUEST-READY/.test(dSerial)) problems.push('destination serial shows COLO-GUEST-READY: the guest rebooted');
    const bad = BAD_KERNEL_RE.exec(dSerial);
    if (bad) problems.push(`destination serial: "${dSerial.slice(Math.max(0, bad.index - 100), bad.index + 300)}"`);

    // --- files confirmed well before the committed checkpoint read back intact
    const confirmed = uploaded.filter((f): f is UploadedFile & { remotePath: string; checkpointAtFinish: number } =>
      f.ok && f.remotePath !== undefined && f.checkpointAtFinish !== undefined);
    res.files.uploaded = uploaded.length;
    res.files.confirmed = confirmed.length;
    // confirmed while checkpoint c was the last one loaded -> in checkpoint c+1's snapshot; one more as margin
    const eligible = confirmed.filter((f) => f.checkpointAtFinish + 1 < res.committed);
    const later = confirmed.filter((f) => f.checkpointAtFinish + 1 >= res.committed);
    res.files.eligible = eligible.length;
    if (eligible.length === 0) problems.push(`no uploaded file old enough to check (confirmed ${confirmed.length}, committed checkpoint ${res.committed})`);
    if (dest.alive && res.failoverToRunningMs !== null) {
      try {
        // disk: read from the disk, not from the page cache the checkpoint's RAM carries
        if (o.disk) await guestShell(destShell, 'sync; echo 3 > /proc/sys/vm/drop_caches', { timeoutMs: 60_000 });
        const sums = await guestSha256(destShell, [...eligible, ...later].map((f) => f.remotePath));
        for (const f of eligible) {
          const got = sums.get(f.remotePath);
          const ok = got === f.sha256;
          if (ok) res.files.verified++;
          else res.files.failed.push({ index: f.index, remotePath: f.remotePath, checkpointAtFinish: f.checkpointAtFinish, sha256: f.sha256, ...(got ? { got } : {}), ok });
        }
        res.files.laterChecked = later.length;
        res.files.laterPresent = later.filter((f) => sums.get(f.remotePath) === f.sha256).length;
      } catch (e) {
        problems.push(`reading files back from the resumed guest: ${(e as Error).message}`);
      }
      for (const f of res.files.failed) {
        problems.push(`file ${f.remotePath} (confirmed at checkpoint ${f.checkpointAtFinish}) ${f.got ? `has sha256 ${f.got.slice(0, 12)}.. instead of ${f.sha256.slice(0, 12)}..` : 'missing in the resumed guest'}`);
      }
    } else if (eligible.length) {
      problems.push('files not checked: destination not running');
    }

    // --- still running after all that
    if (dest.alive) {
      try {
        res.destStatus = (await dq.execute<{ status: string }>('query-status', undefined, { timeoutMs: 10_000 })).status;
      } catch (e) {
        problems.push(`query-status on the destination: ${(e as Error).message}`);
      }
    }
    if (res.destStatus !== 'running') problems.push(`destination status ${res.destStatus ?? '(exited: ' + dest.stderrTail() + ')'}`);
    const destErr = dest.stderrTail();
    if (/error|failed/i.test(destErr)) problems.push(`destination QEMU stderr: ${destErr}`);
    if (o.disk) {
      const ds = (stats as { nbd?: TrialResult['nbd']; disks?: { commitMs?: unknown; applyMs?: unknown; bytesPerCheckpoint?: unknown }[] });
      if (ds.nbd) res.nbd = { ...ds.nbd, commitMs: ds.disks?.[0]?.commitMs, applyMs: ds.disks?.[0]?.applyMs, bytesPerCheckpoint: ds.disks?.[0]?.bytesPerCheckpoint };
      if (/EXT4-fs error|EXT4-fs \(vda\): error/.test(dest.readSerial())) problems.push('destination serial shows an ext4 error');
      await dest.kill();
      const f = fsckProblem(diskPath, join(dir, 'fsck-copy.img'));
      res.fsck = f.report;
      if (f.problem) problems.push(`committed disk image: ${f.problem}`);
    }
  } finally {
    if (recvRef) fs.writeFileSync(join(dir, 'receiver.log'), recvRef.stderr);
    for (const c of cleanups.reverse()) {
      try { await c(); } catch { /* best effort */ }
    }
  }
  res.intact = problems.length === 0;
  res.totalMs = Date.now() - t0;
  if (res.intact && !res.anomalies.length && !o.keepDir) await rm(dir, { recursive: true, force: true }).catch(() => undefined);
  return res;
}

/** One line per trial for logs and diagnostics. */
export function describeTrial(r: TrialResult): string {
  const f = r.files;
  return [
    `kill ${r.moment}: ${r.trigger}`,
    `primary: ${r.primaryPhase}`,
    `receiver: "${r.receiverSaid}"`,
    `committed ${r.committed}${r.discarded !== null ? ` (discarded ${r.discarded})` : ''}`,
    `files verified ${f.verified}/${f.eligible} (confirmed ${f.confirmed}, later ones present ${f.laterPresent}/${f.laterChecked})`,
    `HB primary last ${r.hb.primaryLast}, destination ${r.hb.destFirst}..${r.hb.destLast}`,
    `failover: detected ${r.detectMs?.toFixed(0) ?? '-'} ms, streaming from ${r.streamStartMs?.toFixed(0) ?? '-'} ms, delivered ${r.deliveredMs?.toFixed(0) ?? '-'} ms (${((r.failoverBytes ?? 0) / 1e6).toFixed(0)} MB), running at ${r.failoverToRunningMs?.toFixed(0) ?? '-'} ms after the SIGKILL`,
    ...(r.nbd ? [`disk: NBD ${JSON.stringify(r.nbd.commands)}, commit ms ${JSON.stringify(r.nbd.commitMs)}, apply ms ${JSON.stringify(r.nbd.applyMs)}, ${r.fsck}`] : []),
    `${r.intact ? 'INTACT' : 'NOT INTACT: ' + r.problems.join('; ')}${r.anomalies.length ? ' | RECEIVER ANOMALY: ' + r.anomalies.join('; ') : ''}`,
  ].join(' | ');
}
