// piscina entry point: one task per multifd packet or per flush range. All logic lives in
// src/memory so it is unit-tested without a pool.
import { runFlushTask, runWriteTask, type PageTask } from '../src/memory/page-writer.js';

export function handle(task: PageTask): number {
  return task.op === 'write' ? runWriteTask(task) : runFlushTask(task);
}
