// The CLI's option handling: usage errors exit 1 with a message naming the option; --help
// documents every cap option.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { describe, test } from 'node:test';
import { thpMode } from '../../src/cli/huge-pages.js';
import { ReceiverProcess } from '../helpers/receiver-process.js';

const MAIN = new URL('../../src/cli/main.js', import.meta.url).pathname;
const run = (...args: string[]) => spawnSync(process.execPath, [MAIN, ...args], { encoding: 'utf8', timeout: 20_000 });

describe('colo-receiver CLI', () => {
  test('--help lists every cap and the heartbeat modes', () => {
    const r = run('listen', '--help');
    assert.equal(r.status, 0);
    for (const o of ['--nbd HOST:PORT', '--disk NAME=PATH', '--max-disk-pending', '--disk-commit', '--max-ram', '--max-blob', '--max-blocks', '--max-section', '--max-vmdesc', '--max-channels', '--max-packet-payload', '--max-command', '--io-timeout', '--heartbeat-timeout MS|auto', '--expect-uuid', '--allow', '--max-memory', '--no-huge-pages']) {
      assert.ok(r.stdout.includes(o), `--help mentions ${o}`);
    }
  });

  test('--help documents TLS, failover over TLS, metrics; restore --help its TLS options', () => {
    const r = run('listen', '--help');
    for (const o of ['--tls-creds DIR', '--tls-no-verify-peer', '--tls-authz DN', '--resume-tls-creds DIR', '--resume-tls-hostname NAME', 'resume=tls+tcp:HOST:PORT', '--metrics HOST:PORT']) {
      assert.ok(r.stdout.includes(o), `--help mentions ${o}`);
    }
    const rr = run('restore', '--help');
    assert.equal(rr.status, 0);
    assert.match(rr.stdout, /tls\+tcp:HOST:PORT.*--tls-creds DIR.*--tls-hostname NAME/);
  });

  for (const [args, msg] of [
    [['--tls-creds', '/nonexistent-colo-tls'], /cannot read \/nonexistent-colo-tls\/ca-cert\.pem/],
    [['--tls-authz', 'CN=a'], /--tls-authz and --tls-no-verify-peer need --tls-creds/],
    [['--tls-authz', 'CN=a,,junk'], /not a DN/],
    [['--on-failover', 'resume=tls+tcp:127.0.0.1:5555'], /needs --resume-tls-creds/],
    [['--on-failover', 'resume=tcp:127.0.0.1:5555', '--resume-tls-creds', '/tmp'], /--resume-tls-creds is for resume=tls\+tcp/],
    [['--metrics', 'nowhere:'], /--metrics must be HOST:PORT or PORT/],
    [['--heartbeat-timeout', 'soon'], /--heartbeat-timeout must be auto or milliseconds/],
    [['--max-command', '70000'], /--max-command must be an integer in 0\.\.65536/],
    [['--max-packet-payload', String(2 ** 20 + 1)], /--max-packet-payload must be an integer in 1\.\.1048576/],
    [['--compression', 'lz4'], /--compression must be none, zlib or zstd/],
    [['--disk', 'd=/tmp/x.img'], /--disk needs --nbd/],
    [['--nbd', '127.0.0.1:10809'], /--nbd needs at least one --disk/],
    [['--nbd', 'nowhere', '--disk', 'd=/tmp/x.img'], /--nbd must be HOST:PORT/],
    [['--nbd', '127.0.0.1:0', '--disk', 'no-equals-sign'], /--disk must be NAME=PATH/],
    [['--nbd', '127.0.0.1:0', '--disk', 'd=/dev/null', '--disk', 'd=/dev/null'], /not a file or block device|same NAME/],
    [['--nbd', '127.0.0.1:0', '--disk', 'd=/nonexistent/x.img'], /--disk d: ENOENT/],
    [['--nbd', '127.0.0.1:0', '--disk', 'd=/a', '--disk-commit', 'later'], /--disk-commit must be async or sync/],
  ] as const) {
    test(`listen ${args.join(' ')}: exit 1, says why`, () => {
      const r = run('listen', ...args);
      assert.equal(r.status, 1, r.stderr);
      assert.match(r.stderr, msg);
    });
  }

  test('huge pages by default: the receiver re-executes itself once with glibc.malloc.hugetlb=1 when THP is available; --no-huge-pages keeps it off', async () => {
    const thp = thpMode();
    for (const off of [false, true]) {
      const r = ReceiverProcess.start(off ? ['--no-huge-pages'] : [], { GLIBC_TUNABLES: '' });
      try {
        await r.port();
        const line = r.lines.find((l) => l.msg === 'huge pages')!;
        assert.ok(line, 'the choice is logged');
        if (!off && (thp === 'always' || thp === 'madvise')) {
          assert.equal(line.hugePages, true);
          assert.match(String(line.tunables), /glibc\.malloc\.hugetlb=1/);
          assert.notEqual(r.pid, r.child.pid, 'the listening process is the re-executed one');
        } else {
          assert.equal(line.hugePages, false);
          assert.equal(r.pid, r.child.pid);
        }
      } finally {
        r.kill();
        await r.exited;
      }
    }
  });
});
