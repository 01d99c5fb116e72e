// A training progress line for a terminal or a log: on a TTY one line rewritten in place (at most
// a few times a second); otherwise a full line every `intervalSeconds`, so logs stay short.

export interface ProgressStream {
  write(text: string): unknown;
  isTTY?: boolean;
}

export interface ProgressValues {
  step: number;
  total: number;
  loss: number;
  tokensPerSecond: number;
  etaSeconds: number;
}

const BAR_WIDTH = 24;
const TTY_REDRAW_SECONDS = 0.1;

/** "1h02m", "3m05s", "42s"; "?" when unknown. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '?';
  const s = Math.round(seconds);
  if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
  if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  return `${s}s`;
}

export function formatProgress(v: ProgressValues, withBar: boolean): string {
  const fraction = v.total > 0 ? Math.min(1, v.step / v.total) : 1;
  const filled = Math.round(fraction * BAR_WIDTH);
  const bar = withBar ? `[${'#'.repeat(filled)}${'.'.repeat(BAR_WIDTH - filled)}] ` : '';
  const width = String(v.total).length;
  return (
    `${bar}step ${String(v.step).padStart(width)}/${v.total}  loss ${v.loss.toFixed(4)}  ` +
    `${Math.round(v.tokensPerSecond)} tok/s  ETA ${formatDuration(v.etaSeconds)}`
  );
}

export class ProgressLine {
  private readonly stream: ProgressStream;
  private readonly intervalSeconds: number;
  private lastWrite = -Infinity;
  private latest: ProgressValues | undefined;
  private latestShown = true;
  private lineOpen = false;

  constructor(stream: ProgressStream = process.stderr, options: { intervalSeconds?: number } = {}) {
    this.stream = stream;
    this.intervalSeconds = options.intervalSeconds ?? 10;
  }

  private get tty(): boolean {
    return this.stream.isTTY === true;
  }

  /** Shows `values` now if the redraw/log interval has passed (or it is the last step); otherwise later. */
  update(values: ProgressValues): void {
    this.latest = values;
    this.latestShown = false;
    const interval = this.tty ? TTY_REDRAW_SECONDS : this.intervalSeconds;
    if (performance.now() / 1000 - this.lastWrite >= interval || values.step === values.total) this.show();
  }

  /** Prints a message on its own line without garbling the progress line. */
  log(message: string): void {
    this.closeLine();
    this.stream.write(message + '\n');
    if (this.tty && this.latest) this.show();
  }

  /** Shows the latest values if they are not on screen yet and ends the progress line. */
  finish(): void {
    if (!this.latestShown) this.show();
    this.closeLine();
  }

  private show(): void {
    if (!this.latest) return;
    if (this.tty) {
      // \r returns to the line start, ESC[K clears what a longer earlier line left behind.
      this.stream.write(`\r${formatProgress(this.latest, true)}\x1b[K`);
      this.lineOpen = true;
    } else {
      this.stream.write(formatProgress(this.latest, false) + '\n');
    }
    this.latestShown = true;
    this.lastWrite = performance.now() / 1000;
  }

  private closeLine(): void {
    if (this.lineOpen) this.stream.write('\n');
    this.lineOpen = false;
  }
}
