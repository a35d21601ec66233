// Serves the built Worker on a local workerd through wrangler's programmatic dev server
// (`unstable_startWorker`, the engine behind `wrangler dev`), with the DevTools inspector off.
// The wrangler CLI always attaches an inspector, and workerd then reports every subrequest
// (each D1 query, each Durable Object call) to it; the benchmarks measure Kiln without that.
//
//   node scripts/serve-edge.mjs [--port 8787] [--persist-to DIR] [--var KEY:VALUE ...]
import { unstable_startWorker } from "wrangler";

let port = 8787;
let persist = ".wrangler/state";
const bindings = {};
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  const value = args[i + 1];
  if (args[i] === "--port") { port = Number(value); i++; }
  else if (args[i] === "--persist-to") { persist = value; i++; }
  else if (args[i] === "--var") {
    const at = value.indexOf(":");
    bindings[value.slice(0, at)] = { type: "plain_text", value: value.slice(at + 1) };
    i++;
  } else { console.error(`unknown argument ${args[i]}`); process.exit(2); }
}

const worker = await unstable_startWorker({
  config: "wrangler.toml",
  bindings,
  dev: { server: { hostname: "127.0.0.1", port }, inspector: false, persist, watch: false, logLevel: "warn" },
});
await worker.ready;
console.log(`Ready on ${(await worker.url).href}`);
const stop = async () => { await worker.dispose(); process.exit(0); };
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
