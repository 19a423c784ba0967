// Turns a JavaScript policy into a component of the `policy` world with componentize-js.
//   node componentize.mjs NODE_MODULES_DIR SOURCE.js WIT_DIR OUT.wasm
// The WASI features componentize-js can add (stdio, random, clocks, http) are left out: a
// policy gets time and randomness from the `host` interface.
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, source, wit, out] = process.argv.slice(2);
if (!out) {
  console.error("usage: node componentize.mjs NODE_MODULES_DIR SOURCE.js WIT_DIR OUT.wasm");
  process.exit(2);
}
const pkgDir = join(modules, "@bytecodealliance", "componentize-js");
const pkg = JSON.parse(await readFile(join(pkgDir, "package.json"), "utf8"));
const { componentize } = await import(pathToFileURL(join(pkgDir, pkg.exports.import)).href);
const { component } = await componentize({
  sourcePath: source,
  witPath: wit,
  worldName: "policy",
  disableFeatures: ["stdio", "random", "clocks", "http", "fetch-event"],
});
await writeFile(out, component);
