// Checks of what callers pass in: typed arrays by tag (arrays made by the addon or in another
// context, a vm or a test sandbox, fail `instanceof` although they are the real thing), options
// objects, and how a value is shown in an error.

export type TypedArrayKind = 'Float32Array' | 'Int32Array' | 'Uint8Array';

export function isTypedArray(value: unknown, kind: 'Float32Array'): value is Float32Array;
export function isTypedArray(value: unknown, kind: 'Int32Array'): value is Int32Array;
export function isTypedArray(value: unknown, kind: 'Uint8Array'): value is Uint8Array;
export function isTypedArray(value: unknown, kind: TypedArrayKind): boolean {
  return ArrayBuffer.isView(value) && Object.prototype.toString.call(value) === `[object ${kind}]`;
}

/**
 * A public method's options argument: absent and null both mean "no options"; anything else
 * but an object is an Error naming the call (not a TypeError from reading a field of it).
 * Returns a copy of its own fields, each read once: what is checked is what is used, even if
 * a getter or a Proxy would answer differently the next time (a request read its prefix
 * length twice, and failed outside any call that could report it).
 */
export function optionsObject<T extends object>(options: T | null | undefined, call: string): T {
  if (options === undefined || options === null) return {} as T;
  if (typeof options !== 'object' || Array.isArray(options)) {
    throw new Error(`${call}: options must be an object, got ${Array.isArray(options) ? 'an array' : typeof options}`);
  }
  return { ...options };
}

/** Renders a user-supplied value for an error message. */
export function formatValue(value: unknown): string {
  if (typeof value === 'number') return String(value);
  if (typeof value === 'bigint') return `${value}n (a BigInt)`;
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    return Object.prototype.toString.call(value); // a cycle, or a BigInt inside
  }
  // An error names the value, not all of it (a server would echo a whole rejected prompt).
  const limit = 200;
  return text.length <= limit ? text : `${text.slice(0, limit)}… (${text.length} characters)`;
}
