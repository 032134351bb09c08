import { makePki } from '../dist/test/helpers/pki.js';
import { startPrecopySource } from '../dist/src/harness/index.js';
import { ReceiverProcess } from '../dist/test/helpers/receiver-process.js';
import { mkdtempSync } from 'node:fs';
const pki = makePki();
const dir = mkdtempSync('/tmp/tlsdbg-');
const ch = Number(process.argv[2] ?? 4);
const recv = ReceiverProcess.start(['--multifd-channels', String(ch), '--tls-creds', pki.serverDir, '--dump-ram', dir + '/dump'], { LOG_LEVEL: 'debug' });
const port = await recv.port();
const src = await startPrecopySource({ runDir: dir, memMiB: 256, ...(ch ? { multifd: { channels: ch } } : {}), extraArgs: ['-object', `tls-creds-x509,id=tls0,dir=${pki.clientDir},endpoint=client,verify-peer=on`] });
await src.stop();
await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: { 'tls-creds': 'tls0', 'tls-hostname': 'colo-receiver' } });
try { await src.waitMigrationDone(120000); console.log('done'); } catch (e) { console.log('QEMU:', e.message); }
console.log('recv exit', await recv.wait(20000));
console.log(recv.stderr.split('\n').filter(l => !l.includes('"level":20') || l.includes('TLS')).join('\n').slice(-3000));
console.log(src.proc.stderrTail());
await src.kill();
