// Parses an AsyncAPI document with the official parser (@asyncapi/parser) and prints its
// diagnostics as JSON lines; exits 1 when any is an error. Usage: node validate.mjs FILE
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { Parser, fromFile } from "@asyncapi/parser";

const path = resolve(process.argv[2]);
const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, path).parse({
  source: pathToFileURL(path).href,
});
let errors = 0;
for (const d of diagnostics) {
  // severity 0 is an error, 1 a warning, 2 information, 3 a hint.
  if (d.severity === 0) errors += 1;
  console.log(JSON.stringify({ severity: d.severity, code: d.code, message: d.message, path: d.path }));
}
if (document) {
  const channels = document.channels().all().map((c) => ({
    id: c.id(),
    address: c.address(),
    messages: c.messages().all().map((m) => m.id()),
  }));
  console.log(JSON.stringify({ version: document.version(), channels }));
}
process.exit(errors || !document ? 1 : 0);
