import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { createLogger } from '../log.js';
import { IncomingMigration } from '../migration/incoming.js';
import { listenForMigration } from '../net/listener.js';
import { SyntheticSource } from '../sender/source.js';
import { compareImage } from '../verify/compare.js';

/**
 * `colo-receiver demo`: the synthetic QEMU-exact primary migrates a guest into the receiver
 * over loopback, then checkpoints in COLO mode; after every checkpoint the committed image is
 * compared with the primary's memory byte for byte. Needs no QEMU.
 */
export async function demo(argv: string[]): Promise<number> {
  const { values: o } = parseArgs({
    args: argv, strict: true, options: {
      channels: { type: 'string', default: '4' },
      layout: { type: 'string', default: '7.2' },
      'ram-mib': { type: 'string', default: '256' },
      checkpoints: { type: 'string', default: '20' },
      workload: { type: 'string', default: 'load' },
      'interval-ms': { type: 'string', default: '0' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (o.help) {
    process.stdout.write('usage: colo-receiver demo [--channels N] [--layout 7.2|10.x] [--ram-mib N] [--checkpoints N] [--workload idle|load] [--interval-ms N]\n');
    return 0;
  }
  const channels = Number(o.channels), checkpoints = Number(o.checkpoints), ramMiB = Number(o['ram-mib']);
  if (!(channels >= 0 && channels <= 16) || !(checkpoints >= 0) || !(ramMiB >= 16) || !['7.2', '10.x'].includes(String(o.layout)) || !['idle', 'load'].includes(String(o.workload))) {
    process.stderr.write('colo-receiver demo: bad option (see --help)\n');
    return 1;
  }
  const log = createLogger(process.env.LOG_LEVEL ?? 'info');
  const mig = new IncomingMigration({ multifdChannels: channels, colo: true, log, heartbeatTimeoutMs: 0 });
  const server = await listenForMigration(mig, { port: 0, log });
  const port = (server.address() as { port: number }).port;
  log.info({ port, channels, layout: o.layout, ramMiB }, 'demo: synthetic primary -> receiver on loopback');
  let bad: string | null = null;
  let verified = 0;
  const src = new SyntheticSource({
    port, channels, layout: o.layout as '7.2' | '10.x', colo: true, checkpoints, workload: o.workload as 'idle' | 'load',
    intervalMs: Number(o['interval-ms']), memory: { ramMiB },
    onCheckpoint: async (info) => {
      // VMSTATE_LOADED has arrived: the receiver's committed image must be this checkpoint.
      const img = await mig.committedImage();
      const expected = new Map(info.model.blocks.map((b) => [b.idstr, b.host as Uint8Array]));
      const d = img ? compareImage(img, expected) : 'no committed image';
      if (d && !bad) bad = `checkpoint ${info.index + 1}: ${d}`;
      else verified++;
    },
  });
  const t0 = performance.now();
  await src.run();
  src.close();
  const outcome = await mig.done;
  server.close();
  const summary = mig.summary();
  await mig.pool.close();
  process.stdout.write(JSON.stringify({ ...summary, demo: { seconds: (performance.now() - t0) / 1000, checkpointsVerified: verified, mismatch: bad } }, null, 2) + '\n');
  if (bad) { log.error(`demo: committed image differs from the primary: ${bad}`); return 2; }
  log.info({ checkpoint: mig.committedCheckpoint }, `demo: ${verified} checkpoints verified byte for byte against the primary (${outcome.kind})`);
  return 0;
}
