// Runs the CPU GEMM on the cases read from stdin (JSON) and prints its outputs, so a test can
// run it under another RETNET_CPU_ISA: the addon picks its kernel set once per process.
const path = require('path');

const addon = require(path.join(__dirname, '..', '..', 'build', 'Release', 'retnet.node'));
let input = '';
process.stdin.on('data', (d) => (input += d));
process.stdin.on('end', async () => {
  const outputs = [];
  for (const { a, b, c, o } of JSON.parse(input)) {
    const out = Float32Array.from(c);
    await addon.gemm(Float32Array.from(a), Float32Array.from(b), out, o);
    outputs.push(Array.from(out));
  }
  process.stdout.write(JSON.stringify({ gemm: addon.buildInfo().gemm, outputs }));
});
