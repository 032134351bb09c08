import type { ImageBlock } from '../memory/ram-block.js';

/**
 * The VM as of the last complete checkpoint (spec §5.6): what a fresh QEMU is resumed from.
 * Blocks read live through the page table: read them only while no commit runs
 * (IncomingMigration.committedImage() waits for one in flight) or after the migration ended.
 */
export interface CommittedImage {
  /** 0 = the initial migration; n = the n-th COLO checkpoint. */
  checkpoint: number;
  machineType: string;
  /** The configuration record as received (0x07, name, subsections), or null if none came. */
  configuration: Buffer | null;
  /** Section id the source gave the `ram` section; reused when the image is replayed. */
  ramSectionId: number;
  blocks: ImageBlock[];
  /** Device sections (FULL, verbatim), without the trailing QEMU_VM_EOF. */
  deviceState: Buffer;
}

/** File name for a block in --dump-ram: every byte outside [A-Za-z0-9._-] becomes '_'. */
export function dumpFileName(idstr: string): string {
  return `${idstr.replace(/[^A-Za-z0-9._-]/g, '_')}.bin`;
}
