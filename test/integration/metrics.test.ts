// --metrics: /metrics scraped during a COLO run from the synthetic primary (multifd-2) while the
// primary waits after a checkpoint, and once more at the end; every value is checked against
// the migration's own statistics and the --stats-json summary. /healthz: 503 before the image
// exists, 200 with phase / checkpoint / age during COLO.
import assert from 'node:assert/strict';
import { mkdtemp, readFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { receive } from '../../src/cli/receive.js';
import { durations, type CheckpointRecord } from '../../src/migration/checkpoint-stats.js';
import { parseMetricsAddress, type ReceiverMetrics } from '../../src/ops/metrics.js';
import { SyntheticSource } from '../../src/sender/source.js';
import { capturingLogger, plainAttempt } from '../helpers/tls-clients.js';

type Samples = Map<string, number>;

/** Prometheus text format -> `name{labels}` -> value (labels as printed). */
function parse(text: string): Samples {
  const m: Samples = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const i = line.lastIndexOf(' ');
    m.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  return m;
}

async function get(port: number, path: string): Promise<{ status: number; body: string }> {
  const r = await fetch(`http://127.0.0.1:${port}${path}`);
  return { status: r.status, body: await r.text() };
}

interface Summary {
  committedCheckpoint: number;
  channels: { channel: string; bytes: number; pages: number }[];
  checkpoints: { count: number };
}

function checkAgainst(s: Samples, m: ReceiverMetrics, summary: Summary, done: readonly CheckpointRecord[], at: string): void {
  const v = (k: string) => { const x = s.get(k); assert.ok(x !== undefined, `${at}: ${k} present`); return x; };
  assert.equal(v('colo_checkpoints_committed_total'), summary.checkpoints.count, `${at}: checkpoints committed`);
  assert.equal(v('colo_committed_checkpoint'), summary.committedCheckpoint, `${at}: committed checkpoint number`);
  for (const c of summary.channels) {
    assert.equal(v(`colo_channel_bytes_total{channel="${c.channel}"}`), c.bytes, `${at}: bytes of ${c.channel}`);
    assert.equal(v(`colo_channel_pages_total{channel="${c.channel}"}`), c.pages, `${at}: pages of ${c.channel}`);
  }
  assert.equal(done.length, summary.checkpoints.count, 'the stats window holds every checkpoint of this run');
  for (const what of ['transfer', 'blob', 'flush', 'pause'] as const) {
    assert.equal(v(`colo_checkpoint_${what}_seconds_count`), done.length, `${at}: ${what} observations`);
    const sum = done.reduce((a, c) => a + durations(c)[`${what}Ms`], 0) / 1000;
    assert.ok(Math.abs(v(`colo_checkpoint_${what}_seconds_sum`) - sum) < 1e-6, `${at}: ${what} sum ${v(`colo_checkpoint_${what}_seconds_sum`)} vs ${sum}`);
    assert.equal(v(`colo_checkpoint_${what}_seconds_bucket{le="+Inf"}`), done.length);
    // every bucket holds what it should: count the records at or below its bound
    for (const le of [0.0005, 0.005, 0.05, 0.5]) {
      const n = done.filter((c) => durations(c)[`${what}Ms`] / 1000 <= le).length;
      assert.equal(v(`colo_checkpoint_${what}_seconds_bucket{le="${le}"}`), n, `${at}: ${what} bucket ${le}`);
    }
  }
  assert.equal(v('colo_heartbeat_timeout_seconds'), m.mig.heartbeatMs / 1000, `${at}: heartbeat timeout`);
  assert.ok(v('colo_seconds_since_last_commit') >= 0);
}

describe('--metrics: Prometheus /metrics and /healthz', { timeout: 120_000 }, () => {
  test('address parsing: a bare port is loopback', () => {
    assert.deepEqual(parseMetricsAddress('9464'), { host: '127.0.0.1', port: 9464 });
    assert.deepEqual(parseMetricsAddress('0.0.0.0:9464'), { host: '0.0.0.0', port: 9464 });
    assert.deepEqual(parseMetricsAddress('[::1]:9464'), { host: '::1', port: 9464 });
    assert.throws(() => parseMetricsAddress('host:'), /HOST:PORT/);
  });

  test('scraped during a COLO run (synthetic primary, multifd-2): values equal the stats', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'colo-metrics-'));
    const { log } = capturingLogger();
    let metricsPort = 0;
    let metrics!: ReceiverMetrics;
    let migPort!: (p: number) => void;
    const listening = new Promise<number>((r) => { migPort = r; });
    const scrapes: { at: string; samples: Samples; summary: Summary; records: CheckpointRecord[]; health: { status: number; body: string } }[] = [];
    const scrape = async (at: string) => {
      const { status, body } = await get(metricsPort, '/metrics');
      assert.equal(status, 200);
      scrapes.push({ at, samples: parse(body), summary: metrics.mig.summary() as unknown as Summary, records: [...metrics.mig.stats.done], health: await get(metricsPort, '/healthz') });
    };
    const run = receive({
      host: '127.0.0.1', port: 0, threads: 2, multifdChannels: 2, log, heartbeatTimeoutMs: 'auto',
      statsJson: join(dir, 'stats.json'), metrics: { host: '127.0.0.1', port: 0 },
      onMetricsListening: (p, m) => { metricsPort = p; metrics = m; },
      onListening: (p) => migPort(p),
      onEnded: async () => { await scrape('end'); },
    });
    const port = await listening;
    const waiting = await get(metricsPort, '/healthz');
    assert.equal(waiting.status, 503, 'no image yet');
    assert.equal(JSON.parse(waiting.body).phase, 'waiting');
    assert.equal(parse((await get(metricsPort, '/metrics')).body).get('colo_phase{phase="waiting"}'), 1);
    await plainAttempt(port, Buffer.from('GET / HTTP/1.0\r\n\r\n'));   // refused: bad magic

    const src = new SyntheticSource({
      port, layout: '7.2', channels: 2, seed: 21, memory: { ramMiB: 32 }, colo: true, checkpoints: 12, intervalMs: 20,
      onCheckpoint: async (info) => { if (info.index === 5 || info.index === 9) await scrape(`checkpoint ${info.index + 1}`); },
    });
    await src.run();
    src.close();
    const res = await run;
    assert.equal(res.outcome.kind, 'primary-lost');
    assert.deepEqual(scrapes.map((s) => s.at), ['checkpoint 6', 'checkpoint 10', 'end']);

    for (const s of scrapes.slice(0, 2)) {
      checkAgainst(s.samples, metrics, s.summary, s.records, s.at);
      assert.equal(s.samples.get('colo_phase{phase="colo"}'), 1, `${s.at}: phase colo`);
      assert.equal(s.samples.get('colo_phase{phase="waiting"}'), 0);
      assert.equal(s.samples.get('colo_connections_refused_total{reason="bad-magic"}'), 1);
      assert.equal(s.health.status, 200);
      const h = JSON.parse(s.health.body) as { phase: string; committedCheckpoint: number; ageSeconds: number };
      assert.equal(h.phase, 'colo');
      assert.equal(h.committedCheckpoint, s.summary.committedCheckpoint);
      assert.ok(h.ageSeconds >= 0);
    }
    // the last scrape against the --stats-json file the receiver wrote
    const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as Summary;
    const end = scrapes[2]!;
    assert.deepEqual(end.summary.channels, stats.channels);
    checkAgainst(end.samples, metrics, stats, end.records, 'end');
    assert.equal(stats.checkpoints.count, 12);
    assert.equal(end.samples.get('colo_phase{phase="done"}'), 1, 'no --on-failover: done');
    assert.equal(end.samples.get('colo_errors_total{code="ERR_PEER"}') ?? end.samples.get('colo_errors_total{code="ERR_TRUNCATED"}') ?? 0, (res.outcome as { error?: unknown }).error ? 1 : 0);
    assert.equal(end.health.status, 200, 'the committed image stays usable after the primary is gone');
  });
});
