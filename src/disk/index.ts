// Replicated disks as a checkpoint participant: the NBD server and its PendingDisks, committed
// with every checkpoint of the migration they belong to.
import type { Logger } from '../log.js';
import { silentLogger } from '../log.js';
import type { CheckpointParticipant } from '../migration/participant.js';
import { NbdServer } from './nbd-server.js';
import { PendingDisk, type DiskCommitRecord } from './pending-disk.js';

export { NbdServer } from './nbd-server.js';
export { PendingDisk, DISK_BLOCK, type DiskCommitRecord, type PendingDiskOptions } from './pending-disk.js';
export type { CheckpointParticipant } from '../migration/participant.js';

export interface DiskSpec { name: string; path: string }

export interface DiskReplicationOptions {
  host: string;
  port: number;
  disks: DiskSpec[];
  maxPendingBytes?: number;
  commitMode?: 'async' | 'sync';
  ioTimeoutMs?: number;
  log?: Logger;
}

/** `NAME=PATH` (the --disk value). */
export function parseDiskSpec(s: string): DiskSpec {
  const m = /^([A-Za-z0-9._-]{1,255})=(.+)$/.exec(s);
  if (!m) throw new RangeError(`--disk must be NAME=PATH (NAME: letters, digits, . _ -), got "${s}"`);
  return { name: m[1]!, path: m[2]! };
}

function dist(xs: number[]): { n: number; mean: number; p50: number; p99: number; max: number } | null {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
  const r = (x: number) => Math.round(x * 1000) / 1000;
  return { n: s.length, mean: r(s.reduce((a, b) => a + b, 0) / s.length), p50: r(q(0.5)), p99: r(q(0.99)), max: r(s[s.length - 1]!) };
}

/** The NBD server and its disks, committed with each checkpoint (src/migration/participant.ts). */
export class DiskReplication implements CheckpointParticipant {
  readonly name = 'disks';
  readonly log: Logger;
  #ended: Promise<void> | null = null;

  private constructor(readonly server: NbdServer, readonly disks: PendingDisk[], log: Logger) { this.log = log; }

  static async start(o: DiskReplicationOptions): Promise<{ disks: DiskReplication; port: number }> {
    const log = o.log ?? silentLogger;
    const disks: PendingDisk[] = [];
    try {
      for (const d of o.disks) {
        disks.push(await PendingDisk.open({
          name: d.name, path: d.path, log,
          ...(o.maxPendingBytes !== undefined ? { maxPendingBytes: o.maxPendingBytes } : {}),
          ...(o.commitMode ? { commitMode: o.commitMode } : {}),
        }));
      }
      const server = new NbdServer({ host: o.host, port: o.port, disks, log, ...(o.ioTimeoutMs ? { ioTimeoutMs: o.ioTimeoutMs } : {}) });
      const port = await server.listen();
      return { disks: new DiskReplication(server, disks, log), port };
    } catch (e) {
      for (const d of disks) await d.close();
      throw e;
    }
  }

  /** Every disk is checked before any commits, so they never end on different checkpoints. */
  async commit(checkpoint: number): Promise<void> {
    for (const d of this.disks) d.check(checkpoint);
    for (const d of this.disks) await d.commit(checkpoint);
  }

  end(committed: number): Promise<void> {
    this.#ended ??= (async () => {
      await this.server.close();
      for (const d of this.disks) {
        await d.close();
        if (d.applyError) this.log.error({ disk: d.name, err: d.applyError }, 'disk image is NOT the committed checkpoint\'s (a write to it failed)');
        else if (d.committed !== committed && committed >= 0) this.log.error({ disk: d.name, checkpoint: committed }, `disk holds checkpoint ${d.committed}, RAM holds ${committed}`);
        else this.log.info({ disk: d.name, path: d.path, checkpoint: d.committed }, `disk ${d.name}: ${d.path} holds committed checkpoint ${d.committed}`);
      }
      this.log.info({ commands: this.server.commandCounts, options: this.server.options }, 'NBD requests received');
    })();
    return this.#ended;
  }

  summary(): Record<string, unknown> {
    return {
      nbd: { options: this.server.options, commands: this.server.commandCounts },
      disks: this.disks.map((d) => {
        const recs: DiskCommitRecord[] = d.records.filter((r) => r.checkpoint > 0);
        return {
          name: d.name, path: d.path, size: d.size, committedCheckpoint: d.committed, commitMode: d.mode,
          bytesPerCheckpoint: dist(recs.map((r) => r.bytes)),
          commitMs: dist(recs.map((r) => r.commitMs)),
          applyMs: dist(recs.flatMap((r) => (r.applyMs !== undefined ? [r.applyMs] : []))),
          syncMs: dist(recs.flatMap((r) => (r.syncMs !== undefined ? [r.syncMs] : []))),
          spilledBlocks: recs.reduce((s, r) => s + r.spilledBlocks, 0),
        };
      }),
    };
  }
}
