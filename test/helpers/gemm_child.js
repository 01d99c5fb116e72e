// Runs CPU products on the cases read from stdin (JSON) and prints their outputs, so a test
// can run them under another RETNET_CPU_ISA: the addon picks its kernel set once per process.
// A case is a GEMM ({ a, b, c, o }), an int8 product ({ int8: { weights, scales, x, o } }) or an
// fp32 product on weights in panels ({ panels: { weights, x, o } }).
const path = require('path');

const addon = require(path.join(__dirname, '..', '..', 'build', 'Release', 'retnet.node'));
let input = '';
process.stdin.on('data', (d) => (input += d));
process.stdin.on('end', async () => {
  const outputs = [];
  for (const { a, b, c, o, int8, panels } of JSON.parse(input)) {
    if (panels) {
      const out = new Float32Array(panels.o.M * panels.o.N);
      await addon.panelLinear(Float32Array.from(panels.weights), Float32Array.from(panels.x), out, panels.o);
      outputs.push(Array.from(new Uint32Array(out.buffer)));
      continue;
    }
    if (int8) {
      const out = new Float32Array(int8.o.M * int8.o.N);
      await addon.int8Linear(Int8Array.from(int8.weights), Float32Array.from(int8.scales), Float32Array.from(int8.x), out, int8.o);
      // NaN does not survive JSON: the outputs travel as their bits.
      outputs.push(Array.from(new Uint32Array(out.buffer)));
      continue;
    }
    const out = Float32Array.from(c);
    await addon.gemm(Float32Array.from(a), Float32Array.from(b), out, o);
    outputs.push(Array.from(out));
  }
  process.stdout.write(JSON.stringify({ gemm: addon.buildInfo().gemm, outputs }));
});
