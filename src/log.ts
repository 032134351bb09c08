import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * The root logger: JSON lines on stderr (stdout stays for summaries), pretty-printed when
 * stderr is a terminal. Children bind `channel`; keys form a closed set (STYLE §4).
 */
export function createLogger(level = process.env.LOG_LEVEL ?? 'info', pretty = process.stderr.isTTY === true): Logger {
  if (pretty) {
    return pino({ level, base: undefined }, pino.transport({ target: 'pino-pretty', options: { destination: 2, colorize: true, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' } }));
  }
  return pino({ level, base: undefined }, pino.destination({ dest: 2, sync: true }));
}

/** A logger that drops everything, for library use and tests. */
export const silentLogger: Logger = pino({ level: 'silent' });
