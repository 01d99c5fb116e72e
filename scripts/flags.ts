// Numeric command-line flags shared by the CLIs: an absent flag is undefined (callers pick
// the default with ??), and a bad value is an Error naming the flag.

/** A safe integer >= min. */
export function integerFlag(text: string | undefined, flag: string, min = Number.MIN_SAFE_INTEGER): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  // Decimal digits only: Number() also reads 0x4, 1e1 and ' 5 '.
  if (!/^-?\d+$/.test(text) || !Number.isSafeInteger(value) || value < min) {
    throw new Error(`--${flag} must be an integer${min > Number.MIN_SAFE_INTEGER ? ` >= ${min}` : ''}, got ${text}`);
  }
  return value;
}

/** A finite number, strictly above `above` when given. */
export function numberFlag(text: string | undefined, flag: string, above?: number): number | undefined {
  if (text === undefined) return undefined;
  const value = Number(text);
  if (text.trim() === '' || !Number.isFinite(value) || (above !== undefined && !(value > above))) {
    throw new Error(`--${flag} must be a number${above !== undefined ? ` > ${above}` : ''}, got ${text}`);
  }
  return value;
}
