import { ThreadedSocket } from './dist/src/net/threaded-read.js';
const origEmit = ThreadedSocket.prototype.emit;
ThreadedSocket.prototype.emit = function (ev, ...a) { if (ev === 'close' && this.summary?.bytes > 1e6) console.error('reader', JSON.stringify(this.summary)); return origEmit.call(this, ev, ...a); };
process.argv.push('--ram-mib', '512', '--channels', '1,4', '--repeat', '3', '--out', '/tmp/tp-x.json');
await import('./dist/bench/throughput.js');
