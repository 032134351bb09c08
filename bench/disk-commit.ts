// npm run bench:disk [-- --mib 1,16,64 --reps 5 --pattern random|seq --dir DIR]
//
// What a checkpoint's disk writes cost the commit: N MiB of 4 KiB writes are put into a
// PendingDisk (as the NBD server does), then checkpoint k commits. Reported per size:
//   async commit  time inside the checkpoint pause (seal the epoch; PATH is written after)
//   apply         pwritev of the epoch into PATH, then fdatasync (after VMSTATE_LOADED, VM running)
//   sync commit   the same written + fdatasync'ed inside the pause (--disk-commit sync)
// PATH is a sparse file of 1 GiB in --dir (default: the OS temp dir; put it on the disk you
// will use: fdatasync cost is the device's).
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { DISK_BLOCK, PendingDisk } from '../src/disk/index.js';
import { printUsageAndExit } from './usage.js';

const { values: o } = parseArgs({
  options: {
    help: { type: 'boolean', short: 'h', default: false },
    mib: { type: 'string', default: '1,16,64' },
    reps: { type: 'string', default: '5' },
    pattern: { type: 'string', default: 'random' },
    dir: { type: 'string' },
    'max-pending': { type: 'string', default: String(256 << 20) },
  },
});
if (o.help) printUsageAndExit(import.meta.url);
const sizes = String(o.mib).split(',').map(Number);
const reps = Number(o.reps);
const IMAGE = 1 << 30;
const dir = mkdtempSync(join(String(o.dir ?? tmpdir()), 'disk-bench-'));
const path = join(dir, 'disk.img');
fs.closeSync(fs.openSync(path, 'w'));
fs.truncateSync(path, IMAGE);
const data = randomBytes(4 << 20);

function fill(d: PendingDisk, mib: number, rnd: () => number): void {
  const blocks = (mib << 20) / DISK_BLOCK;
  const slots = IMAGE / DISK_BLOCK;
  const start = Math.floor(rnd() * (slots - blocks));
  for (let i = 0; i < blocks; i++) {
    const b = o.pattern === 'seq' ? start + i : Math.floor(rnd() * slots);
    const at = (i * DISK_BLOCK) % data.length;
    d.write(b * DISK_BLOCK, data.subarray(at, at + DISK_BLOCK));
  }
}

function stats(xs: number[]): string {
  const s = [...xs].sort((a, b) => a - b);
  return `median ${s[s.length >> 1]!.toFixed(2)} ms, max ${s[s.length - 1]!.toFixed(2)} ms`;
}

let seed = 1;
const rnd = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 32; };
const rows: string[] = [];
try {
  for (const mib of sizes) {
    for (const mode of ['async', 'sync'] as const) {
      const d = await PendingDisk.open({ name: 'bench', path, commitMode: mode, maxPendingBytes: Number(o['max-pending']) });
      d.attach();
      const commit: number[] = [], apply: number[] = [], sync: number[] = [];
      for (let k = 0; k <= reps; k++) {
        fill(d, mib, rnd);
        await d.commit(k);
        await d.settle();
        const r = d.records[d.records.length - 1]!;
        if (k === 0) continue;                               // first round: page cache / file extents warm-up
        commit.push(r.commitMs); apply.push(r.applyMs ?? 0); sync.push(r.syncMs ?? 0);
      }
      await d.close();
      const line = `${String(mib).padStart(4)} MiB ${o.pattern} ${mode.padEnd(5)}  commit (in the pause) ${stats(commit)} | pwritev ${stats(apply)} | fdatasync ${stats(sync)}`;
      rows.push(line);
      console.log(line);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
