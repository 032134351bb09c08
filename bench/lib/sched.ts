// CPU time and run-queue wait per thread from /proc/<pid>/task/<tid>/schedstat, sampled at
// the start and end of a cell's measured window: on a shared 2-core machine this says whether a
// secondary was slow because it worked, or because it waited for a CPU.
import { readdirSync, readFileSync } from 'node:fs';

export interface ThreadSample { comm: string; runNs: number; waitNs: number; slices: number }
export type SchedSnapshot = Map<string, ThreadSample>;

export function schedSnapshot(pid: number): SchedSnapshot {
  const out: SchedSnapshot = new Map();
  let tids: string[];
  try { tids = readdirSync(`/proc/${pid}/task`); } catch { return out; }
  for (const tid of tids) {
    try {
      const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, 'utf8');
      let comm = stat.slice(stat.indexOf('(') + 1, stat.lastIndexOf(')'));
      if (tid === String(pid) && comm === 'node') comm = 'node main';   // Node names no other thread
      const [run, wait, slices] = readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').trim().split(/\s+/).map(Number);
      out.set(tid, { comm, runNs: run ?? 0, waitNs: wait ?? 0, slices: slices ?? 0 });
    } catch { /* thread gone */ }
  }
  return out;
}

export interface SchedUsage {
  /** CPU time per checkpoint, all threads, ms. */
  runMs: number;
  /** Time runnable but waiting for a CPU per checkpoint, all threads, ms. */
  waitMs: number;
  /** The busiest threads (per checkpoint). */
  threads: { comm: string; runMs: number; waitMs: number; slices: number }[];
}

/** Per-checkpoint usage between two snapshots over `checkpoints` checkpoints. */
export function schedUsage(a: SchedSnapshot, b: SchedSnapshot, checkpoints: number): SchedUsage {
  const n = Math.max(1, checkpoints);
  const threads: SchedUsage['threads'] = [];
  let run = 0, wait = 0;
  for (const [tid, e] of b) {
    const s = a.get(tid) ?? { comm: e.comm, runNs: 0, waitNs: 0, slices: 0 };
    const r = (e.runNs - s.runNs) / 1e6 / n, w = (e.waitNs - s.waitNs) / 1e6 / n;
    run += r;
    wait += w;
    threads.push({ comm: e.comm, runMs: r3(r), waitMs: r3(w), slices: r3((e.slices - s.slices) / n) });
  }
  threads.sort((x, y) => y.runMs + y.waitMs - (x.runMs + x.waitMs));
  return { runMs: r3(run), waitMs: r3(wait), threads: threads.filter((t) => t.runMs + t.waitMs >= 0.05).slice(0, 6) };
}

function r3(x: number): number { return Math.round(x * 1000) / 1000; }
