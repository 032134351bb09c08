// Real QEMU 7.2 (Debian, -accel tcg) migrates into `colo-receiver listen`; the received
// pc.ram must equal the stopped source's memory byte for byte (issue "Receive a real QEMU
// live migration"). Random data sits in guest RAM at two addresses through loader devices.
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import { haveQemu } from '../../src/harness/index.js';
import { precopyIntoReceiver } from '../helpers/qemu-precopy.js';

const skip = haveQemu() ? false : 'qemu-system-x86_64 not installed (apt-get install qemu-system-x86)';
const cleanups: (() => unknown)[] = [];
after(async () => { for (const c of cleanups.reverse()) await c(); });

const data = () => [randomBytes(3 * 1024 * 1024 + 4096), randomBytes(5 * 1024 * 1024)] as const;

describe('real QEMU 7.2 precopy into colo-receiver', { skip, timeout: 300_000 }, () => {
  test('plain migration: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('plain', ...data(), cleanups); });
  test('multifd with 4 channels: pc.ram equals the source byte for byte', async () => { await precopyIntoReceiver('mfd4', ...data(), cleanups, { channels: 4 }); });
});
