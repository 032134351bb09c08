// Throwaway x509 PKIs for the TLS tests and the bench:colo --tls cells, made with Debian's openssl at test time (no key is
// ever committed), laid out the way QEMU's tls-creds-x509 reads a directory.
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function ssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

// QEMU sanity-checks its own certificates when it loads them: a CA needs CA:TRUE and
// keyCertSign, a server certificate serverAuth, a client certificate clientAuth.
const EXT = `[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
[server]
basicConstraints = critical, CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:colo-receiver, DNS:localhost, IP:127.0.0.1
[client]
basicConstraints = critical, CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
`;

export interface Pki {
  root: string;
  /** QEMU server layout for `colo-receiver listen --tls-creds` / a QEMU `-incoming` with endpoint=server. */
  serverDir: string;
  /** QEMU client layout with a certificate of DN `clientDn` (QEMU primary / --resume-tls-creds). */
  clientDir: string;
  clientDn: string;
  /** A client certificate from the same CA with another DN (for --tls-authz). */
  otherDnDir: string;
  otherDn: string;
  /** A client certificate signed by an unrelated CA. */
  foreignDir: string;
  /** A client certificate signed by a CA with our CA's name but another key. */
  impostorDir: string;
  /** Only ca-cert.pem: a client that presents no certificate. */
  noCertDir: string;
  /** The raw PEMs for node:tls clients. */
  ca: string; clientCert: string; clientKey: string;
}

function key(cwd: string, name: string): void {
  ssl(cwd, ['genpkey', '-algorithm', 'EC', '-pkeyopt', 'ec_paramgen_curve:P-256', '-out', name]);
}

function ca(cwd: string, prefix: string, subj: string): void {
  key(cwd, `${prefix}-key.pem`);
  ssl(cwd, ['req', '-new', '-x509', '-key', `${prefix}-key.pem`, '-subj', subj, '-days', '2', '-out', `${prefix}-cert.pem`, '-extensions', 'ca', '-config', 'ext.cnf']);
}

function leaf(cwd: string, name: string, subj: string, caPrefix: string, ext: 'server' | 'client'): void {
  key(cwd, `${name}-key.pem`);
  ssl(cwd, ['req', '-new', '-key', `${name}-key.pem`, '-subj', subj, '-out', `${name}.csr`, '-config', 'ext.cnf']);
  ssl(cwd, ['x509', '-req', '-in', `${name}.csr`, '-CA', `${caPrefix}-cert.pem`, '-CAkey', `${caPrefix}-key.pem`, '-CAcreateserial',
    '-days', '2', '-extfile', 'ext.cnf', '-extensions', ext, '-out', `${name}-cert.pem`]);
}

export function makePki(): Pki {
  const root = mkdtempSync(join(tmpdir(), 'colo-pki-'));
  writeFileSync(join(root, 'ext.cnf'), `[req]\ndistinguished_name = dn\n[dn]\n${EXT}`);
  ca(root, 'ca', '/C=GB/O=colo-test/CN=colo test CA');
  ca(root, 'foreign-ca', '/C=GB/O=elsewhere/CN=another CA');
  // same subject as our CA, another key: a TLS 1.2 client (gnutls) picks its certificate by the
  // issuer names in our CertificateRequest, so only an impostor of our CA's name gets its
  // certificate sent to us by QEMU; a plainly foreign one is withheld (no client certificate)
  ca(root, 'impostor-ca', '/C=GB/O=colo-test/CN=colo test CA');
  leaf(root, 'server', '/C=GB/O=colo-test/CN=colo-receiver', 'ca', 'server');
  leaf(root, 'client', '/C=GB/O=colo-test/CN=primary.example', 'ca', 'client');
  leaf(root, 'other', '/C=GB/O=colo-test/CN=intruder.example', 'ca', 'client');
  leaf(root, 'foreign', '/C=GB/O=colo-test/CN=primary.example', 'foreign-ca', 'client');
  leaf(root, 'impostor', '/C=GB/O=colo-test/CN=primary.example', 'impostor-ca', 'client');
  const dir = (name: string, files: [string, string][]) => {
    const d = join(root, name);
    mkdirSync(d);
    for (const [from, to] of files) cpSync(join(root, from), join(d, to));
    return d;
  };
  const serverDir = dir('server', [['ca-cert.pem', 'ca-cert.pem'], ['server-cert.pem', 'server-cert.pem'], ['server-key.pem', 'server-key.pem']]);
  const clientDir = dir('client', [['ca-cert.pem', 'ca-cert.pem'], ['client-cert.pem', 'client-cert.pem'], ['client-key.pem', 'client-key.pem']]);
  const otherDnDir = dir('other', [['ca-cert.pem', 'ca-cert.pem'], ['other-cert.pem', 'client-cert.pem'], ['other-key.pem', 'client-key.pem']]);
  // the foreign client trusts our CA (it can verify us) but its own certificate is not ours
  // (QEMU checks its own certificate against its ca-cert.pem at startup: the bundle holds both CAs)
  writeFileSync(join(root, 'both-cas.pem'), readFileSync(join(root, 'ca-cert.pem'), 'utf8') + readFileSync(join(root, 'foreign-ca-cert.pem'), 'utf8'));
  const foreignDir = dir('foreign', [['both-cas.pem', 'ca-cert.pem'], ['foreign-cert.pem', 'client-cert.pem'], ['foreign-key.pem', 'client-key.pem']]);
  writeFileSync(join(root, 'ours-and-impostor.pem'), readFileSync(join(root, 'ca-cert.pem'), 'utf8') + readFileSync(join(root, 'impostor-ca-cert.pem'), 'utf8'));
  const impostorDir = dir('impostor', [['ours-and-impostor.pem', 'ca-cert.pem'], ['impostor-cert.pem', 'client-cert.pem'], ['impostor-key.pem', 'client-key.pem']]);
  const noCertDir = dir('nocert', [['ca-cert.pem', 'ca-cert.pem']]);
  const read = (f: string) => readFileSync(join(root, f), 'utf8');
  return {
    root, serverDir, clientDir, otherDnDir, foreignDir, impostorDir, noCertDir,
    // gnutls_x509_crt_get_dn order: as encoded (C, O, CN here)
    clientDn: 'C=GB,O=colo-test,CN=primary.example', otherDn: 'C=GB,O=colo-test,CN=intruder.example',
    ca: read('ca-cert.pem'), clientCert: read('client-cert.pem'), clientKey: read('client-key.pem'),
  };
}
