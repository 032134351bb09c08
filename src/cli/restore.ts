import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { performance } from 'node:perf_hooks';
import { pipeline } from 'node:stream/promises';
import { parseArgs } from 'node:util';
import { createLogger } from '../log.js';
import { describeTarget, openTarget, parseTarget } from '../restore/image-stream.js';
import { loadClientCreds, TlsCredsError } from '../net/tls.js';

const USAGE = 'usage: colo-receiver restore --from PATH --to tcp:HOST:PORT|tls+tcp:HOST:PORT [--tls-creds DIR] [--tls-hostname NAME]\n';

/**
 * `colo-receiver restore --from PATH --to [tls+]tcp:HOST:PORT`: sends an image saved with
 * `--on-failover save=PATH` to a waiting `qemu-system-x86_64 -incoming`. Over TLS we are the
 * client, as a migration source with tls-creds endpoint=client: --tls-creds DIR holds
 * ca-cert.pem (+ client-cert.pem, client-key.pem for a destination with verify-peer=on).
 */
export async function restoreCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv, strict: true,
    options: { from: { type: 'string' }, to: { type: 'string' }, 'tls-creds': { type: 'string' }, 'tls-hostname': { type: 'string' }, help: { type: 'boolean', short: 'h' } },
  });
  if (values.help || !values.from || !values.to) {
    process.stdout.write(USAGE);
    return values.help ? 0 : 1;
  }
  let to;
  try { to = parseTarget(values.to); } catch (e) { process.stderr.write(`colo-receiver: ${(e as Error).message}\n`); return 1; }
  if (to.kind !== 'tcp') { process.stderr.write('colo-receiver: --to must be tcp:HOST:PORT or tls+tcp:HOST:PORT\n'); return 1; }
  if (Boolean(to.secure) !== (values['tls-creds'] !== undefined)) {
    process.stderr.write('colo-receiver: tls+tcp: and --tls-creds go together\n');
    return 1;
  }
  if (values['tls-creds'] !== undefined) {
    try { to.tls = await loadClientCreds(values['tls-creds'], values['tls-hostname']); } catch (e) {
      if (e instanceof TlsCredsError) { process.stderr.write(`colo-receiver: ${e.message}\n`); return 1; }
      throw e;
    }
  }
  const log = createLogger();
  const size = (await stat(values.from)).size;
  const t0 = performance.now();
  const sock = await openTarget(to);
  // QEMU closes the incoming connection once it has loaded the stream: then it holds the VM
  const closed = new Promise((r) => sock.once('close', r));
  await pipeline(createReadStream(values.from), sock);
  await closed;
  log.info({ bytes: size, ms: Math.round(performance.now() - t0) }, `image ${values.from} delivered to ${describeTarget(to)}`);
  return 0;
}
