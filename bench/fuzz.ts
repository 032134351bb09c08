// npm run fuzz (= npm run build && node dist/bench/fuzz.js): the mutation fuzzer of issue
// "Hardening" over real QEMU 7.2 captures (test/fixtures/captures) and recorded SyntheticSource
// sessions (7.2 and 10.x, plain and multifd, precopy and COLO). Logic: test/helpers/fuzz.ts.
//
//   node dist/bench/fuzz.js [--cases N] [--seconds S] [--seed X] [--jobs J] [--json FILE]
//                           [--no-captures] [--no-synthetic] [--replay RNGSEED]
//
// Stops at N cases or S seconds, whichever comes first. Prints cases run, throughput, crashes,
// hangs, rule violations, outcomes and error codes with counts, and the first findings with
// the rngSeed that replays each (--replay). Exit status 1 when anything was found.
import { writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { PagePool } from '../src/pool/page-pool.js';
import { applyCase, buildCorpus, campaign, replayCase, type FuzzStats } from '../test/helpers/fuzz.js';

const { values: a } = parseArgs({
  options: {
    cases: { type: 'string', default: '100000' },
    seconds: { type: 'string', default: '900' },
    seed: { type: 'string' },
    jobs: { type: 'string', default: '4' },
    threads: { type: 'string', default: '2' },
    json: { type: 'string' },
    'no-captures': { type: 'boolean', default: false },
    'no-synthetic': { type: 'boolean', default: false },
    replay: { type: 'string' },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (a.help) {
  process.stdout.write(`Mutation fuzzer of the receiver (issue "Hardening").

  node dist/bench/fuzz.js [--cases N] [--seconds S] [--seed X] [--jobs J] [--threads T]
                          [--json FILE] [--no-captures] [--no-synthetic] [--replay RNGSEED]

  --cases N        stop after N cases (default 100000)
  --seconds S      or after S seconds (default 900)
  --seed X         campaign seed (default: random, printed)
  --jobs J         cases run concurrently in this process (default 4)
  --threads T      page-writer threads of the shared pool (default 2)
  --json FILE      write the statistics and findings as JSON
  --replay R       run the one case with rngSeed R (from a finding) and print it
Exit status 1 when a crash, hang or rule violation was found.
`);
  process.exit(0);
}

const log = (s: string): void => { process.stderr.write(`${s}\n`); };
const pool = new PagePool({ threads: Number(a.threads) });
const t0 = Date.now();
const seeds = await buildCorpus(pool, { captures: !a['no-captures'], synthetic: !a['no-synthetic'], log });
log(`corpus: ${seeds.length} seeds in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

if (a.replay !== undefined) {
  const { report, c } = await replayCase(Number(a.replay), seeds, pool);
  const { conns, damage } = applyCase(c);
  console.log(JSON.stringify({
    report, chunking: c.chunking, multifdFirst: c.multifdFirst, damage,
    mutations: c.muts.map((m) => ({ name: m.name, expect: m.expect, budget: m.budget, cut: m.cut, splices: m.splices.map((s) => ({ conn: seeds.length && c.seed.conns[s.conn]!.role, at: s.at, del: s.del, ins: s.ins.length <= 64 ? s.ins.toString('hex') : `${s.ins.length} bytes` })) })),
    streams: conns.map((x) => ({ role: x.role, bytes: x.data.length, cut: x.cut, end: x.end })),
  }, null, 2));
  await pool.close();
  process.exit(report.verdict === 'ok' ? 0 : 1);
}

const seed = a.seed !== undefined ? Number(a.seed) : Date.now() % 2 ** 31;
log(`fuzzing: up to ${a.cases} cases or ${a.seconds} s, ${a.jobs} jobs, master seed ${seed}`);
const progress = (s: FuzzStats): void => log(`  ${s.cases} cases, ${s.casesPerSecond.toFixed(1)}/s, crashes ${s.crashes}, hangs ${s.hangs} (+${s.hangsIncludingKnown - s.hangs} known), violations ${s.violations}, known ${JSON.stringify(s.known)}, rss ${(process.memoryUsage().rss / 2 ** 20).toFixed(0)} MiB`);
const st = await campaign({ seeds, pool, cases: Number(a.cases), seconds: Number(a.seconds), seed, jobs: Number(a.jobs), onProgress: progress, progressEveryMs: 30_000 });
await pool.close();

const sortDesc = (o: Record<string, number>) => Object.fromEntries(Object.entries(o).sort((x, y) => y[1] - x[1]));
const summary = {
  masterSeed: seed, cases: st.cases, seconds: Math.round(st.seconds), casesPerSecond: Math.round(st.casesPerSecond * 10) / 10,
  crashes: st.crashes, hangs: st.hangs, hangsIncludingKnown: st.hangsIncludingKnown, violations: st.violations, loopDelayMs: st.loopDelay,
  outcomes: sortDesc(st.outcomes), errorCodes: sortDesc(st.codes), distinctErrorCodes: Object.keys(st.codes).length,
  errorsWithoutChannelOrOffset: st.noChannelOrOffset, mutations: sortDesc(st.mutations), perSeed: st.perSeed, perOutcome: st.perOutcome,
  knownReceiverIssues: st.known, knownIssueExamples: st.knownExamples,
  unhandled: st.unhandled.slice(0, 20), findings: st.findings.slice(0, 30),
};
if (a.json) writeFileSync(a.json, JSON.stringify({ ...summary, findings: st.findings }, null, 2) + '\n');
console.log(JSON.stringify(summary, null, 2));
process.exit(st.crashes + st.hangs + st.violations > 0 ? 1 : 0);
