// The README's TypeScript examples must run as written (with 'retnet' mapped to lib/).
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as ts from 'typescript';

const readme = fs.readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
const blocks = [...readme.matchAll(/```ts\n([\s\S]*?)```/g)].map((m) => m[1]);

test('the README has TypeScript examples', () => {
  expect(blocks.length).toBeGreaterThanOrEqual(2);
});

test.each(blocks.map((code, i) => [i, code]))('README example %i runs', async (_i, code) => {
  // import lines become requires so the body can run inside an async function (top-level await).
  const body = (code as string).replace(/^import \{([^}]*)\} from '([^']+)';$/gm, 'const {$1} = require("$2");');
  const js = ts.transpileModule(`(async () => {\n${body}\n})()`, {
    compilerOptions: { target: ts.ScriptTarget.ES2022, module: ts.ModuleKind.CommonJS },
  }).outputText;
  const lib = require('../lib');
  const fakeRequire = (name: string) => (name === 'retnet' ? lib : require(name));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'retnet-readme-'));
  const cwd = process.cwd();
  process.chdir(dir);
  const written: string[] = [];
  const stdoutWrite = process.stdout.write;
  process.stdout.write = ((chunk: string) => written.push(String(chunk)) > 0) as typeof process.stdout.write;
  const log = jest.spyOn(console, 'log').mockImplementation(() => undefined);
  try {
    await new Function('require', `return ${js.trim().replace(/;$/, '')}`)(fakeRequire);
  } finally {
    process.stdout.write = stdoutWrite;
    log.mockRestore();
    process.chdir(cwd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
