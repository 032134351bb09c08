import { QEMU_VM_SECTION_FULL } from '../wire/constants.js';

/** globalstate's VMSTATE_BUFFER(runstate): 100 bytes, NUL-terminated RunState name. */
const RUNSTATE_LEN = 100;

/**
 * The runstate recorded in the device state's `globalstate` section, and where it sits.
 * A COLO checkpoint is saved with the primary stopped in RUN_STATE_COLO, so a fresh QEMU
 * loading it would stay stopped in "colo"; the precopy image says "running".
 */
export function findRunstate(dev: Buffer): { at: number; runstate: string } | null {
  const name = Buffer.from('\x0bglobalstate', 'latin1');
  for (let i = dev.indexOf(name); i >= 0; i = dev.indexOf(name, i + 1)) {
    // FULL header: 04, be32 section id, counted idstr, be32 instance, be32 version; then the body
    if (i < 5 || dev[i - 5] !== QEMU_VM_SECTION_FULL) continue;
    const body = i + name.length + 8;
    if (body + 4 + RUNSTATE_LEN > dev.length) return null;
    const size = dev.readUInt32BE(body);
    if (size < 1 || size > RUNSTATE_LEN) continue;
    const s = dev.toString('latin1', body + 4, body + 4 + size - 1);
    if (!/^[a-z-]+$/.test(s)) continue;
    return { at: body, runstate: s };
  }
  return null;
}

/**
 * Returns a copy of the device state whose globalstate says `runstate` (e.g. "running", so
 * the resumed QEMU starts the guest by itself as after any migration of a running VM).
 * Returns the input unchanged when there is no globalstate section.
 */
export function withRunstate(dev: Buffer, runstate: string): { dev: Buffer; was: string | null } {
  const f = findRunstate(dev);
  if (!f) return { dev, was: null };
  if (f.runstate === runstate) return { dev, was: f.runstate };
  const out = Buffer.from(dev);
  out.writeUInt32BE(runstate.length + 1, f.at);
  out.fill(0, f.at + 4, f.at + 4 + RUNSTATE_LEN);
  out.write(runstate, f.at + 4, 'latin1');
  return { dev: out, was: f.runstate };
}
