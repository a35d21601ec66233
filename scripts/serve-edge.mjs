// Serves the built Worker on one local workerd through Miniflare (the engine under `wrangler dev`),
// configured from wrangler.toml and .dev.vars by wrangler itself, with the same state layout as
// `wrangler dev --persist-to` (so `wrangler d1 migrations apply --local` prepares it).
//
// `wrangler dev` puts a second workerd in front of the Worker: a proxy Durable Object that every
// request crosses, over loopback HTTP, one at a time; and the wrangler CLI always attaches a DevTools
// inspector, to which workerd reports every subrequest (each D1 query, each Durable Object call).
// Served here, a request reaches the Worker directly: what `scripts/dev` and the benchmarks measure
// is Kiln, not the dev tooling.
//
//   node scripts/serve-edge.mjs [--port 8787] [--persist-to DIR] [--env NAME] [--var KEY:VALUE ...]
//                               [SCRIPT]   (the Worker's entry point; wrangler.toml's `main` by default)
import path from "node:path";
import { Miniflare, Log, LogLevel } from "miniflare";
import { unstable_getMiniflareWorkerOptions, unstable_readConfig } from "wrangler";

let port = 8787;
let persist = ".wrangler/state";
let envName;
let script;
const vars = {};
const args = process.argv.slice(2);
for (let i = 0; i < args.length; i++) {
  const value = args[i + 1];
  if (args[i] === "--port") { port = Number(value); i++; }
  else if (args[i] === "--persist-to") { persist = value; i++; }
  else if (args[i] === "--env") { envName = value; i++; }
  else if (args[i] === "--var") {
    const at = value.indexOf(":");
    if (at < 1) { console.error(`--var takes KEY:VALUE, not ${value}`); process.exit(2); }
    vars[value.slice(0, at)] = value.slice(at + 1);
    i++;
  } else if (!args[i].startsWith("--") && script === undefined) { script = path.resolve(args[i]); }
  else { console.error(`unknown argument ${args[i]}`); process.exit(2); }
}

const configPath = path.resolve("wrangler.toml");
const config = unstable_readConfig({ config: configPath, env: envName });
const { workerOptions, main } = unstable_getMiniflareWorkerOptions(config, envName);
script ??= path.resolve(path.dirname(configPath), main);
workerOptions.bindings = { ...workerOptions.bindings, ...vars };

const mf = new Miniflare({
  host: "127.0.0.1",
  port,
  log: new Log(LogLevel.WARN),
  // The placeholder `request.cf`, never fetched from Cloudflare (the machine may be offline).
  cf: false,
  defaultPersistRoot: path.join(path.resolve(persist), "v3"),
  workers: [{
    ...workerOptions,
    name: config.name,
    modules: true,
    scriptPath: script,
    // worker-build emits ES modules with a `.js` suffix (wrangler bundles them; served unbundled here).
    modulesRules: [{ type: "ESModule", include: ["**/*.js", "**/*.mjs"] }, ...(workerOptions.modulesRules ?? [])],
    // workers-rs' shim imports `../index.js`: the build directory is the modules' root.
    modulesRoot: path.dirname(path.dirname(script)),
  }],
});
const url = await mf.ready;
console.log(`Ready on ${url.href}`);
const stop = async () => { await mf.dispose(); process.exit(0); };
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
