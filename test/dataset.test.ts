import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';

import { Dataset, loadBrownCorpus, stripBrownTags } from '../lib/dataset';

const TEXT = 'abcdefghijklmnopqrstuvwxyz0123456789'.repeat(10); // 360 bytes

function rows({ data, shape: [B, T] }: { data: Int32Array; shape: [number, number] }): number[][] {
  return Array.from({ length: B }, (_, b) => Array.from(data.subarray(b * T, (b + 1) * T)));
}

describe('Dataset', () => {
  test('splits the byte stream into a training head and a contiguous validation tail', () => {
    const ds = Dataset.fromText(TEXT, { seqLen: 8, validationFraction: 0.25 });
    expect(ds.validationTokens.length).toBe(90);
    expect(ds.trainTokens.length).toBe(270);
    expect(Buffer.from(Array.from(ds.trainTokens)).toString() + Buffer.from(Array.from(ds.validationTokens)).toString()).toBe(TEXT);
  });

  test('training windows come from the training head only and are seqLen long', () => {
    const ds = Dataset.fromText(TEXT, { seqLen: 8, validationFraction: 0.25, seed: 3 });
    const head = Buffer.from(Array.from(ds.trainTokens)).toString();
    for (let i = 0; i < 50; i++) {
      const batch = ds.nextBatch(4);
      expect(batch.shape).toEqual([4, 8]);
      for (const row of rows(batch)) expect(head.includes(Buffer.from(row).toString())).toBe(true);
    }
  });

  test('batches are a deterministic function of the seed', () => {
    const a = Dataset.fromText(TEXT, { seqLen: 8, seed: 7 });
    const b = Dataset.fromText(TEXT, { seqLen: 8, seed: 7 });
    const c = Dataset.fromText(TEXT, { seqLen: 8, seed: 8 });
    const fromA = [a.nextBatch(4), a.nextBatch(4)].map(rows);
    expect([b.nextBatch(4), b.nextBatch(4)].map(rows)).toEqual(fromA);
    expect([c.nextBatch(4), c.nextBatch(4)].map(rows)).not.toEqual(fromA);
  });

  test('getState/setState continue the exact batch sequence, through JSON', () => {
    const original = Dataset.fromText(TEXT, { seqLen: 8, seed: 11 });
    original.nextBatch(3);
    original.nextBatch(5);
    const saved = JSON.parse(JSON.stringify(original.getState()));
    expect(saved.batchesDrawn).toBe(2);
    const expected = [original.nextBatch(4), original.nextBatch(2)].map(rows);
    const resumed = Dataset.fromText(TEXT, { seqLen: 8, seed: 11 });
    resumed.setState(saved);
    expect([resumed.nextBatch(4), resumed.nextBatch(2)].map(rows)).toEqual(expected);
  });

  test('a state continues only the data it was drawn from (states saved before the fingerprint still load)', () => {
    const original = Dataset.fromText(TEXT, { seqLen: 8, seed: 11 });
    original.nextBatch(3);
    const saved = JSON.parse(JSON.stringify(original.getState()));
    expect(saved.tokens).toEqual({ sha256: expect.stringMatching(/^[0-9a-f]{64}$/), train: original.trainTokens.length });
    const other = Dataset.fromText(TEXT.replace('a', 'b'), { seqLen: 8, seed: 11 });
    expect(() => other.setState(saved)).toThrow(/Dataset\.setState: the state is for other data \(\d+ training tokens, sha256 [0-9a-f]{12}…\) than this dataset's \(\d+, sha256 [0-9a-f]{12}…\): give it the data the run was trained on/);
    const split = Dataset.fromText(TEXT, { seqLen: 8, seed: 11, validationFraction: 0.2 });
    expect(() => split.setState(saved)).toThrow(/other data/);
    const { tokens: _fingerprint, ...older } = saved;
    const resumed = Dataset.fromText(TEXT, { seqLen: 8, seed: 11 });
    resumed.setState(older);
    expect(rows(resumed.nextBatch(2))).toEqual(rows(original.nextBatch(2)));
  });

  test('validation batches score every next-byte pair of the tail exactly once, deterministically', () => {
    const ds = Dataset.fromText(TEXT, { seqLen: 8, validationFraction: 0.25 });
    const batches = ds.validationBatches(4);
    expect(ds.validationBatches(4).map(rows)).toEqual(batches.map(rows));
    const pairs: string[] = [];
    for (const batch of batches) {
      for (const row of rows(batch)) for (let t = 0; t + 1 < row.length; t++) pairs.push(`${row[t]},${row[t + 1]}`);
    }
    // 90 tail bytes in windows of 8 with stride 7: 12 windows (84 pairs); the last 6 bytes are dropped.
    expect(pairs).toHaveLength(12 * 7);
    const tail = Array.from(ds.validationTokens);
    expect(pairs).toEqual(Array.from({ length: 84 }, (_, i) => `${tail[i]},${tail[i + 1]}`));
    expect(batches.map((b) => b.shape[0])).toEqual([4, 4, 4]);
    expect(ds.validationBatches(5, 2).map((b) => b.shape[0])).toEqual([5, 5]);
  });

  test('reads and concatenates files', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-dataset-'));
    fs.writeFileSync(path.join(dir, 'a.txt'), 'hello ');
    fs.writeFileSync(path.join(dir, 'b.txt'), 'world');
    const ds = await Dataset.fromFiles([path.join(dir, 'a.txt'), path.join(dir, 'b.txt')], { seqLen: 4, validationFraction: 0 });
    expect(Buffer.from(Array.from(ds.trainTokens)).toString()).toBe('hello world');
    expect(ds.validationBatches(2)).toEqual([]);
    await expect(Dataset.fromFiles([path.join(dir, 'missing.txt')], { seqLen: 4 })).rejects.toThrow(/cannot read .*missing\.txt/);
    fs.rmSync(dir, { recursive: true });
  });

  test('clear errors for short text, bad fractions, seqLen, batch sizes and states', () => {
    expect(() => Dataset.fromText('short', { seqLen: 8, validationFraction: 0 })).toThrow(/training part has 5 tokens.*seqLen=8/);
    expect(() => Dataset.fromText('x'.repeat(100), { seqLen: 8, validationFraction: 0.05 })).toThrow(/validation part has 5 tokens/);
    for (const fraction of [-0.1, 1, 1.5, NaN]) {
      expect(() => Dataset.fromText(TEXT, { seqLen: 8, validationFraction: fraction })).toThrow(/validationFraction must be a number in \[0, 1\)/);
    }
    expect(() => Dataset.fromText(TEXT, { seqLen: 1 })).toThrow(/seqLen must be an integer >= 2/);
    const ds = Dataset.fromText(TEXT, { seqLen: 8, seed: 1 });
    expect(() => ds.nextBatch(0)).toThrow(/batchSize must be an integer >= 1/);
    expect(() => ds.setState({ seed: 2, seqLen: 8, rng: [1, 2, 3, 4], batchesDrawn: 0 })).toThrow(/seed 2 .* seed 1/);
    expect(() => ds.setState({ seed: 1, seqLen: 16, rng: [1, 2, 3, 4], batchesDrawn: 0 })).toThrow(/seqLen 16 .* seqLen 8/);
    expect(() => ds.setState({ seed: 1, seqLen: 8, rng: [0, 0, 0, 0], batchesDrawn: 0 })).toThrow(/all zero/);
  });

  test('token ids are integers >= 0, never coerced', () => {
    const ids = Array.from({ length: 20 }, (_, i) => i);
    expect(new Dataset(Int32Array.from(ids), { seqLen: 4, validationFraction: 0 }).trainTokens).toEqual(Int32Array.from(ids));
    expect(() => new Dataset(TEXT as unknown as number[], { seqLen: 4 })).toThrow(/must be an array of token ids \(for text, use Dataset.fromText\)/);
    for (const [bad, shown] of [[65.9, '65.9'], [-1, '-1'], [2 ** 32 + 67, '4294967363'], [NaN, 'NaN']] as const) {
      expect(() => new Dataset([...ids, bad], { seqLen: 4, validationFraction: 0 })).toThrow(`Dataset: token 20 is ${shown}, not an integer id in [0, 2^31)`);
    }
  });
});

describe('Brown corpus', () => {
  test('stripBrownTags joins words, punctuation and quotes into plain text', () => {
    const tagged = [
      '',
      '',
      "\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.",
      'It/pps rose/vbd 1-1/2/cd points/nns (/( again/rb )/) ,/, sir/nn !/.',
      '',
      '',
      'Merger/nn-hl proposed/vbn-hl ',
      'However/wrb ,/, it/pps ended/vbd ;/. fine/jj ./.',
      '',
    ].join('\n');
    expect(stripBrownTags(tagged)).toBe(
      'The Fulton County said "no evidence" was found. It rose 1-1/2 points (again), sir!\n' +
        'Merger proposed\n' +
        'However, it ended; fine.',
    );
  });

  test('the installed corpus loads as 500 plain-text documents', async () => {
    const documents = await loadBrownCorpus();
    expect(documents).toHaveLength(500);
    const text = documents.join('');
    expect(text.length).toBeGreaterThan(5_000_000);
    expect(text).toContain('The Fulton County Grand Jury said Friday an investigation of');
    expect(text).not.toMatch(/\/(at|nn|vbd|np-tl)\b/);
  });
});
