import { createWriteStream, type WriteStream } from 'node:fs';
import { mkdir, writeFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import type { Server } from 'node:net';
import type { Logger } from '../log.js';
import { CheckpointStats, type CheckpointRecord } from '../migration/checkpoint-stats.js';
import { IncomingMigration, type IncomingOptions, type Outcome } from '../migration/incoming.js';
import { dumpFileName, type CommittedImage } from '../migration/committed-image.js';
import { DEFAULT_IDENTIFY_TIMEOUT_MS, listenForMigration } from '../net/listener.js';
import { runFailover, type FailoverAction } from '../restore/failover.js';
import type { TlsServerConfig } from '../net/tls.js';
import { ReceiverMetrics, serveMetrics, type MetricsAddress } from '../ops/metrics.js';
import { DiskReplication, type DiskReplicationOptions } from '../disk/index.js';
import { performance } from 'node:perf_hooks';
import { TARGET_PAGE_SIZE } from '../wire/constants.js';

export interface ReceiveOptions extends IncomingOptions {
  host: string;
  port: number;
  allow?: string[];
  dumpRam?: string | undefined;
  statsJson?: string | undefined;
  checkpointsCsv?: string | undefined;
  progress?: boolean;
  /** Connections still identifying themselves at once (--max-unidentified). */
  maxUnidentified?: number;
  log: Logger;
  /** Called with the bound port once listening (tests and the demo use port 0). */
  onListening?: (port: number) => void;
  /** COLO: what to do with the committed image when the primary is lost (--on-failover). */
  onFailover?: FailoverAction | undefined;
  /** Serve every channel as a TLS server session (--tls-creds). */
  tls?: TlsServerConfig | undefined;
  /** Serve /metrics and /healthz here (--metrics). */
  metrics?: MetricsAddress | undefined;
  /** Called with the metrics server's bound port (tests use port 0). */
  onMetricsListening?: (port: number, metrics: ReceiverMetrics) => void;
  /** Replicated disks: NBD server + export per disk, committed with each checkpoint (src/disk). */
  disks?: Omit<DiskReplicationOptions, 'log' | 'ioTimeoutMs'>;
  /** Called with the bound NBD port (tests use port 0). */
  onNbdListening?: (port: number) => void;
  /** Called after the migration ended, with the committed image still readable (failover). */
  onEnded?: (mig: IncomingMigration, outcome: Outcome) => Promise<void>;
}

export interface ReceiveResult { outcome: Outcome; summary: Record<string, unknown>; mig: IncomingMigration; failover?: { ms: number; bytes: number; checkpoint: number } }

/** Writes each RAMBlock of the image to DIR/<idstr>.bin and the device state to DIR/device-state.bin. */
export async function dumpImage(img: CommittedImage, dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const b of img.blocks) {
    const fh = await open(join(dir, dumpFileName(b.idstr)), 'w');
    try {
      // Zero pages have no slot: the file is sized first and only pages with a slot are
      // written, in runs of up to 16 MiB (sparse where the filesystem allows).
      await fh.truncate(b.usedLength);
      const buf = Buffer.allocUnsafe(16 << 20);
      let runStart = -1, runLen = 0;
      const flush = async () => {
        if (runLen > 0) await fh.write(buf, 0, runLen, runStart);
        runStart = -1; runLen = 0;
      };
      for (let p = 0; p < b.pages; p++) {
        const v = b.page(p);
        if (!v) { await flush(); continue; }
        if (runStart < 0) runStart = p * TARGET_PAGE_SIZE;
        buf.set(v, runLen);
        runLen += TARGET_PAGE_SIZE;
        if (runLen === buf.length) await flush();
      }
      await flush();
    } finally {
      await fh.close();
    }
  }
  await writeFile(join(dir, 'device-state.bin'), img.deviceState);
}

/** Runs one incoming migration end to end: listen, receive, report, dump. */
export async function receive(opts: ReceiveOptions): Promise<ReceiveResult> {
  const log = opts.log;
  // The NBD server comes up first: the primary's drive_add connects before it migrates.
  let disks: DiskReplication | null = null;
  if (opts.disks) {
    const d = await DiskReplication.start({ ...opts.disks, log, ...(opts.ioTimeoutMs ? { ioTimeoutMs: opts.ioTimeoutMs } : {}) });
    disks = d.disks;
    opts.onNbdListening?.(d.port);
  }
  const mig = new IncomingMigration({ ...opts, log, ...(disks ? { participants: [disks] } : {}) });
  let server: Server | null = null;
  let metricsServer: Server | null = null;
  let timer: NodeJS.Timeout | null = null;
  try {
    const metrics = opts.metrics ? new ReceiverMetrics(mig, { failover: opts.onFailover !== undefined }) : null;
    if (metrics && opts.metrics) {
      metricsServer = await serveMetrics(metrics, opts.metrics, log);
      const a = metricsServer.address();
      opts.onMetricsListening?.(typeof a === 'object' && a ? a.port : opts.metrics.port, metrics);
    }
    server = await listenForMigration(mig, {
      host: opts.host, port: opts.port, allow: opts.allow ?? [], log,
      identifyTimeoutMs: opts.ioTimeoutMs ?? DEFAULT_IDENTIFY_TIMEOUT_MS,
      ...(opts.maxUnidentified !== undefined ? { maxUnidentified: opts.maxUnidentified } : {}),
      tls: opts.tls,
      ...(metrics ? { onRefused: (reason: string) => metrics.refused(reason), onAccepted: (kind: 'main' | 'multifd') => metrics.accepted(kind) } : {}),
    });
    const addr = server.address();
    const port = typeof addr === 'object' && addr ? addr.port : opts.port;
    log.info({ host: opts.host, port, pid: process.pid, ...(opts.tls ? { tls: opts.tls.dir, verifyPeer: opts.tls.verifyPeer, authz: opts.tls.authz } : {}) }, 'waiting for an incoming migration');
    opts.onListening?.(port);
    if (opts.progress) {
      timer = setInterval(() => {
        // totals, not summary(): that sorts the checkpoint window's distributions on the main thread
        const s = mig.totals;
        process.stderr.write(`\r${mig.phase}  ${(s.bytes / 1e6).toFixed(1)} MB  pages ${s.pages}  checkpoint ${mig.committedCheckpoint}   `);
      }, 500);
      timer.unref();
    }
    let endedAt = 0;
    mig.once('end', () => { endedAt = performance.now(); });
    // One row per committed checkpoint as it happens: the stats keep only a window, and a
    // long session's CSV must not wait for (or be lost with) the end.
    let csv: WriteStream | null = null;
    let csvChannels = 0;
    if (opts.checkpointsCsv) {
      const file = createWriteStream(opts.checkpointsCsv);
      csv = file;
      file.on('error', (e) => { log.error({ err: e, file: opts.checkpointsCsv }, 'cannot write the checkpoints CSV'); csv = null; });
      mig.on('checkpoint', (e: { initial: boolean; record?: CheckpointRecord }) => {
        if (e.initial || !e.record || !csv) return;
        if (csvChannels === 0) { csvChannels = e.record.channelBytes.length; csv.write(CheckpointStats.csvHeader(csvChannels) + '\n'); }
        csv.write(CheckpointStats.csvRow(e.record, csvChannels) + '\n');
      });
    }
    const outcome = await mig.done;
    if (timer) { clearInterval(timer); process.stderr.write('\n'); }
    server.close();
    const summary = mig.summary();
    // mig.done resolved after the disks settled: PATH is the committed checkpoint's disk now.
    if (disks) Object.assign(summary, disks.summary());
    if (opts.onEnded) await opts.onEnded(mig, outcome);
    const img = await mig.committedImage();
    let failover: ReceiveResult['failover'];
    if (opts.onFailover && img && outcome.kind === 'primary-lost') {
      const total = img.blocks.reduce((s2, b) => s2 + b.usedLength, 0);
      const progress = opts.progress ? (n: number) => process.stderr.write(`\rfailover: ${(n / 1e6).toFixed(0)} MB of ~${(total / 1e6).toFixed(0)} MB  `) : undefined;
      metrics?.setPhase('failover');
      const r = await runFailover(img, opts.onFailover, log, endedAt || performance.now(), progress).finally(() => metrics?.setPhase('done'));
      if (progress) process.stderr.write('\n');
      failover = { ...r, checkpoint: img.checkpoint };
      summary.failover = failover;
    }
    if (opts.dumpRam && img && outcome.kind !== 'failed' ) {
      await dumpImage(img, opts.dumpRam);
      log.info({ checkpoint: img.checkpoint, dir: opts.dumpRam }, 'committed image written');
    } else if (opts.dumpRam && img && mig.isColo) {
      // A protocol violation in COLO still leaves a valid committed checkpoint: keep it.
      await dumpImage(img, opts.dumpRam);
      log.info({ checkpoint: img.checkpoint, dir: opts.dumpRam }, 'committed image written');
    }
    if (opts.statsJson) await writeFile(opts.statsJson, JSON.stringify(summary, null, 2) + '\n');
    if (csv) {
      const file: WriteStream = csv;
      if (csvChannels === 0) file.write(CheckpointStats.csvHeader(1 + mig.channels.length) + '\n');
      await new Promise<void>((r) => { file.end(r); });
    }
    return { outcome, summary, mig, ...(failover ? { failover } : {}) };
  } finally {
    if (timer) clearInterval(timer);
    server?.close();
    await disks?.end(mig.committedCheckpoint);
    metricsServer?.close();
    await mig.pool.close().catch(() => undefined);
  }
}
