// Locating/building the test guest (kernel + initramfs) and the TCG COLO shim.
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The colo-receiver project root (the directory with its package.json). */
export function projectRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pj = path.join(dir, 'package.json');
    if (fs.existsSync(pj)) {
      try {
        const name = (JSON.parse(fs.readFileSync(pj, 'utf8')) as { name?: string }).name;
        if (name === 'colo-receiver') return dir;
      } catch { /* keep looking */ }
    }
    const up = path.dirname(dir);
    if (up === dir) throw new Error('colo-receiver project root not found');
    dir = up;
  }
}

export interface GuestImage {
  kernel: string;
  initrd: string;
  /** Content of stamp.txt (recipe hash, package versions). */
  stamp: string;
}

function run(cmd: string, args: string[], timeoutMs: number): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, maxBuffer: 16 << 20, encoding: 'utf8' }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${path.basename(cmd)} failed: ${err.message}\n${stderr}`));
      else resolve({ stdout, stderr });
    });
  });
}

function resolveIn(root: string, p: string): string {
  return path.isAbsolute(p) ? p : path.join(root, p);
}

/**
 * Makes sure the guest exists in `dir` (relative paths are relative to the
 * project root) by running scripts/build-guest.sh, which skips the build when
 * the cached image matches its recipe. Needs apt-get/dpkg-deb (Debian host).
 */
export async function ensureGuest(dir = '.build/guest', opts: { timeoutMs?: number } = {}): Promise<GuestImage> {
  const root = projectRoot();
  const out = resolveIn(root, dir);
  await run(path.join(root, 'scripts', 'build-guest.sh'), [out], opts.timeoutMs ?? 15 * 60_000);
  const g = {
    kernel: path.join(out, 'vmlinuz'),
    initrd: path.join(out, 'initramfs.cpio.gz'),
    stamp: fs.readFileSync(path.join(out, 'stamp.txt'), 'utf8'),
  };
  for (const f of [g.kernel, g.initrd]) if (!fs.existsSync(f)) throw new Error(`guest build did not produce ${f}`);
  return g;
}

/** Builds native/colo-shim.c into `file` (relative to the project root) if stale; returns its absolute path. */
export async function ensureShim(file = '.build/colo-shim.so', opts: { timeoutMs?: number } = {}): Promise<string> {
  const root = projectRoot();
  const out = resolveIn(root, file);
  await run(path.join(root, 'scripts', 'build-shim.sh'), [out], opts.timeoutMs ?? 120_000);
  if (!fs.existsSync(out)) throw new Error(`shim build did not produce ${out}`);
  return out;
}
