// A replicated disk for the COLO primary (README "Disks"): the guest's ext4 image behind a
// quorum, QEMU's replication driver over NBD to the receiver attached as its second child.
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import type { ColoPrimary } from './colo.js';

/** Default test disk: 512 MiB, sparse. */
export const DISK_BYTES = 512 << 20;
/** The guest's virtio-blk sits at the same PCI address on the primary and the failover destination. */
export const DISK_DEVICE = 'virtio-blk-pci,drive=colo-disk0,id=vblk0,addr=0x6';
/** The node name the primary's quorum and the receiver's export share. */
export const DISK_NAME = 'colo-disk0';

function run(cmd: string, args: string[]): { code: number; out: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw r.error;
  return { code: r.status ?? -1, out: `${r.stdout}${r.stderr}`.trim() };
}

/** True when mkfs.ext4 and e2fsck (e2fsprogs) can run. */
export function haveE2fsprogs(): boolean {
  return spawnSync('mkfs.ext4', ['-V']).status === 0 && spawnSync('e2fsck', ['-V']).status === 0;
}

/** A fresh sparse ext4 image: 4 KiB blocks, inode tables and journal written now (no lazy-init writes later). */
export function makeExt4Image(file: string, bytes = DISK_BYTES): void {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, bytes);
  const r = run('mkfs.ext4', ['-F', '-q', '-b', '4096', '-E', 'lazy_itable_init=0,lazy_journal_init=0', file]);
  if (r.code !== 0) throw new Error(`mkfs.ext4 ${file}: ${r.out}`);
}

/** e2fsck of a copy of `file` (journal replayed first, as a mount would): problem '' when clean. */
export function fsckProblem(file: string, scratch: string): { problem: string; report: string } {
  fs.copyFileSync(file, scratch);
  try {
    const a = run('e2fsck', ['-f', '-y', scratch]);
    const b = run('e2fsck', ['-f', '-n', scratch]);
    const report = `e2fsck -fy exit ${a.code}, then -fn exit ${b.code}`;
    // 0/1 on the first pass: clean, or only the journal replay and the free-block/inode summary
    // counters (ext4 does not keep them current on disk) corrected; the second pass must be clean.
    if ((a.code & ~1) !== 0 || b.code !== 0) return { problem: `${report}: ${a.out.slice(-800)} | ${b.out.slice(-800)}`, report };
    return { problem: '', report };
  } finally {
    fs.rmSync(scratch, { force: true });
  }
}

/** -drive/-device arguments of the primary: its image as quorum child 0 (README "Disks", step 1). */
export function primaryDiskArgs(image: string): string[] {
  return ['-drive', `if=none,id=${DISK_NAME},driver=quorum,read-pattern=fifo,vote-threshold=1,children.0.file.filename=${image},children.0.driver=raw`, '-device', DISK_DEVICE];
}

/**
 * README "Disks", steps 2 and 4 on a running primary: stop (QEMU drains and flushes its disks),
 * copy its image to the receiver's PATH, add the replication child (NBD client to the receiver)
 * to the quorum, continue. From here on every guest write reaches both.
 */
export async function attachReplication(primary: ColoPrimary, o: { primaryImage: string; receiverPath: string; nbdPort: number; host?: string }): Promise<void> {
  const q = await primary.qmp();
  await q.execute('stop');
  fs.copyFileSync(o.primaryImage, o.receiverPath);
  const out = await q.hmp(`drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,file.host=${o.host ?? '127.0.0.1'},file.port=${o.nbdPort},file.export=${DISK_NAME},node-name=replication0`);
  if (/error|fail/i.test(out)) throw new Error(`drive_add: ${out}`);
  await q.execute('x-blockdev-change', { parent: DISK_NAME, node: 'replication0' });
  await q.execute('cont');
}
