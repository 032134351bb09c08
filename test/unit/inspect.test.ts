// `colo-receiver inspect` decodes every real capture in test/fixtures/captures to its end:
// main and multifd channels together, precopy and COLO, whatever QEMU recorded them.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';

const MAIN = new URL('../../src/cli/main.js', import.meta.url).pathname;
const CAPTURES = new URL('../../../test/fixtures/captures/', import.meta.url).pathname;

const dirs = readdirSync(CAPTURES, { withFileTypes: true }).filter((d) => d.isDirectory()).map((d) => d.name).sort();

describe('inspect on real captures', () => {
  test('there are captures to decode', () => { assert.ok(dirs.length >= 4, dirs.join(',')); });
  for (const name of dirs) {
    test(`${name}: every stream decodes to its end`, () => {
      const dir = join(CAPTURES, name);
      const streams = readdirSync(dir).filter((f) => /^(main|multifd-\d+)\.bin(\.gz)?$/.test(f)).map((f) => join(dir, f));
      const comp = /zstd/.test(name) ? 'zstd' : /zlib/.test(name) ? 'zlib' : 'none';
      const r = spawnSync(process.execPath, [MAIN, 'inspect', `--compression=${comp}`, ...streams], { encoding: 'utf8', timeout: 60_000 });
      assert.equal(r.status, 0, r.stdout.slice(-2000) + r.stderr);
      assert.doesNotMatch(r.stdout, /ERROR|left over/);
      const main = /(\d+) bytes parsed/.exec(r.stdout);
      assert.ok(main, 'the main channel was decoded');
      if (/colo/.test(name)) assert.match(r.stdout, /\d+ COLO checkpoints/);
      const multifd = streams.filter((s) => /multifd-/.test(s)).length;
      assert.equal((r.stdout.match(/ packets, /g) ?? []).length, multifd, 'one summary per multifd channel');
    });
  }
});
