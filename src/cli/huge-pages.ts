import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';

/**
 * Transparent huge pages for guest memory without anything for the user to set.
 *
 * V8 allocates SharedArrayBuffer backing stores with calloc; glibc serves chunks this large
 * with mmap, and with the tunable glibc.malloc.hugetlb=1 (glibc 2.35+) it madvises them
 * MADV_HUGEPAGE, as QEMU does for guest RAM. On this kind of machine (nested hypervisor,
 * page sampling) 4 KiB mappings make a process holding a guest slow to wake:
 * bench/README.md measured CHECKPOINT_REQUEST -> REPLY 15-24 ms with 4 KiB pages, 3-4 ms
 * with the tunable. Tunables are read once at process start, so the CLI re-executes itself
 * once with it added. Node 20 has no execve, so the first process stays as a thin parent
 * that forwards signals and the exit status.
 */
const TUNABLE = 'glibc.malloc.hugetlb=1';
const MARK = 'COLO_RECEIVER_HUGEPAGES';
const PARENT = 'COLO_RECEIVER_PARENT';

/** THP mode of the kernel: 'always', 'madvise', 'never', or null when unknown. */
export function thpMode(): string | null {
  try {
    const m = /\[(\w+)\]/.exec(readFileSync('/sys/kernel/mm/transparent_hugepage/enabled', 'utf8'));
    return m ? m[1]! : null;
  } catch { return null; }
}

export type HugePagesDecision =
  | { reexec: true; env: NodeJS.ProcessEnv; thp: string }
  | { reexec: false; why: string };

export function hugePagesDecision(argv: string[], env: NodeJS.ProcessEnv = process.env): HugePagesDecision {
  if (argv.includes('--no-huge-pages')) return { reexec: false, why: '--no-huge-pages' };
  if (env[MARK] !== undefined) return { reexec: false, why: 'already re-executed' };
  if ((env.GLIBC_TUNABLES ?? '').includes('glibc.malloc.hugetlb')) return { reexec: false, why: 'GLIBC_TUNABLES sets glibc.malloc.hugetlb already' };
  if (process.platform !== 'linux') return { reexec: false, why: 'not Linux' };
  const thp = thpMode();
  if (thp !== 'always' && thp !== 'madvise') return { reexec: false, why: `transparent huge pages: ${thp ?? 'unavailable'}` };
  const tunables = env.GLIBC_TUNABLES ? `${env.GLIBC_TUNABLES}:${TUNABLE}` : TUNABLE;
  return { reexec: true, env: { ...env, GLIBC_TUNABLES: tunables, [MARK]: thp }, thp };
}

/** In the re-executed process: what to log once the logger exists. */
export function hugePagesState(argv: string[], env: NodeJS.ProcessEnv = process.env): Record<string, unknown> {
  if (env[MARK] !== undefined) return { hugePages: true, thp: env[MARK], tunables: env.GLIBC_TUNABLES };
  // Not re-executed: the decision's own reason says why (one place holds the rules).
  const d = hugePagesDecision(argv, env);
  if (d.reexec) return { hugePages: false, thp: d.thp };
  if (d.why.startsWith('GLIBC_TUNABLES')) return { hugePages: 'as GLIBC_TUNABLES says', tunables: env.GLIBC_TUNABLES };
  return { hugePages: false, why: d.why };
}

/** Runs this CLI again with the tunable; resolves with its exit code. */
export function reexecWithHugePages(env: NodeJS.ProcessEnv): Promise<number> {
  const child = spawn(process.execPath, [...process.execArgv, ...process.argv.slice(1)], { stdio: 'inherit', env: { ...env, [PARENT]: String(process.pid) } });
  const forward = (sig: NodeJS.Signals) => () => { child.kill(sig); };
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(sig, forward(sig));
  return new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      if (signal) { for (const s of ['SIGINT', 'SIGTERM', 'SIGHUP']) process.removeAllListeners(s); process.kill(process.pid, signal); }
      resolve(code ?? 1);
    });
  });
}

/**
 * In the child: end with the parent, even one killed by SIGKILL (a supervisor that kills the
 * pid it started must not leave a receiver behind). Reparenting shows in getppid(); checked
 * once a second on an unref'd timer, off every critical path.
 */
export function followParent(): void {
  const parent = Number(process.env[PARENT]);
  if (process.env[MARK] === undefined || !(parent > 0)) return;
  setInterval(() => { if (process.ppid !== parent) process.exit(129); }, 1000).unref();
}

/** AnonHugePages of this process, bytes (from /proc/self/smaps_rollup). */
export function anonHugePagesBytes(pid: number | 'self' = 'self'): number {
  try {
    const m = /AnonHugePages:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch { return 0; }
}
