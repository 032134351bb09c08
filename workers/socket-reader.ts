// piscina entry point: one task per multifd connection, for the connection's life. All logic
// lives in src/net/socket-reader.ts.
import { serveSocket, type SocketReadSummary, type SocketReadTask } from '../src/net/socket-reader.js';

export function handle(task: SocketReadTask): Promise<SocketReadSummary> {
  return serveSocket(task);
}
