// node:tls stand-ins for a QEMU source with tls-creds, for the loopback TLS tests.
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import tls from 'node:tls';
import pino from 'pino';

export function capturingLogger(): { log: pino.Logger; lines: Record<string, unknown>[] } {
  const lines: Record<string, unknown>[] = [];
  const dest = new Writable({ write(chunk, _e, cb) { for (const l of String(chunk).split('\n')) if (l) lines.push(JSON.parse(l) as Record<string, unknown>); cb(); } });
  return { log: pino({ level: 'info' }, dest), lines };
}

/** tls.connect options from a directory in QEMU's client layout. */
export function clientOptions(dir: string): tls.ConnectionOptions {
  const f = (n: string) => join(dir, n);
  return {
    ca: readFileSync(f('ca-cert.pem')), servername: 'colo-receiver',
    ...(existsSync(f('client-cert.pem')) ? { cert: readFileSync(f('client-cert.pem')), key: readFileSync(f('client-key.pem')) } : {}),
  };
}

/**
 * A plaintext -> TLS proxy: the synthetic source (plain TCP) connects here and every one of
 * its connections becomes its own TLS session to the receiver, as QEMU runs one per channel.
 */
export async function tlsProxy(targetPort: number, opts: tls.ConnectionOptions): Promise<{ port: number; sessions: () => number; close: () => void }> {
  let sessions = 0;
  const open = new Set<net.Socket>();
  const srv = net.createServer({ noDelay: true }, (c) => {
    open.add(c);
    const t = tls.connect({ host: '127.0.0.1', port: targetPort, ...opts });
    t.setNoDelay(true);
    t.once('secureConnect', () => { sessions++; });
    c.pipe(t);
    t.pipe(c);
    const kill = () => { c.destroy(); t.destroy(); };
    c.on('error', kill);
    t.on('error', kill);
    c.on('close', () => { open.delete(c); });
    t.on('close', () => { if (!c.destroyed) c.end(); });
  });
  srv.listen(0, '127.0.0.1');
  await once(srv, 'listening');
  return { port: (srv.address() as net.AddressInfo).port, sessions: () => sessions, close: () => { srv.close(); for (const c of open) c.destroy(); } };
}

/** One TLS client connection that writes `bytes` and waits until the receiver closes it. */
export async function tlsAttempt(port: number, opts: tls.ConnectionOptions, bytes: Buffer = Buffer.alloc(0)): Promise<void> {
  const s = tls.connect({ host: '127.0.0.1', port, ...opts });
  s.on('error', () => undefined);
  s.once('secureConnect', () => { if (bytes.length) s.write(bytes); });
  // not once(): it rejects on 'error', and a refused client may well see one
  await new Promise((r) => s.once('close', r));
}

/** A plain TCP connection that writes `bytes` and waits until the receiver closes it. */
export async function plainAttempt(port: number, bytes: Buffer): Promise<void> {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => undefined);
  await once(s, 'connect');
  if (bytes.length) s.write(bytes);
  await new Promise((r) => s.once('close', r));
}
