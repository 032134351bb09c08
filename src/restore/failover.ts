import { performance } from 'node:perf_hooks';
import type { Logger } from '../log.js';
import type { CommittedImage } from '../migration/committed-image.js';
import { describeTarget, parseTarget, sendImage, type ResumeTarget } from './image-stream.js';
import { withRunstate } from './runstate.js';

export interface FailoverAction { kind: 'resume' | 'save'; target: ResumeTarget }

/** `resume=tcp:HOST:PORT`, `resume=tls+tcp:HOST:PORT` or `save=PATH` (the --on-failover values). */
export function parseFailoverAction(spec: string): FailoverAction {
  const m = /^(resume|save)=(.+)$/.exec(spec);
  if (!m) throw new RangeError(`--on-failover must be resume=tcp:HOST:PORT, resume=tls+tcp:HOST:PORT or save=PATH, got "${spec}"`);
  const target = parseTarget(m[2]!);
  if (m[1] === 'resume' && target.kind !== 'tcp') throw new RangeError('--on-failover resume= needs tcp:HOST:PORT or tls+tcp:HOST:PORT');
  if (m[1] === 'save' && target.kind !== 'file') throw new RangeError('--on-failover save= needs a file path');
  return { kind: m[1] as 'resume' | 'save', target };
}

/**
 * Hands the committed image to a fresh QEMU (or a file for `-incoming "exec:cat FILE"`).
 * The runstate is set to "running" so the destination continues the guest on its own.
 * Returns the time from `t0` (the failover decision) until the destination has the stream.
 */
export async function runFailover(img: CommittedImage, action: FailoverAction, log: Logger, t0 = performance.now(),
                                  progress?: (bytes: number) => void): Promise<{ ms: number; bytes: number }> {
  const { dev, was } = withRunstate(img.deviceState, 'running');
  if (was !== null && was !== 'running') log.info({ checkpoint: img.checkpoint }, `globalstate runstate "${was}" replayed as "running"`);
  const where = describeTarget(action.target);
  log.info({ checkpoint: img.checkpoint }, `failover: ${action.kind === 'resume' ? 'resuming' : 'saving'} committed checkpoint ${img.checkpoint} to ${where}`);
  const bytes = await sendImage({ ...img, deviceState: dev }, action.target, progress);
  const ms = performance.now() - t0;
  log.info({ checkpoint: img.checkpoint, bytes, ms: Math.round(ms) }, `failover: image of checkpoint ${img.checkpoint} delivered in ${Math.round(ms)} ms`);
  return { ms, bytes };
}
