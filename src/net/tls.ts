// TLS the way QEMU's migration does it: x509 credentials from a directory in QEMU's layout
// (tls-creds-x509 dir=...), one TLS session per TCP connection (main and every multifd
// channel), client certificates verified against the CA unless verify-peer is off, and an
// optional list of allowed client distinguished names (QEMU's tls-authz with authz-list).
import { readFile, access } from 'node:fs/promises';
import { constants as cryptoConstants, X509Certificate } from 'node:crypto';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { checkServerIdentity, connect as tlsConnect, createSecureContext, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { once } from 'node:events';

/** A problem with the credentials themselves (missing file, bad PEM): a usage error at startup. */
export class TlsCredsError extends Error {
  override name = 'TlsCredsError';
}

export interface TlsServerConfig {
  dir: string;
  /** The PEMs; checked once at load (createSecureContext), used for a tls.Server per connection. */
  pem: { ca: Buffer; cert: Buffer; key: Buffer };
  /** QEMU verify-peer=on: a client certificate signed by the CA is required. */
  verifyPeer: boolean;
  /** Allowed client DNs in QEMU's form; null: any client the CA vouches for. */
  authz: string[] | null;
}

export interface TlsClientCreds {
  dir: string;
  ca: Buffer;
  cert?: Buffer;
  key?: Buffer;
  /** Name the server certificate must carry (QEMU's tls-hostname); default: the target host. */
  hostname?: string;
}

async function need(dir: string, name: string): Promise<Buffer> {
  try {
    return await readFile(join(dir, name));
  } catch (e) {
    throw new TlsCredsError(`TLS credentials: cannot read ${join(dir, name)}: ${(e as Error).message}`);
  }
}

async function optional(dir: string, name: string): Promise<Buffer | undefined> {
  try { await access(join(dir, name)); } catch { return undefined; }
  return need(dir, name);
}

/**
 * Server side of QEMU's layout: ca-cert.pem, server-cert.pem, server-key.pem. dh-params.pem
 * is ignored: OpenSSL negotiates (EC)DHE groups itself, and TLS 1.3 has no DH parameters.
 */
export async function loadServerCreds(dir: string, o: { verifyPeer?: boolean; authz?: string[] | null } = {}): Promise<TlsServerConfig> {
  // One after the other: the error names the first missing file in QEMU's order, every time.
  const ca = await need(dir, 'ca-cert.pem');
  const cert = await need(dir, 'server-cert.pem');
  const key = await need(dir, 'server-key.pem');
  try {
    createSecureContext({ ca, cert, key });
  } catch (e) {
    throw new TlsCredsError(`TLS credentials in ${dir}: ${(e as Error).message}`);
  }
  const authz = o.authz && o.authz.length > 0 ? o.authz : null;
  const verifyPeer = o.verifyPeer ?? true;
  // QEMU checks authz only on a verified peer certificate; a DN list without verification would be a false promise
  if (authz && !verifyPeer) throw new TlsCredsError('--tls-authz needs the client certificate verified (drop --tls-no-verify-peer)');
  return { dir, pem: { ca, cert, key }, verifyPeer, authz };
}

/**
 * Client side of QEMU's layout (the receiver acting as a migration source on failover):
 * ca-cert.pem, and client-cert.pem + client-key.pem when the destination verifies peers.
 */
export async function loadClientCreds(dir: string, hostname?: string): Promise<TlsClientCreds> {
  const [ca, cert, key] = await Promise.all([need(dir, 'ca-cert.pem'), optional(dir, 'client-cert.pem'), optional(dir, 'client-key.pem')]);
  if ((cert === undefined) !== (key === undefined)) throw new TlsCredsError(`TLS credentials in ${dir}: client-cert.pem and client-key.pem go together`);
  return { dir, ca, ...(cert ? { cert } : {}), ...(key ? { key } : {}), ...(hostname ? { hostname } : {}) };
}

// OpenSSL's short names where gnutls (QEMU) prints another one.
const GNUTLS_NAMES: Record<string, string> = { emailAddress: 'EMAIL' };

/**
 * The subject DN as QEMU compares it with tls-authz: gnutls_x509_crt_get_dn, i.e. RDNs in
 * the order the certificate encodes them, "TYPE=value" joined by "," without spaces, RFC 4514
 * escapes. Node's X509Certificate.subject is that order one RDN per line, already escaped.
 */
export function qemuDn(cert: X509Certificate): string {
  return cert.subject.split('\n').filter(Boolean).map((rdn) => {
    const eq = rdn.indexOf('=');
    const type = rdn.slice(0, eq);
    return `${GNUTLS_NAMES[type] ?? type}${rdn.slice(eq)}`;
  }).join(',');
}

/**
 * `--tls-authz` values. A DN contains commas, so a list uses QEMU's own escape for its
 * -object options: a comma inside a DN is doubled ("CN=a,,O=b,CN=c,,O=d" is two DNs). The
 * option may also be repeated.
 */
export function parseAuthzList(values: string[]): string[] {
  const out: string[] = [];
  for (const v of values) {
    for (const part of v.split(/(?<!,),(?!,)/)) {
      const dn = part.replace(/,,/g, ',').trim();
      if (!dn) continue;
      if (!dn.split(',').every((rdn) => /^[A-Za-z][A-Za-z0-9.-]*=/.test(rdn))) throw new RangeError(`--tls-authz: "${dn}" is not a DN of TYPE=value parts (double a comma inside one DN: CN=a,,O=b)`);
      out.push(dn);
    }
  }
  return out;
}

export type TlsRefusalReason =
  | 'tls-plaintext'          // the peer spoke something other than TLS (a QEMU without tls-creds)
  | 'tls-handshake'          // the handshake failed for another reason (alert, protocol, cipher)
  | 'tls-handshake-timeout'  // no complete handshake within the identify timeout
  | 'tls-no-client-cert'     // verify-peer: the client sent no certificate
  | 'tls-untrusted-cert'     // verify-peer: the certificate does not chain to our CA (or is expired)
  | 'tls-authz-denied';      // the client DN is not in --tls-authz

export type TlsAcceptResult =
  | { ok: true; sock: TLSSocket; dn: string | null; protocol: string | null }
  | { ok: false; reason: TlsRefusalReason; detail: string; dn?: string };

// OpenSSL's verdicts when the first bytes are no TLS record at all ("QEVM", a MultiFDInit, HTTP).
const NOT_TLS = new Set(['ERR_SSL_WRONG_VERSION_NUMBER', 'ERR_SSL_HTTP_REQUEST', 'ERR_SSL_HTTPS_PROXY_REQUEST', 'ERR_SSL_UNKNOWN_PROTOCOL', 'ERR_SSL_PACKET_LENGTH_TOO_LONG', 'ERR_SSL_RECORD_LAYER_FAILURE', 'ERR_SSL_UNEXPECTED_RECORD']);

/**
 * Runs the server side of one TLS session on an accepted TCP connection and checks the peer
 * as QEMU's qcrypto_tls_session_check_credentials does. The certificate is verified after the
 * handshake (requestCert on, rejectUnauthorized off), as QEMU does with gnutls: the refusal
 * then carries a reason (no certificate / untrusted / DN) instead of an anonymous alert.
 * The connection is handed to a tls.Server of its own ('connection'), the documented way to
 * get node's verdict (authorized / authorizationError) for a socket accepted elsewhere; the
 * context is built from PEMs already parsed, a millisecond per channel. Never throws; the
 * caller closes the connection on refusal.
 */
export async function acceptTls(raw: Socket, cfg: TlsServerConfig, timeoutMs: number): Promise<TlsAcceptResult> {
  const srv = createTlsServer({
    ...cfg.pem, requestCert: cfg.verifyPeer, rejectUnauthorized: false,
    // TLS 1.2 at most, without tickets. Under TLS 1.3 OpenSSL sends NewSessionTicket records
    // after the handshake (node cannot set their number to 0); a QEMU source never reads its
    // migration channels (precopy has no return path, multifd never reads), so they sit
    // unread there, and when QEMU closes the socket its kernel answers with a reset that
    // discards stream bytes we have not read yet. Seen with 7.2: ECONNRESET on the main
    // channel at 147 KB of a completed migration. TLS 1.2 sends nothing after Finished.
    maxVersion: 'TLSv1.2', secureOptions: cryptoConstants.SSL_OP_NO_TICKET,
    // our own timer below decides; node's default (120 s) only as a backstop when ours is off
    handshakeTimeout: timeoutMs > 0 ? timeoutMs + 1000 : 120_000,
  });
  let timer: NodeJS.Timeout | null = null;
  const outcome = await new Promise<TLSSocket | 'timeout' | Error>((resolve) => {
    srv.once('secureConnection', (s: TLSSocket) => resolve(s));
    srv.once('tlsClientError', (e: Error) => resolve(e));
    raw.once('close', () => resolve(new Error('connection closed during the TLS handshake')));
    if (timeoutMs > 0) { timer = setTimeout(() => resolve('timeout'), timeoutMs); timer.unref(); }
    srv.emit('connection', raw);
  });
  if (timer) clearTimeout(timer);
  if (outcome === 'timeout') return { ok: false, reason: 'tls-handshake-timeout', detail: `no TLS handshake within ${timeoutMs} ms` };
  if (outcome instanceof Error) {
    const code = (outcome as NodeJS.ErrnoException).code ?? '';
    if (code === 'ERR_TLS_HANDSHAKE_TIMEOUT') return { ok: false, reason: 'tls-handshake-timeout', detail: 'no TLS handshake within node\'s handshakeTimeout' };
    if (NOT_TLS.has(code)) return { ok: false, reason: 'tls-plaintext', detail: `not a TLS client (${code}): a source without tls-creds?` };
    return { ok: false, reason: 'tls-handshake', detail: `TLS handshake failed: ${code ? code + ': ' : ''}${outcome.message}` };
  }
  const sock = outcome;
  // a later error on a refused socket must not become an uncaught 'error'; the migration
  // adds its own handlers to an accepted one
  sock.on('error', () => undefined);
  const protocol = sock.getProtocol();
  const x509 = sock.getPeerX509Certificate();
  const dn = x509 ? qemuDn(x509) : null;
  if (cfg.verifyPeer) {
    if (!x509) return { ok: false, reason: 'tls-no-client-cert', detail: 'the client sent no certificate (verify-peer is on)' };
    if (!sock.authorized) {
      return { ok: false, reason: 'tls-untrusted-cert', detail: `client certificate not trusted: ${String(sock.authorizationError)}`, dn: dn! };
    }
    if (cfg.authz && !cfg.authz.includes(dn!)) {
      return { ok: false, reason: 'tls-authz-denied', detail: `client DN "${dn}" is not in --tls-authz`, dn: dn! };
    }
  }
  return { ok: true, sock, dn, protocol };
}

/**
 * Client side (failover into a `-incoming` QEMU with tls-creds endpoint=server): verifies the
 * destination's certificate against the CA and the hostname, as a QEMU source with
 * tls-hostname does, and presents client-cert.pem for the destination's verify-peer.
 */
export async function connectTls(host: string, port: number, creds: TlsClientCreds): Promise<TLSSocket> {
  const servername = creds.hostname ?? host;
  const sock = tlsConnect({
    host, port, ca: creds.ca, ...(creds.cert ? { cert: creds.cert, key: creds.key } : {}),
    // SNI takes no IP address; the identity check below still uses it
    ...(/^[\d.]+$|:/.test(servername) ? {} : { servername }),
    checkServerIdentity: (_h, cert) => checkServerIdentity(servername, cert),
  });
  sock.setNoDelay(true);
  await once(sock, 'secureConnect');
  return sock;
}
