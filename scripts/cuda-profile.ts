// One operation of the bench-cuda model on the CUDA backend, for a kernel profiler: it runs the
// operation `--reps` times after one warm-up and prints the wall time of each, so the profile's
// kernel times can be set against the call's (the difference is host work and copies).
//   node dist/scripts/cuda-profile.js OP [--reps N]
//   OP: forward-parallel | forward-chunkwise | prefill | step-1 | step-16 | step-64 | train
// scripts/cuda-check.sh --profile runs every OP under Nsight Compute on the GPU machine.
import { RetNet } from '../lib/model';
import { benchConfig, randomTokens } from './bench-cuda';

const OPS = ['forward-parallel', 'forward-chunkwise', 'prefill', 'step-1', 'step-16', 'step-64', 'train'] as const;
type Op = (typeof OPS)[number];

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const op = args[0] as Op;
  if (!OPS.includes(op)) throw new Error(`cuda-profile: OP must be one of ${OPS.join(', ')}, got '${args[0]}'`);
  const reps = args.includes('--reps') ? Number(args[args.indexOf('--reps') + 1]) : 3;
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`cuda-profile: --reps must be a positive integer`);
  const config = benchConfig(false);
  const V = config.vocab_size;
  const C = 128;
  const model = await RetNet.create(config, { device: 'cuda' });
  const native = model.native();
  let run: () => Promise<unknown>;
  if (op === 'forward-parallel' || op === 'forward-chunkwise') {
    const mode = op === 'forward-parallel' ? 'parallel' : 'chunkwise';
    const tokens = randomTokens(4 * 1024, V, 1);
    run = () => native.forward(tokens, 4, 1024, mode, C);
  } else if (op === 'prefill') {
    const prompt = randomTokens(2048, V, 2);
    run = async () => {
      const state = native.createState(1);
      await native.prefill(state, prompt, 2048, 'chunkwise', C);
      state.dispose();
    };
  } else if (op === 'train') {
    const micro = [{ tokens: randomTokens(4 * 512, V, 5), batch: 4, length: 512, targets: null, mask: null }];
    const options = {
      mode: 'chunkwise' as const, chunkSize: C, lr: 1e-4, beta1: 0.9, beta2: 0.98, eps: 1e-8, weightDecay: 0.01,
      clipNorm: 1.0, noDecay: [], seed: 0,
    };
    run = () => native.trainStep(micro, options);
  } else {
    const batch = Number(op.slice('step-'.length));
    const state = native.createState(batch);
    await native.prefill(state, randomTokens(batch * 64, V, 3), 64, 'chunkwise', C);
    const next = randomTokens(batch, V, 4);
    run = () => native.step(state, next);
  }
  await run();
  const times: string[] = [];
  for (let i = 0; i < reps; i++) {
    const t0 = process.hrtime.bigint();
    await run();
    times.push((Number(process.hrtime.bigint() - t0) / 1e6).toFixed(3));
  }
  console.log(`cuda-profile ${op}: wall ms ${times.join(' ')}`);
  model.dispose();
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
