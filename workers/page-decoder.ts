// piscina entry point of one multifd channel's decoder thread (one pool of one thread per
// compressed channel): one task per packet, in the channel's order. The decoders live here,
// for the life of the thread; all logic is in src/compression.
import { ChannelDecoders, type DecodeResult, type DecodeTask } from '../src/compression/decoder.js';

const decoders = new ChannelDecoders();

export function handle(task: DecodeTask): DecodeResult {
  return decoders.run(task);
}
