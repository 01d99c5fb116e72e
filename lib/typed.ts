// Realm-independent typed-array checks: arrays made by the addon or in another context
// (a vm, a test sandbox) fail `instanceof` although they are the real thing.

export type TypedArrayKind = 'Float32Array' | 'Int32Array' | 'Uint8Array';

export function isTypedArray(value: unknown, kind: 'Float32Array'): value is Float32Array;
export function isTypedArray(value: unknown, kind: 'Int32Array'): value is Int32Array;
export function isTypedArray(value: unknown, kind: 'Uint8Array'): value is Uint8Array;
export function isTypedArray(value: unknown, kind: TypedArrayKind): boolean {
  return ArrayBuffer.isView(value) && Object.prototype.toString.call(value) === `[object ${kind}]`;
}
