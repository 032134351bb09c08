// Prometheus metrics and a health endpoint for one receiver (one protected VM per process).
// Everything is read from the migration's events and getters: the data path pays nothing
// per page, a scrape costs a few object reads (never summary(), which sorts the window).
import { createServer, type Server } from 'node:http';
import { performance } from 'node:perf_hooks';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { Logger } from '../log.js';
import { durations, type CheckpointRecord } from '../migration/checkpoint-stats.js';
import type { IncomingMigration, Outcome } from '../migration/incoming.js';

/** What an operator needs to know about the receiver, coarser than IncomingMigration.phase. */
export type OpsPhase = 'waiting' | 'initial' | 'colo' | 'failover' | 'done';
export const OPS_PHASES: readonly OpsPhase[] = ['waiting', 'initial', 'colo', 'failover', 'done'];

// 0.5 ms .. 500 ms: a LAN checkpoint's transfer is a few ms, a loaded TCG one 10-100 ms; the
// flush of a quiet guest is sub-millisecond.
export const CHECKPOINT_BUCKETS_S = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5];

export interface MetricsAddress { host: string; port: number }

/** `HOST:PORT`, `[v6]:PORT` or a bare port (then loopback: metrics are not for the world by default). */
export function parseMetricsAddress(spec: string): MetricsAddress {
  const bare = /^\d+$/.exec(spec);
  const m = bare ? null : /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(spec);
  const port = Number(bare ? spec : m?.[2]);
  if ((!bare && !m) || !Number.isInteger(port) || port > 65535) throw new RangeError(`--metrics must be HOST:PORT or PORT, got "${spec}"`);
  return { host: bare ? '127.0.0.1' : m![1]!.replace(/^\[|\]$/g, ''), port };
}

export class ReceiverMetrics {
  readonly registry = new Registry();
  #phase: OpsPhase = 'waiting';
  #lastCommitAt = 0;
  #outcome: Outcome | null = null;
  readonly #refused: Counter<'reason'>;
  readonly #errors: Counter<'code'>;
  readonly #committed: Counter;
  readonly #hist: Record<'transfer' | 'blob' | 'flush' | 'pause', Histogram>;
  // per-channel totals are counters fed from the channels' own counts at scrape time
  readonly #seen = new Map<string, { bytes: number; pages: number }>();

  /** `failover`: an --on-failover action is configured, so a lost primary starts one. */
  constructor(readonly mig: IncomingMigration, readonly opts: { failover?: boolean } = {}) {
    const r = this.registry;
    this.#committed = new Counter({ name: 'colo_checkpoints_committed_total', help: 'COLO checkpoints committed (the initial migration not counted)', registers: [r] });
    new Gauge({
      name: 'colo_committed_checkpoint', help: 'Number of the checkpoint the image holds (0: the initial migration; -1: none yet)', registers: [r],
      collect() { this.set(mig.committedCheckpoint); },
    });
    const self = this;
    new Gauge({
      name: 'colo_seconds_since_last_commit', help: 'Seconds since the image last changed (initial migration or checkpoint commit); -1 before', registers: [r],
      collect() { this.set(self.ageSeconds()); },
    });
    const hist = (what: string, help: string) => new Histogram({ name: `colo_checkpoint_${what}_seconds`, help, buckets: CHECKPOINT_BUCKETS_S, registers: [r] });
    this.#hist = {
      transfer: hist('transfer', 'VMSTATE_SEND received -> RAM part loaded, every channel synced'),
      blob: hist('blob', 'RAM part loaded -> device-state blob complete'),
      flush: hist('flush', 'Copy of the dirty pages from the COLO cache into the committed image'),
      pause: hist('pause', 'CHECKPOINT_REQUEST received -> VMSTATE_LOADED sent (the primary VM is stopped at least this long)'),
    };
    const seen = this.#seen;
    // One collect for both, on the one registered (so scraped) first; each counter advances by
    // what the channel counted since the last scrape.
    let pages: Counter<'channel'> | null = null;
    new Counter({
      name: 'colo_channel_bytes_total', help: 'Page payload bytes received per channel (main, multifd/N)', labelNames: ['channel'], registers: [r],
      collect() {
        const t = mig.totals;
        let mb = t.bytes, mp = t.pages;
        const rows: [string, number, number][] = [];
        for (const c of mig.channels) { rows.push([c.name, c.bytes, c.pages]); mb -= c.bytes; mp -= c.pages; }
        rows.push(['main', mb, mp]);
        for (const [name, b, p] of rows) {
          const was = seen.get(name) ?? { bytes: 0, pages: 0 };
          this.inc({ channel: name }, Math.max(0, b - was.bytes));
          pages?.inc({ channel: name }, Math.max(0, p - was.pages));
          seen.set(name, { bytes: Math.max(b, was.bytes), pages: Math.max(p, was.pages) });
        }
      },
    });
    pages = new Counter({ name: 'colo_channel_pages_total', help: 'Pages received per channel (as channels[].pages in --stats-json)', labelNames: ['channel'], registers: [r] });
    this.#errors = new Counter({ name: 'colo_errors_total', help: 'Migration errors by code (ERR_*) that ended a migration or a COLO session', labelNames: ['code'], registers: [r] });
    this.#refused = new Counter({ name: 'colo_connections_refused_total', help: 'Connections refused or dropped before reaching the migration, by reason', labelNames: ['reason'], registers: [r] });
    new Gauge({
      name: 'colo_phase', help: 'Receiver phase: 1 for the current one (waiting, initial, colo, failover, done)', labelNames: ['phase'], registers: [r],
      collect() { for (const p of OPS_PHASES) this.set({ phase: p }, p === self.#phase ? 1 : 0); },
    });
    new Gauge({
      name: 'colo_heartbeat_timeout_seconds', help: 'Heartbeat timeout in force: no checkpoint for this long means the primary is lost (0: none)', registers: [r],
      collect() { this.set(mig.heartbeatMs / 1000); },
    });

    mig.on('checkpoint', (e: { initial: boolean; record?: CheckpointRecord }) => {
      this.#lastCommitAt = performance.now();
      if (e.initial) { this.#phase = 'colo'; return; }
      this.#committed.inc();
      if (e.record) {
        const d = durations(e.record);
        this.#hist.transfer.observe(d.transferMs / 1000);
        this.#hist.blob.observe(d.blobMs / 1000);
        this.#hist.flush.observe(d.flushMs / 1000);
        this.#hist.pause.observe(d.pauseMs / 1000);
      }
    });
    mig.on('end', (o: Outcome) => {
      this.#outcome = o;
      const err = o.kind === 'completed' ? undefined : o.error;
      if (err) this.#errors.inc({ code: err.code });
      // a precopy's image is complete now; COLO's last commit was the image already
      if (o.kind === 'completed') this.#lastCommitAt = performance.now();
      this.#phase = o.kind === 'primary-lost' && opts.failover && mig.committedCheckpoint >= 0 ? 'failover' : 'done';
    });
  }

  /** The listener handed the main channel over: the initial migration has begun. */
  accepted(kind: 'main' | 'multifd'): void { if (kind === 'main' && this.#phase === 'waiting') this.#phase = 'initial'; }
  refused(reason: string): void { this.#refused.inc({ reason }); }
  setPhase(p: OpsPhase): void { this.#phase = p; }
  get phase(): OpsPhase { return this.#phase; }

  ageSeconds(): number {
    return this.#lastCommitAt ? (performance.now() - this.#lastCommitAt) / 1000 : -1;
  }

  /**
   * Usable: there is a committed image a failover could resume (COLO after the initial
   * migration, during the failover, or a completed precopy), and it is not from a precopy
   * that failed (a partial image).
   */
  health(): { ok: boolean; body: Record<string, unknown> } {
    const committed = this.mig.committedCheckpoint;
    const failedPrecopy = this.#outcome?.kind === 'failed' && !this.mig.isColo;
    const ok = committed >= 0 && !failedPrecopy && this.#phase !== 'waiting' && this.#phase !== 'initial';
    const age = this.ageSeconds();
    return { ok, body: { phase: this.#phase, committedCheckpoint: committed, ageSeconds: age < 0 ? null : Math.round(age * 1000) / 1000, ...(this.#outcome ? { outcome: this.#outcome.kind } : {}) } };
  }
}

/** Serves /metrics and /healthz on `addr`; resolves with the server once listening. */
export async function serveMetrics(m: ReceiverMetrics, addr: MetricsAddress, log: Logger): Promise<Server> {
  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET' && req.method !== 'HEAD') { res.writeHead(405, { allow: 'GET, HEAD' }).end(); return; }
    if (path === '/metrics') {
      m.registry.metrics().then(
        (text) => { res.writeHead(200, { 'content-type': m.registry.contentType }).end(text); },
        (e: Error) => { log.error({ err: e }, 'metrics: collecting failed'); res.writeHead(500).end(); },
      );
    } else if (path === '/healthz') {
      const h = m.health();
      res.writeHead(h.ok ? 200 : 503, { 'content-type': 'application/json' }).end(JSON.stringify(h.body) + '\n');
    } else {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('/metrics or /healthz\n');
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(addr.port, addr.host, () => { server.off('error', reject); resolve(); });
  });
  // a scrape must never keep a finished receiver alive
  server.unref();
  const a = server.address();
  log.info({ host: addr.host, port: typeof a === 'object' && a ? a.port : addr.port }, 'metrics: serving /metrics and /healthz');
  return server;
}
