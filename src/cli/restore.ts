import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { connect } from 'node:net';
import { once } from 'node:events';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { createLogger } from '../log.js';
import { parseTarget } from '../restore/image-stream.js';

/**
 * `colo-receiver restore --from PATH --to tcp:HOST:PORT`: sends an image saved with
 * `--on-failover save=PATH` to a waiting `qemu-system-x86_64 -incoming tcp:HOST:PORT`.
 */
export async function restoreCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({ args: argv, options: { from: { type: 'string' }, to: { type: 'string' }, help: { type: 'boolean', short: 'h' } }, strict: true });
  if (values.help || !values.from || !values.to) {
    process.stdout.write('usage: colo-receiver restore --from PATH --to tcp:HOST:PORT\n');
    return values.help ? 0 : 1;
  }
  const to = parseTarget(values.to);
  if (to.kind !== 'tcp') { process.stderr.write('colo-receiver: --to must be tcp:HOST:PORT\n'); return 1; }
  const log = createLogger();
  const size = (await stat(values.from)).size;
  const t0 = performance.now();
  const sock = connect({ host: to.host, port: to.port, noDelay: true });
  await once(sock, 'connect');
  const closed = once(sock, 'close');
  await pipeline(createReadStream(values.from), sock);
  await closed;
  log.info({ bytes: size, ms: Math.round(performance.now() - t0) }, `image ${values.from} delivered to ${values.to}`);
  return 0;
}
