import assert from 'node:assert/strict';
import { mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startPrecopySource } from '../../src/harness/index.js';
import { ReceiverProcess } from './receiver-process.js';

export const PRECOPY_MEM = 256 * 1024 * 1024;

export interface PrecopyStats {
  outcome: string;
  pages: number;
  channels: { channel: string; pages: number; zeroPages?: number; bytes: number; packets?: number }[];
}

/** Guest-physical ranges QEMU's own restore leaves alone: below VGA and from 1 MiB up (the rule). */
export function assertSameRam(src: Buffer, got: Buffer): void {
  assert.equal(got.length, PRECOPY_MEM, 'pc.ram.bin has the block used length');
  for (const [from, to] of [[0, 0xa0000], [0x100000, PRECOPY_MEM]] as const) {
    const a = src.subarray(from, to), b = got.subarray(from, to);
    if (!a.equals(b)) {
      let i = 0;
      while (a[i] === b[i]) i++;
      assert.fail(`pc.ram differs first at guest address 0x${(from + i).toString(16)}`);
    }
  }
}

/**
 * A real QEMU source (7.2 by default, `run.binary` for another; `-accel tcg -M pc -m 256`, stopped) with `a` at 1 MiB and `b` at
 * 200 MiB migrates into `colo-receiver listen`; the dumped pc.ram must equal the source's
 * `pmemsave` byte for byte. Returns the receiver's --stats-json.
 */
export interface PrecopyRunOptions {
  /** QEMU binary for the source (default: qemuBinary(), i.e. 7.2 or $QEMU). */
  binary?: string;
  /** Leave `--multifd-channels` off the receiver's command line: it learns the count (CLI default path). */
  noChannelOption?: boolean;
  /** QEMU 9.0+ `zero-page-detection` parameter: 'multifd' (default there) or 'legacy'. */
  zeroPageDetection?: 'multifd' | 'legacy';
  /** More receiver options (e.g. --tls-creds). */
  receiverArgs?: string[];
  /** More QEMU arguments for the source (e.g. a tls-creds-x509 object). */
  sourceArgs?: string[];
  /** More migrate-set-parameters (e.g. tls-creds, tls-hostname). */
  parameters?: Record<string, unknown>;
}

export async function precopyIntoReceiver(name: string, a: Buffer, b: Buffer, cleanups: (() => unknown)[],
                                          multifd?: { channels: number; compression?: 'none' | 'zlib' | 'zstd' },
                                          run: PrecopyRunOptions = {}): Promise<PrecopyStats> {
  const dir = await mkdtemp(join(tmpdir(), `colo-precopy-${name}-`));
  await writeFile(join(dir, 'a.bin'), a);
  await writeFile(join(dir, 'b.bin'), b);
  const recv = ReceiverProcess.start([
    '--dump-ram', join(dir, 'dump'), '--stats-json', join(dir, 'stats.json'),
    ...(run.noChannelOption ? [] : ['--multifd-channels', String(multifd?.channels ?? 0)]),
    '--compression', multifd?.compression ?? 'none',
    ...(run.receiverArgs ?? []),
  ]);
  cleanups.push(() => recv.kill());
  const port = await recv.port();
  const src = await startPrecopySource({
    runDir: dir, memMiB: 256,
    loaderFiles: [{ path: join(dir, 'a.bin'), addr: 0x100000 }, { path: join(dir, 'b.bin'), addr: 0xc800000 }],
    ...(multifd ? { multifd } : {}),
    ...(run.binary ? { binary: run.binary } : {}),
    ...(run.sourceArgs ? { extraArgs: run.sourceArgs } : {}),
  });
  cleanups.push(() => src.kill());
  await src.stop();
  await src.migrate(`tcp:127.0.0.1:${port}`, { parameters: {
    'max-bandwidth': 10_000_000_000,
    ...(run.zeroPageDetection ? { 'zero-page-detection': run.zeroPageDetection } : {}),
    ...run.parameters,
  } });
  try {
    await src.waitMigrationDone(120_000);
  } catch (e) {
    await recv.wait(5000).catch(() => undefined);
    throw new Error(`${(e as Error).message}; receiver stderr: ${recv.stderr.slice(-1200)}`);
  }
  const code = await recv.wait(60_000);
  assert.equal(code, 0, `receiver exit code (stderr: ${recv.stderr.slice(-1500)})`);
  // QEMU closes its multifd channels right after completing: the receiver, which waits for
  // their EOF before it calls the image complete, must not have needed its grace timer
  assert.doesNotMatch(recv.stderr, /still open after the end of the migration/);
  const srcMem = await readFile(await src.pmemsave(0, PRECOPY_MEM, join(dir, 'source.mem')));
  await src.kill();
  // the loader data really is in the source's RAM: the comparison is not trivial
  assert.ok(srcMem.subarray(0x100000, 0x100000 + a.length).equals(a));
  assert.ok(srcMem.subarray(0xc800000, 0xc800000 + b.length).equals(b));
  assertSameRam(srcMem, await readFile(join(dir, 'dump', 'pc.ram.bin')));
  const stats = JSON.parse(await readFile(join(dir, 'stats.json'), 'utf8')) as PrecopyStats;
  assert.equal(stats.outcome, 'completed');
  assert.equal(stats.channels.length, 1 + (multifd?.channels ?? 0));
  if (multifd) {
    // 7.2 and 10.0 send every non-zero page through multifd (spec §3.5): the main channel carries
    // none (10.0 with zero-page-detection=legacy sends its zero pages there)
    if (run.zeroPageDetection !== 'legacy') assert.equal(stats.channels[0]!.pages, 0, 'every non-zero page goes through multifd');
    // With zero-page-detection=multifd a packet may hold only zero pages, and QEMU hands packets
    // to whichever channel is idle: with ~2,100 non-zero pages a channel can see none of them
    // (it happened in CI), but it still carries its share of the 65,536 pages
    assert.ok(stats.channels.slice(1).every((c) => c.pages + (c.zeroPages ?? 0) > 0), 'every multifd channel carried pages');
  }
  assert.ok(stats.pages >= (a.length + b.length) / 4096);
  return stats;
}
