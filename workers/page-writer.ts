// piscina entry point: one task per multifd packet. All logic lives in src/memory so it is
// unit-tested without a pool.
import { runWriteTask, serveRing, type PageTask } from '../src/memory/page-writer.js';

export function handle(task: PageTask): number {
  return task.op === 'serve' ? serveRing(task) : runWriteTask(task);
}
